"""A real PgBouncer in transaction mode in front of one database, for the tests and the bench.

`running_pgbouncer(url)` fills in docker/pgbouncer.ini (the configuration the README
shows) for the database `url` names, starts PgBouncer on a free port, waits until it
accepts connections and stops it after. `url_through` gives the same database through
it. Without a `pgbouncer` binary (on the PATH, or in an sbin directory, where the
distribution's package puts it) it raises PgBouncerMissing; the tests skip, saying so.

PgBouncer refuses to run as root. As root it runs as an unprivileged user (`-u`): the
owner of the server's socket directory when PostgreSQL is reached through a socket
(only that user may enter the embedded PostgreSQL's data directory), else `nobody`.
Its files live in a temporary directory that user can read.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import pwd
import shutil
import signal
import string
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sqlalchemy import URL

from shared import PROJECT_ROOT
from shared.persistence.roles import OWNER_ROLE, RUNTIME_ROLE
from tests.harness import free_port

CONFIG_TEMPLATE = PROJECT_ROOT / "docker" / "pgbouncer.ini"
ADMIN_USER = "pgbouncer"  # the admin console's user (SHOW POOLS, RECONNECT)
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
START_TIMEOUT_S = 15


class PgBouncerMissing(RuntimeError):
    """No pgbouncer binary on this machine."""


def find_pgbouncer() -> str:
    """The pgbouncer binary: on the PATH, else where the distribution's package puts it."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path=os.pathsep.join(SBIN))
    if found is None:
        raise PgBouncerMissing(
            "PgBouncer is not installed (no pgbouncer on the PATH nor in "
            + ", ".join(SBIN)
            + "): install the distribution's pgbouncer package to run this"
        )
    return found


@dataclass
class PgBouncer:
    process: asyncio.subprocess.Process
    port: int
    alias: str  # the database's name through PgBouncer
    directory: Path
    user: str | None  # whom it runs as (-u), None: as the caller

    def url_through(self, url: URL) -> URL:
        """`url`'s database (and role) through this PgBouncer."""
        return url.set(host="127.0.0.1", port=self.port, database=self.alias, query={})

    @property
    def log(self) -> str:
        return (self.directory / "pgbouncer.log").read_text(errors="replace")

    async def admin(self, command: str) -> list[dict[str, str]]:
        """Runs `command` (SHOW POOLS, RECONNECT ...) on PgBouncer's admin console; its rows.
        Through psql: the console speaks only the simple query protocol."""
        psql = shutil.which("psql")
        if psql is None:
            raise RuntimeError("PgBouncer's admin console is reached with psql, which is missing")
        process = await asyncio.create_subprocess_exec(
            psql, "-X", "--csv", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-p", str(self.port), "-U", ADMIN_USER, "-d", "pgbouncer", "-c", command,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"PgBouncer's console refused {command!r}: {err.decode()}")
        return list(csv.DictReader(io.StringIO(out.decode())))


def _run_as(host: str) -> str | None:
    """Whom PgBouncer runs as: None unless root; else the owner of the socket directory
    (a path host), or nobody."""
    if os.geteuid() != 0:
        return None
    if host.startswith("/"):
        owner = os.stat(host).st_uid
        if owner != 0:
            return pwd.getpwuid(owner).pw_name
    return "nobody"


def render_config(url: URL, *, listen_port: int, auth_file: Path, alias: str) -> str:
    """docker/pgbouncer.ini with its placeholders filled in for the database of `url`."""
    host = str(url.query.get("host") or url.host or "localhost")
    return string.Template(CONFIG_TEMPLATE.read_text()).substitute(
        alias=alias,
        host=host,
        port=url.port or 5432,
        dbname=url.database,
        listen_port=listen_port,
        auth_file=auth_file,
        admin_user=ADMIN_USER,
    )


@asynccontextmanager
async def running_pgbouncer(
    url: URL, roles: Sequence[str] = (RUNTIME_ROLE, OWNER_ROLE)
) -> AsyncIterator[PgBouncer]:
    """PgBouncer in front of `url`'s database, for clients logging in as `roles` (trust, as
    the tests' PostgreSQL trusts them); stopped after."""
    binary = find_pgbouncer()
    host = str(url.query.get("host") or url.host or "localhost")
    user = _run_as(host)
    directory = Path(tempfile.mkdtemp(prefix="relman-pgbouncer-"))
    process = None
    try:
        for _ in range(3):  # a free port may be taken before PgBouncer binds it
            port = free_port(ipv6=False)
            config, log = _prepare(directory, url, port, roles)
            with log:
                process = await asyncio.create_subprocess_exec(
                    binary, *(["-u", user] if user else []), str(config),
                    stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                )  # fmt: skip
            bouncer = PgBouncer(process, port, url.database, directory, user)
            if await _until_accepting(bouncer):
                break
        else:
            raise RuntimeError(f"PgBouncer did not start:\n{bouncer.log}")
        yield bouncer
    finally:
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def _prepare(directory: Path, url: URL, port: int, roles: Sequence[str]) -> tuple[Path, IO]:
    """Writes the configuration and the auth file, readable by whomever PgBouncer runs as;
    returns the configuration's path and its log file, open."""
    directory.chmod(0o755)
    auth_file = directory / "userlist.txt"
    auth_file.write_text("".join(f'"{role}" ""\n' for role in (*roles, ADMIN_USER)))
    config = directory / "pgbouncer.ini"
    config.write_text(render_config(url, listen_port=port, auth_file=auth_file, alias=url.database))
    for path in (auth_file, config):
        path.chmod(0o644)
    return config, open(directory / "pgbouncer.log", "wb")  # the caller closes it


async def _until_accepting(bouncer: PgBouncer) -> bool:
    """True once PgBouncer accepts connections on its port; False if it exited (the port
    was taken)."""
    async with asyncio.timeout(START_TIMEOUT_S):
        while bouncer.process.returncode is None:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", bouncer.port)
                writer.close()
                return True
            await asyncio.sleep(0.05)
    if "Address already in use" not in bouncer.log:
        raise RuntimeError(f"PgBouncer exited with {bouncer.process.returncode}:\n{bouncer.log}")
    return False
