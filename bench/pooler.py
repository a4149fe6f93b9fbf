"""LogAction through PgBouncer in transaction mode, beside LogAction straight to PostgreSQL.

A second audit_svc runs behind a real PgBouncer (tests.pgbouncer, docker/pgbouncer.ini)
with DB_STATEMENT_CACHE=0, on the stack's database; the same client, request and
concurrency call it and the stack's own audit_svc in alternating phases of one run, so
that a drift over time (the table growing) falls on both sides of the ratio. Without
PgBouncer on the machine the scenario says so on stderr and reports nothing.
"""

from __future__ import annotations

import dataclasses
import sys

import grpc

from bench.load import Load, closed_loop
from bench.report import Result, at_least, info
from bench.scenarios import Size, _log_action_call
from bench.stack import Stack
from tests.harness import client_address, start_service
from tests.pgbouncer import PgBouncerMissing, find_pgbouncer, running_pgbouncer

ROUNDS = 2
IN_FLIGHT = 64


async def log_action_through_pgbouncer(stack: Stack, size: Size) -> list[Result]:
    try:
        find_pgbouncer()
    except PgBouncerMissing as missing:
        print(f"bench: {missing}; LogAction through PgBouncer not measured", file=sys.stderr)
        return []
    async with running_pgbouncer(stack.url) as bouncer:
        pooled = await start_service(
            bouncer.url_through(stack.url), "audit_svc", DB_STATEMENT_CACHE="0"
        )
        try:
            address = client_address(pooled.addresses["audit_svc"])
            async with grpc.aio.insecure_channel(address) as channel:
                direct_call = _log_action_call(stack)
                through_call = _log_action_call(dataclasses.replace(stack, audit_channel=channel))
                direct, through = [], []
                for _ in range(ROUNDS):
                    for loads, call in ((direct, direct_call), (through, through_call)):
                        loads.append(
                            await closed_loop(
                                call, IN_FLIGHT, size.duration_s / ROUNDS, size.warmup_s
                            )
                        )
        finally:
            code = await pooled.stop()
        if code:
            raise RuntimeError(f"audit_svc behind PgBouncer exited with {code}:\n{pooled.output}")
    direct_load, through_load = Load.merged(direct), Load.merged(through)
    name = f"LogAction through PgBouncer (transaction mode), {IN_FLIGHT} in flight"
    return [
        at_least(
            f"{name}: calls/s (baseline: LogAction to PostgreSQL itself)",
            through_load.rate,
            direct_load.rate,
            0.5,
        ),
        info(
            f"{name}: p99 ms (baseline: to PostgreSQL itself)",
            through_load.percentile_ms(0.99),
            direct_load.percentile_ms(0.99),
        ),
    ]
