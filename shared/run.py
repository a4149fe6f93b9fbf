"""`make run`: migrate, seed once, then run both services in the foreground until Ctrl-C.

With DATABASE_URL unset this process starts the embedded PostgreSQL and keeps it
up while the services run; both services get the resolved URL, and the
embedded server stops when this process exits. SIGINT or SIGTERM is passed on
to the services, which stop gracefully; if one of them exits on its own (a port
in use, say), the other is stopped too and its exit code is returned.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from shared import PROJECT_ROOT, schema
from shared.config import ConfigError, Settings
from shared.db import DatabaseUrlError, database_url, describe, libpq_dsn
from shared.seed import SeedError, seed

SERVICES = ("deploy_svc", "audit_svc")


def main() -> int:
    try:
        Settings.from_env()  # refuse bad settings before starting anything
        url = database_url()
    except (ConfigError, DatabaseUrlError) as exc:
        print(f"relman: {exc}", file=sys.stderr)
        return 2
    print(f"relman: migrating the {describe(url)}", file=sys.stderr, flush=True)
    schema.upgrade(url)
    try:
        added = asyncio.run(seed(url))
    except SeedError as exc:
        print(f"relman: {exc}", file=sys.stderr)
        return 2
    print(
        f"relman: {'seeded the sample data' if added else 'already seeded'};"
        " starting deploy_svc and audit_svc (Ctrl-C stops both)",
        file=sys.stderr,
        flush=True,
    )

    env = {**os.environ, "DATABASE_URL": libpq_dsn(url)}
    children = {
        subprocess.Popen([sys.executable, "-m", name], cwd=PROJECT_ROOT, env=env).pid: name
        for name in SERVICES
    }
    stopping = False

    def stop_children(signum=None, frame=None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, stop_children)
    signal.signal(signal.SIGTERM, stop_children)

    exit_code = 0
    while children:
        pid, status = os.wait()
        name = children.pop(pid, None)
        if name is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if not stopping:
            print(
                f"relman: {name} exited with code {code}; stopping the other service",
                file=sys.stderr,
                flush=True,
            )
            exit_code = code or 1
            stop_children()
        elif code != 0:
            exit_code = code
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
