"""`make bench QUICK=1` runs end to end and reports every scenario (no timing is asserted)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from shared import PROJECT_ROOT
from tests.nginx import nginx_binary
from tests.pgbouncer import PgBouncerMissing, find_pgbouncer


def pgbouncer_installed() -> bool:
    try:
        find_pgbouncer()
    except PgBouncerMissing:
        return False
    return True


KEYS = {"scenario", "figure", "baseline", "ratio", "target", "met"}
# One row at least per scenario of the issue, found by the start of its name.
SCENARIOS = (
    "LogAction, 64 in flight: calls/s, sealing on",
    "LogAction, 64 in flight: p99 ms",
    "LogAction, 64 in flight: seal lag (commit to sealed) of its ",
    "LogActions, ",
    "ExportAuditLogs, ",
    "ListAuditLogs, page of 50, ",
    "Promote + 5 x 2 UpdatePipelineStage + GetDeployment(FULL), 16 in flight: p99",
    "CheckPromotion to production, 16 in flight: p99",
    "WatchDeployment, ",
    "LogAction, 16 in flight, while 8 Logins run",
    "LogAction, 1 in flight, beside an export read at one message per 50 ms: p99",
    "Sealer, 20,000 rows written at once: rows sealed/s",
    "VerifyAuditLog, whole trail of ",
    "GetDoraMetrics by month over a year, ",
    "Webhook deliveries of ",
    "Promote + 5 x 2 UpdatePipelineStage + GetDeployment(FULL), 16 in flight, a webhook taking",
)
# The sealed trail's targets (issue 20): (start, end of the row's name, its target).
SEALED_TRAIL_TARGETS = (
    ("LogAction, 64 in flight: calls/s, sealing on", "", ">= 0.75x"),
    ("LogAction, 64 in flight: seal lag (commit to sealed) of its ", "p99 s", "<= 2 s"),
    (
        "VerifyAuditLog, whole trail of ",
        "rows/s (baseline: PostgreSQL's leaf hashes of the rows alone)",
        ">= 200,000 rows/s",
    ),
)
# Measured where PgBouncer and nginx are installed (always in CI), else said to be skipped.
SCALE_OUT = (
    ("LogAction through PgBouncer (transaction mode)", pgbouncer_installed),
    ("LogAction, 64 in flight, through nginx to 2 replicas", lambda: nginx_binary() is not None),
)


def quick_run(module: str, output: Path) -> tuple[list[dict], str]:
    """`python -m module --quick`: its rows, each in bench/results.json's format, and the
    table it printed."""
    run = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--output", str(output)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(output.read_text())
    assert all(set(row) == KEYS for row in results)
    return results, run.stdout


def test_quick_bench_reports_every_scenario_against_its_baseline(tmp_path):
    results, printed = quick_run("bench", tmp_path / "results.json")
    for prefix in SCENARIOS:
        assert any(row["scenario"].startswith(prefix) for row in results), prefix
    for prefix, installed in SCALE_OUT:
        reported = any(row["scenario"].startswith(prefix) for row in results)
        assert reported == installed(), prefix
    for row in results:
        assert math.isfinite(row["figure"]) and row["figure"] >= 0, row
        if row["target"]:
            assert isinstance(row["met"], bool), row
        if row["baseline"] is not None and row["ratio"] is not None:
            assert row["ratio"] == row["figure"] / row["baseline"], row
    # Throughput rows are measured against a baseline taken in the same run.
    for row in results:
        if row["target"].startswith(">="):
            assert row["baseline"] > 0, row
    # So are the latencies held to a ratio (beside logins, beside a slow export reader).
    for row in results:
        if row["target"].startswith("<=") and row["target"].endswith("x"):
            assert row["baseline"] > 0, row
    # The table printed is the JSON written.
    for row in results:
        assert row["scenario"] in printed
    # The sealed trail is held to the targets; VerifyAuditLog went through the whole
    # trail, the 20,000 rows written at once for it among them.
    for start, end, target in SEALED_TRAIL_TARGETS:
        (row,) = [
            r for r in results if r["scenario"].startswith(start) and r["scenario"].endswith(end)
        ]
        assert row["target"] == target, row
    checked = re.search(r"^VerifyAuditLog, whole trail of ([\d,]+) rows: rows/s", printed, re.M)
    assert int(checked[1].replace(",", "")) > 20_000, checked[0]


# One row at least per measure of `make bench-scale`, found by the start of its name.
SCALE_MEASURES = (
    "Load of ",
    "ListAuditLogs, ",
    "ExportAuditLogs, one month of ",
    "LogAction, 64 in flight, ",
    "Retention of a month of ",
)


def test_quick_scale_bench_reports_every_measure_against_its_baseline(tmp_path):
    """`make bench-scale` at a small size (--quick: 60,000 rows): it loads 12 partitions,
    runs every measure and writes bench/results.json's format."""
    results, printed = quick_run("bench.scale", tmp_path / "results-scale.json")
    for prefix in SCALE_MEASURES:
        assert any(row["scenario"].startswith(prefix) for row in results), prefix
    # Every filter, on its first page and deep in the trail.
    assert sum(row["target"] == "<= 15 ms" for row in results) == 12
    for row in results:
        assert math.isfinite(row["figure"]) and row["figure"] >= 0, row
        if row["target"].startswith(">="):
            assert row["baseline"] > 0, row
        assert row["scenario"] in printed
