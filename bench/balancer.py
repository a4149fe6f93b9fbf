"""LogAction through nginx to two replicas, against one replica called directly.

The question on two cores is not a speed-up (four service processes, nginx and the
load generator share them) but what the extra hop costs: the ratio of calls/s through
docker/nginx.conf to calls/s of the stack's one audit_svc called directly, same client,
same request, same 64 calls in flight. shared.client's own round robin over the same
two replicas (no proxy) is reported beside them. The loads alternate, two rounds each,
so that a drift over time (the trail growing) falls on every side.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import grpc

from bench.load import Load, closed_loop
from bench.report import Result, info
from bench.scenarios import Size, _log_action_call
from bench.stack import Stack
from shared.client import service_config, target
from tests.nginx import PROXY_ADDRESS, nginx_binary, running_nginx, running_replicas

IN_FLIGHT = 64
ROUNDS = 2


async def log_action_through_nginx(stack: Stack, size: Size) -> list[Result]:
    if nginx_binary() is None:
        print("bench: nginx is not installed: LogAction through nginx SKIPPED", file=sys.stderr)
        return []
    name = f"LogAction, {IN_FLIGHT} in flight"
    loads: dict[str, list[Load]] = {"direct": [], "nginx": [], "round_robin": []}
    async with (
        running_replicas(stack.url, TRUSTED_PROXIES=PROXY_ADDRESS) as replicas,
        running_nginx(replicas.ports()) as nginx,
        grpc.aio.insecure_channel(nginx.address("audit_svc")) as through_nginx,
        grpc.aio.insecure_channel(
            target(replicas.target("audit_svc")),
            options=[("grpc.service_config", json.dumps(service_config()))],
        ) as round_robin,
    ):
        calls = {
            "direct": _log_action_call(stack),
            "nginx": _log_action_call(dataclasses.replace(stack, audit_channel=through_nginx)),
            "round_robin": _log_action_call(dataclasses.replace(stack, audit_channel=round_robin)),
        }
        for _ in range(ROUNDS):
            for route, call in calls.items():
                load = await closed_loop(call, IN_FLIGHT, size.duration_s / ROUNDS, size.warmup_s)
                loads[route].append(load)
    direct, proxied, balanced = (Load.merged(loads[r]) for r in ("direct", "nginx", "round_robin"))
    return [
        info(
            f"{name}, through nginx to 2 replicas: calls/s (baseline: 1 replica direct)",
            proxied.rate,
            direct.rate,
        ),
        info(
            f"{name}, through nginx to 2 replicas: p99 ms (baseline: 1 replica direct)",
            proxied.percentile_ms(0.99),
            direct.percentile_ms(0.99),
        ),
        info(
            f"{name}, client round robin over 2 replicas: calls/s (baseline: 1 replica direct)",
            balanced.rate,
            direct.rate,
        ),
    ]
