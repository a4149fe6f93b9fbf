"""The structure docs/architecture.md describes, checked against the code.

Each check is one a newcomer relies on: the layout block names every module that
exists (and none that does not), the two services never import each other, no
service imports the developer tools, servicers never open a unit of work, and
nothing cites a file outside the repository.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shared import PROJECT_ROOT

ARCHITECTURE = PROJECT_ROOT / "docs" / "architecture.md"
PACKAGES = ("deploy_svc", "audit_svc", "shared")
TRANSPORT = ("deploy_svc/servicer.py", "deploy_svc/auth_servicer.py", "audit_svc/servicer.py")


def _modules() -> set[str]:
    """Every Python module of the three packages, as a path relative to the project."""
    return {
        str(path.relative_to(PROJECT_ROOT))
        for package in PACKAGES
        for path in (PROJECT_ROOT / package).rglob("*.py")
        if path.name != "__init__.py"
    }


def _layout_block() -> str:
    text = ARCHITECTURE.read_text()
    return text.split("## Layout", 1)[1].split("```", 2)[1]


def _documented_modules() -> set[str]:
    """The modules the layout block names, with their folders worked out from the indent."""
    found: set[str] = set()
    folders: list[tuple[int, str]] = []
    for line in _layout_block().splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        folders = [(i, f) for i, f in folders if i < indent]
        if name.endswith("/"):
            folders.append((indent, name))
        elif name.endswith(".py"):
            found.add("".join(f for _, f in folders) + name)
    return {m for m in found if m.split("/")[0] in PACKAGES}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_layout_names_every_module_and_no_other():
    documented, actual = _documented_modules(), _modules()
    assert actual - documented == set(), "modules docs/architecture.md does not name"
    assert documented - actual == set(), "docs/architecture.md names modules that do not exist"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("deploy_svc", ("audit_svc", "shared.devtools")),
        ("audit_svc", ("deploy_svc", "shared.devtools")),
        ("shared/framework", ("deploy_svc", "audit_svc", "shared.devtools")),
        ("shared/persistence", ("deploy_svc", "audit_svc")),
        ("shared/identity", ("deploy_svc", "audit_svc", "shared.devtools")),
    ],
)
def test_imports_respect_the_boundaries(package, forbidden):
    offending = {
        f"{path.relative_to(PROJECT_ROOT)} imports {name}"
        for path in (PROJECT_ROOT / package).rglob("*.py")
        for name in _imports(path)
        if any(name == f or name.startswith(f"{f}.") for f in forbidden)
    }
    # The one exception: the embedded server is found lazily when no DATABASE_URL is set.
    offending.discard("shared/persistence/db.py imports shared.devtools")
    offending.discard("shared/persistence/db.py imports shared.devtools.embedded_pg")
    assert offending == set()


def test_what_the_services_import_is_a_runtime_dependency():
    """A container installs the project without its test extras: every third-party module
    the three packages import must come from a distribution [project] dependencies name."""
    declared = {
        re.split(r"[<>=~!\[; ]", requirement)[0].lower().replace("_", "-")
        for requirement in tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"][
            "dependencies"
        ]
    }
    distributions = importlib.metadata.packages_distributions()
    undeclared = set()
    for package in PACKAGES:
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            for name in _imports(path):
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in (*PACKAGES, "relman"):
                    continue
                found = {d.lower().replace("_", "-") for d in distributions.get(top, ())}
                if not found & declared:
                    undeclared.add(f"{path.relative_to(PROJECT_ROOT)} imports {top}")
    assert undeclared == set()


@pytest.mark.parametrize("servicer", TRANSPORT)
def test_servicers_open_no_unit_of_work(servicer):
    """The transaction rule: the use case owns its unit of work, never the transport."""
    source = (PROJECT_ROOT / servicer).read_text()
    assert not re.findall(r"database\.(transaction|read|autocommit_connection)\(", source)
    assert not re.findall(r"\bsession\b", source)


def test_nothing_cites_a_file_outside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    citing = [
        name
        for name in tracked
        if (PROJECT_ROOT / name).is_file()
        and name != "tests/test_layout.py"
        and "DESIGN.md" in (PROJECT_ROOT / name).read_text(errors="replace")
    ]
    assert citing == []


@pytest.mark.parametrize("config", ["docker/pgbouncer.ini", "docker/nginx.conf"])
def test_the_readme_shows_the_proxy_configurations_the_tests_run(config):
    """README's Operating relman shows each configuration verbatim: the file the tests
    start PgBouncer and nginx with, so what an operator copies is what was tested."""
    text = (PROJECT_ROOT / config).read_text()
    assert (
        f"```{'ini' if config.endswith('.ini') else 'nginx'}\n{text}```"
        in (PROJECT_ROOT / "README.md").read_text()
    )
