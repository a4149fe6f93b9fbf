"""`make run`: migrate, seed when it is safe, then run both services until Ctrl-C.

Dev tools, never imported by a service. With DATABASE_URL unset this process starts
the embedded PostgreSQL and keeps it up while the services run. Migrations and the
seed run as the schema's owner (MIGRATION_DATABASE_URL, else DATABASE_URL, else the
embedded owner role); the services get only DATABASE_URL (the embedded runtime role
by default), never the owner's URL. The sample users (published password) are seeded
into the embedded database (unless SEED=0), or anywhere with SEED=1; with
DATABASE_URL set and no SEED=1 nothing is seeded (`python -m shared.identity.users
create-admin` makes the first admin). The services listen on loopback unless
DEPLOY_SVC_ADDR / AUDIT_SVC_ADDR say otherwise.

SIGINT or SIGTERM is passed on to the services, which stop gracefully; if one of
them exits on its own (a port in use, say), the other is stopped too and the exit code is
the first one's (1 if it was 0), or a later non-zero code of the one stopped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from shared import PROJECT_ROOT
from shared.devtools.seed import SeedError, seed
from shared.framework.config import ConfigError, Settings, env_flag
from shared.persistence import schema
from shared.persistence.db import (
    DatabaseUrlError,
    database_url,
    describe,
    libpq_dsn,
    migration_database_url,
)

SERVICES = ("deploy_svc", "audit_svc")
LOOPBACK = {"DEPLOY_SVC_ADDR": "127.0.0.1:50051", "AUDIT_SVC_ADDR": "127.0.0.1:50052"}


def main() -> int:
    """Settings, migration, seed, then the services until they stop; the exit code.

    One piece, read top to bottom: the signal handler and the wait loop at its end share
    the children and the `stopping` flag."""
    embedded = not os.environ.get("DATABASE_URL", "").strip()
    try:
        Settings.from_env()  # refuse bad settings before starting anything
        seeding = env_flag("SEED", embedded)
        url, owner = database_url(), migration_database_url()
    except (ConfigError, DatabaseUrlError) as exc:
        print(f"relman: {exc}", file=sys.stderr)
        return 2
    print(f"relman: migrating the {describe(owner)}", file=sys.stderr, flush=True)
    schema.upgrade(owner, runtime_role=schema.runtime_role(owner, url))
    if seeding:
        try:
            added = asyncio.run(seed(owner))
        except SeedError as exc:
            print(f"relman: {exc}", file=sys.stderr)
            return 2
        said = "seeded the sample data" if added else "already seeded"
    else:
        said = "did not seed the sample users (DATABASE_URL is set; SEED=1 seeds them)"
    print(
        f"relman: {said}; starting deploy_svc and audit_svc (Ctrl-C stops both)",
        file=sys.stderr,
        flush=True,
    )

    env = {**os.environ, "DATABASE_URL": libpq_dsn(url)}
    for name, address in LOOPBACK.items():  # unset or blank: loopback, not every address
        if not env.get(name, "").strip():
            env[name] = address
    env.pop("MIGRATION_DATABASE_URL", None)  # the services never hold the owner's URL
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
