"""`python -m shared.framework.healthcheck HOST:PORT [SERVICE]`: exit 0 if the service is SERVING.

Server framework: the container health check (docker-compose.yml). SERVICE "" (the
default) is liveness, a `relman.v1.*` name readiness. Plaintext only; with TLS use the
platform's gRPC probe.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: python -m shared.framework.healthcheck HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    address, service = argv[0], argv[1] if len(argv) == 2 else ""
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError as error:
            print(f"{address} {service!r}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{address} {service!r}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
