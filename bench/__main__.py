"""`python -m bench [--quick] [--only NAME ...] [--output FILE]`: run every scenario (or the
ones named), print the table, write JSON. `--compare REF [--rounds N]`: only the lifecycle
and LogAction scenarios (or those named), this tree's against REF's (bench.compare)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path

from bench import compare, scenarios
from bench.balancer import log_action_through_nginx
from bench.pooler import log_action_through_pgbouncer
from bench.report import table, write_json
from bench.sealing import verify_audit_log
from bench.stack import running
from bench.webhooks import lifecycles_with_webhook, webhook_deliveries
from shared.persistence.db import describe
from tests.harness import server_url

DEFAULT_OUTPUT = Path(__file__).parent / "results.json"
# The sealed trail in bulk after the others, whose trail it doubles; the scale-out
# scenarios last: each starts processes of its own beside the stack.
SCENARIOS = (
    *scenarios.SCENARIOS,
    webhook_deliveries,
    lifecycles_with_webhook,
    verify_audit_log,
    log_action_through_pgbouncer,
    log_action_through_nginx,
)


async def run(quick: bool, output: Path, only: list[str] | None = None) -> int:
    size = scenarios.QUICK if quick else scenarios.FULL
    chosen = [s for s in SCENARIOS if not only or s.__name__ in only]
    server = server_url()
    print(
        f"bench: {'quick' if quick else 'full'} run on {os.cpu_count()} cores, {describe(server)}",
        file=sys.stderr,
        flush=True,
    )
    results = []
    async with running(server) as stack:
        for scenario in chosen:
            # What the load generator holds so far stays out of its collector's way, so
            # that its own pauses do not show up as the services' latency.
            gc.collect()
            gc.freeze()
            started = time.perf_counter()
            rows = await scenario(stack, size)
            print(
                f"bench: {scenario.__name__} done in {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            results += rows
    print(table(results))
    write_json(results, output)
    print(f"bench: wrote {output}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="every scenario at a small size")
    parser.add_argument(
        "--only",
        action="append",
        choices=[scenario.__name__ for scenario in SCENARIOS],
        metavar="NAME",
        help="run this scenario only (repeatable): "
        + ", ".join(scenario.__name__ for scenario in SCENARIOS),
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"default {DEFAULT_OUTPUT}, with --compare {compare.DEFAULT_OUTPUT}",
    )
    parser.add_argument(
        "--compare",
        metavar="REF",
        help="run only the scenarios of "
        + ", ".join(compare.COMPARED)
        + " (or those of --only), for this tree and for a scratch checkout of git ref REF",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"with --compare: turns each tree takes (default {compare.DEFAULT_ROUNDS})",
    )
    args = parser.parse_args()
    if args.compare is None:
        if args.rounds is not None:
            parser.error("--rounds goes with --compare")
        return asyncio.run(run(args.quick, args.output or DEFAULT_OUTPUT, args.only))
    rounds = compare.DEFAULT_ROUNDS if args.rounds is None else args.rounds
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        return compare.run(args.compare, rounds, args.quick, args.output, args.only)
    except compare.CompareError as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
