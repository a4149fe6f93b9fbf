"""`python -m bench --compare REF [--rounds N] [--quick]` (make bench COMPARE=REF): the
lifecycle and LogAction scenarios of this tree and of a scratch checkout of REF, in one run.

Each tree runs its own bench (`python -m bench --only ...`) in a process of its own, with
its own services, migrations and scratch database, all on one PostgreSQL server (the
embedded one, started here, unless DATABASE_URL is set). The trees take turns, REF first,
ROUNDS times, so that the machine's drift and noise fall on both; each figure is the mean
over the rounds, and a row per figure gives this tree's over REF's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.report import Result, at_least, info, mean_of, table
from shared import PROJECT_ROOT
from shared.persistence.db import describe, libpq_dsn
from tests.harness import server_url

COMPARED = ("lifecycles", "log_action")
DEFAULT_ROUNDS = 2
DEFAULT_OUTPUT = Path(__file__).parent / "results-compare.json"
CURRENT = "working tree"
# The target: this tree runs at least twice the lifecycles per second of REF.
LIFECYCLES = "Promote + 5 x 2 UpdatePipelineStage + GetDeployment(FULL), 16 in flight: lifecycles/s"
LIFECYCLES_TARGET = 2
# A row count in a figure's name that differs from run to run (LogAction's seal lag).
RUN_ROWS = re.compile(r"(?<= of its )[\d,]+ rows")


class CompareError(RuntimeError):
    pass


def _git(*args: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=PROJECT_ROOT, check=False, **options)


def resolve(ref: str) -> str:
    """The commit `ref` names in this repository."""
    found = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", capture_output=True)
    if found.returncode != 0:
        raise CompareError(f"bench: {ref!r} names no commit in {PROJECT_ROOT}")
    return found.stdout.decode().strip()


def check_out(commit: str, directory: Path) -> None:
    """The commit's files in `directory` (git archive, so the repository's own work tree
    and index stay as they are), with its protos generated as `make protos` does."""
    with subprocess.Popen(
        ["git", "archive", "--format=tar", commit], cwd=PROJECT_ROOT, stdout=subprocess.PIPE
    ) as archive:
        extracted = subprocess.run(
            ["tar", "-x", "-C", str(directory)], stdin=archive.stdout, check=False
        )
        archive.stdout.close()
    if archive.returncode or extracted.returncode:
        raise CompareError(f"bench: could not extract {commit} into {directory}")
    protos = sorted(
        str(p.relative_to(directory)) for p in directory.glob("protos/relman/v1/*.proto")
    )
    if not protos:
        raise CompareError(f"bench: {commit} has no protos/relman/v1/*.proto")
    (directory / "relman" / "v1").mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos", "--python_out=.",
         "--pyi_out=.", "--grpc_python_out=.", *protos],
        cwd=directory,
        check=True,
    )  # fmt: skip
    for package in ("relman", "relman/v1"):
        (directory / package / "__init__.py").touch()


def run_tree(
    tree: Path, label: str, database: str, output: Path, quick: bool, only: list[str]
) -> list[Result]:
    """The tree's own bench of the `only` scenarios, its packages first on the path (the
    editable install's finder comes after it), on server `database`; its rows, named
    alike from run to run (RUN_ROWS)."""
    print(f"bench: {label} ({tree})", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "bench", "--output", str(output)]
    command += [arg for name in only for arg in ("--only", name)]
    command += ["--quick"] if quick else []
    env = {**os.environ, "PYTHONPATH": str(tree), "DATABASE_URL": database}
    ran = subprocess.run(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, check=False)
    if ran.returncode != 0:
        raise CompareError(f"bench: the bench of {label} exited with {ran.returncode}")
    rows = [Result(**row) for row in json.loads(output.read_text())]
    return [dataclasses.replace(r, scenario=RUN_ROWS.sub("rows", r.scenario)) for r in rows]


def combine(ref: str, rounds: dict[str, list[list[Result]]]) -> list[Result]:
    """Per figure, in the current tree's order (then REF's figures it lacks): REF's mean,
    this tree's, and this tree's over REF's."""
    means = {
        label: {
            name: mean_of([row for run in runs for row in run if row.scenario == name])
            for name in dict.fromkeys(row.scenario for run in runs for row in run)
        }
        for label, runs in rounds.items()
    }
    names = dict.fromkeys([*means[CURRENT], *means[ref]])
    results = []
    for name in names:
        theirs, ours = means[ref].get(name), means[CURRENT].get(name)
        for label, row in ((ref, theirs), (CURRENT, ours)):
            if row is not None:
                results.append(dataclasses.replace(row, scenario=f"[{label}] {name}"))
        if theirs is not None and ours is not None:
            versus = f"[{CURRENT} / {ref}] {name}"
            if name == LIFECYCLES:
                results.append(at_least(versus, ours.figure, theirs.figure, LIFECYCLES_TARGET))
            else:
                results.append(info(versus, ours.figure, theirs.figure))
    return results


def run(ref: str, rounds: int, quick: bool, output: Path | None, only: list[str] | None) -> int:
    commit = resolve(ref)
    only = only or list(COMPARED)
    output = output or DEFAULT_OUTPUT
    database = os.environ.get("DATABASE_URL", "").strip()
    server = server_url()  # the embedded server, up while this process is, unless set
    database = database or libpq_dsn(server)
    print(
        f"bench: {CURRENT} against {ref} ({commit[:12]}), {rounds} round(s) of"
        f" {', '.join(only)}, {'quick' if quick else 'full'}, on {os.cpu_count()} cores,"
        f" {describe(server)}",
        file=sys.stderr,
        flush=True,
    )
    per_round: dict[str, list[list[Result]]] = {ref: [], CURRENT: []}
    with tempfile.TemporaryDirectory(prefix="relman-bench-compare-") as scratch:
        checkout = Path(scratch) / "tree"
        checkout.mkdir()
        check_out(commit, checkout)
        trees = ((ref, checkout), (CURRENT, PROJECT_ROOT))
        for n in range(rounds):
            for i, (label, tree) in enumerate(trees):
                rows = run_tree(
                    tree,
                    f"round {n + 1} of {rounds}, {label}",
                    database,
                    Path(scratch) / f"round-{n}-tree-{i}.json",
                    quick,
                    only,
                )
                per_round[label].append(rows)
    results = combine(ref, per_round)
    print(table(results))
    document = {
        "ref": ref,
        "commit": commit,
        "current": CURRENT,
        "rounds": rounds,
        "quick": quick,
        "results": [dataclasses.asdict(r) for r in results],
        "per_round": {
            label: [[dataclasses.asdict(r) for r in run] for run in runs]
            for label, runs in per_round.items()
        },
    }
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"bench: wrote {output}", file=sys.stderr)
    return 0
