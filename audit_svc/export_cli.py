"""`python -m audit_svc.export_cli`: streams an export of the audit trail from a running
audit_svc (ExportAuditLogs) to a file or stdout, the token in RELMAN_TOKEN.

    python -m audit_svc.export_cli --since ... --until ... --action ... --origin client -o audit.csv

A client: it imports the generated gRPC code and the proto conversions, no server module.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, datetime

import grpc

from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.framework.protos import enum_to_proto, timestamp


def _time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def _download(args, out) -> int:
    request = audit_pb2.ExportAuditLogsRequest(
        filter=audit_pb2.AuditLogFilter(
            user_id=args.user_id or "",
            action=args.action or "",
            resource_type=args.resource_type or "",
            resource_id=args.resource_id or "",
            start_time=timestamp(args.since),
            end_time=timestamp(args.until),
            origin=enum_to_proto(audit_pb2.AuditOrigin, args.origin),
        ),
        raw=args.raw,
    )
    token = os.environ.get("RELMAN_TOKEN", "")
    progress = sys.stderr.isatty()
    rows = written = 0
    started = time.monotonic()
    try:
        async with grpc.aio.insecure_channel(args.address) as channel:
            stream = audit_pb2_grpc.AuditServiceStub(channel).ExportAuditLogs(
                request, metadata=(("authorization", f"Bearer {token}"),)
            )
            async for chunk in stream:
                out.write(chunk.data)
                rows += chunk.data.count("\n")
                written += len(chunk.data.encode())
                if progress:
                    rate = rows / max(time.monotonic() - started, 1e-6)
                    print(
                        f"\r{rows:,} rows, {written / 1e6:.1f} MB, {rate:,.0f} rows/s",
                        end="",
                        file=sys.stderr,
                    )
    except grpc.aio.AioRpcError as error:
        print(f"export: {error.code().name}: {error.details()}", file=sys.stderr)
        return 2
    finally:
        if progress:
            print(file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m audit_svc.export_cli",
        description="Stream the audit trail as CSV from audit_svc (token in RELMAN_TOKEN).",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("AUDIT_SVC_ADDR", "localhost:50052").replace("[::]", "localhost"),
    )
    parser.add_argument("--since", type=_time, help="ISO 8601 start time, inclusive")
    parser.add_argument("--until", type=_time, help="ISO 8601 end time, exclusive")
    parser.add_argument("--action")
    parser.add_argument("--user-id")
    parser.add_argument("--resource-type")
    parser.add_argument("--resource-id")
    parser.add_argument(
        "--origin", choices=("relman", "client"), help="rows relman wrote, or rows clients sent"
    )
    parser.add_argument("--raw", action="store_true", help="no formula neutralizing")
    parser.add_argument("-o", "--output", default="-", help="file to write; - for stdout")
    args = parser.parse_args(argv)
    if args.output == "-":
        return asyncio.run(_download(args, sys.stdout))
    with open(args.output, "w", newline="") as out:
        return asyncio.run(_download(args, out))


if __name__ == "__main__":
    sys.exit(main())
