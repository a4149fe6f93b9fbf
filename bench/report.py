"""The benchmark's result rows: printed as one table and written as JSON."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Result:
    """One measured figure. `baseline` and `ratio` are None where no baseline applies;
    `met` is None for a figure reported without a target."""

    scenario: str
    figure: float
    baseline: float | None
    ratio: float | None
    target: str
    met: bool | None


def at_least(scenario: str, figure: float, baseline: float, target_ratio: float) -> Result:
    """A rate that must reach `target_ratio` times its baseline."""
    ratio = figure / baseline if baseline else 0.0
    return Result(scenario, figure, baseline, ratio, f">= {target_ratio}x", ratio >= target_ratio)


def at_most_ratio(scenario: str, figure: float, baseline: float, target_ratio: float) -> Result:
    """A latency that may be at most `target_ratio` times its baseline."""
    ratio = figure / baseline if baseline else float("inf")
    return Result(scenario, figure, baseline, ratio, f"<= {target_ratio}x", ratio <= target_ratio)


def at_most(
    scenario: str, figure: float, limit: float, unit: str, baseline: float | None = None
) -> Result:
    """A figure under an absolute limit (a baseline, when given, is for context only)."""
    ratio = figure / baseline if baseline else None
    return Result(scenario, figure, baseline, ratio, f"<= {limit:g} {unit}", figure <= limit)


def at_least_figure(
    scenario: str, figure: float, floor: float, unit: str, baseline: float | None = None
) -> Result:
    """A figure that must reach an absolute floor (a baseline, when given, is for context
    only)."""
    ratio = figure / baseline if baseline else None
    return Result(scenario, figure, baseline, ratio, f">= {floor:,g} {unit}", figure >= floor)


def info(scenario: str, figure: float, baseline: float | None = None) -> Result:
    ratio = figure / baseline if baseline else None
    return Result(scenario, figure, baseline, ratio, "", None)


TARGET = re.compile(r"^(?P<side>>=|<=) (?P<limit>[\d,.]+)(?P<unit>x| .+)$")


def meets(target: str, figure: float, ratio: float | None) -> bool | None:
    """Whether a figure (its ratio, for a target in x) meets a target as the functions
    above write it; None for no target."""
    if not target:
        return None
    match = TARGET.match(target)
    if match is None:
        raise ValueError(f"a target of unknown form: {target!r}")
    value = ratio if match["unit"] == "x" else figure
    if value is None:
        return False
    limit = float(match["limit"].replace(",", ""))
    return value >= limit if match["side"] == ">=" else value <= limit


def mean_of(rows: list[Result]) -> Result:
    """Rows of one figure from several rounds as one: the mean figure over the mean
    baseline, held to the first row's target."""
    first = rows[0]
    figure = sum(r.figure for r in rows) / len(rows)
    baselines = [r.baseline for r in rows]
    baseline = None if None in baselines else sum(baselines) / len(baselines)
    ratio = None if first.ratio is None or not baseline else figure / baseline
    return Result(
        first.scenario, figure, baseline, ratio, first.target, meets(first.target, figure, ratio)
    )


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def table(results: list[Result]) -> str:
    header = ("scenario", "figure", "baseline", "ratio", "target", "met")
    rows = [
        (
            r.scenario,
            _number(r.figure),
            _number(r.baseline),
            "" if r.ratio is None else f"{r.ratio:.2f}x",
            r.target,
            {True: "yes", False: "NO", None: ""}[r.met],
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = (False, True, True, True, False, False)  # right-aligned columns

    def line(row) -> str:
        cells = zip(row, widths, numeric, strict=True)
        return " | ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in cells).rstrip()

    lines = [line(header), "-+-".join("-" * w for w in widths), *(line(row) for row in rows)]
    return "\n".join(lines)


def write_json(results: list[Result], path: Path) -> None:
    path.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
