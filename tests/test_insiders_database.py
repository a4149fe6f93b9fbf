"""Insiders at the database and at start-up (issue: trust against insiders, 5 and 6).

- The services' own credentials cannot alter the audit trail: tried as that role,
  UPDATE, DELETE, TRUNCATE, ALTER TABLE ... DISABLE TRIGGER, DROP all fail.
- `make run` (embedded) and every test process run the services as a role that is
  not a superuser and owns no table.
- One all-powerful URL still starts, with a WARNING line and
  relman_audit_trail_protected 0 (1 with the two roles); REQUIRE_PROTECTED_TRAIL=1
  refuses to start.
- `make run` against a real database seeds no published password; the first
  admin comes from `python -m shared.identity.users create-admin`, password on stdin.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid

import asyncpg
import grpc
import pytest

from relman.v1 import auth_pb2, auth_pb2_grpc, common_pb2
from shared import PROJECT_ROOT
from shared.persistence.db import libpq_dsn
from shared.persistence.roles import OWNER_ROLE, RUNTIME_ROLE, trail_exposure
from tests.deploying import DEV, PROD, STAGING, deployed
from tests.harness import (
    RelmanProcess,
    client_address,
    env_for,
    fails,
    runtime_url,
    scrape_metrics,
    scratch_database,
    start_service,
)

TRAIL_GAUGE = ("relman_audit_trail_protected", frozenset())

# What someone holding the services' database credentials would try first.
TAMPERING = [
    "UPDATE audit_logs SET action = 'nothing' WHERE id = (SELECT id FROM audit_logs LIMIT 1)",
    "DELETE FROM audit_logs WHERE id = (SELECT id FROM audit_logs LIMIT 1)",
    "TRUNCATE audit_logs",
    "ALTER TABLE audit_logs DISABLE TRIGGER append_only",
    "ALTER TABLE audit_logs DISABLE TRIGGER ALL",
    "DROP TABLE audit_logs",
    "DROP TABLE audit_logs CASCADE",
    "DROP SCHEMA public CASCADE",
    "DROP TRIGGER append_only ON audit_logs",
    "CREATE OR REPLACE FUNCTION relman_audit_logs_append_only() RETURNS trigger"
    " LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
    "ALTER TABLE audit_logs RENAME TO audit_logs_old",
    f"GRANT {OWNER_ROLE} TO {RUNTIME_ROLE}",
    "SET ROLE postgres",
    # A backdated row, or objects that relman's own SQL (or the owner's migrations) could
    # pick up instead of the real ones.
    "INSERT INTO audit_logs (action, resource_type, created_at)"
    " VALUES ('approve', 'deployment', '2020-01-01')",
    "CREATE TABLE public.shadow (x int)",
    "CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT NULL::timestamptz'",
]


async def test_the_services_role_cannot_alter_the_trail(relman, db_url):
    """Attack 5: as the role the services connect with, every way to change or remove
    audit rows fails; it still appends and reads them."""
    connection = await asyncpg.connect(libpq_dsn(runtime_url(db_url)))
    try:
        assert await connection.fetchval("SELECT current_user") == RUNTIME_ROLE
        before = await connection.fetchval("SELECT count(*) FROM audit_logs")
        assert before > 0
        for statement in TAMPERING:
            try:
                await connection.execute(statement)
            except asyncpg.PostgresError as refused:
                assert refused.sqlstate == "42501", (statement, refused)  # no privilege
            else:
                pytest.fail(f"the services' role was allowed to run {statement}")
        assert await trail_exposure(connection) == []  # what each service checks at start
        # It may append (relman's own path) and read.
        await connection.execute(
            "INSERT INTO audit_logs (action, resource_type) VALUES ('test.append', 'test')"
        )
        assert await connection.fetchval("SELECT count(*) FROM audit_logs") == before + 1
    finally:
        await connection.close()


async def _services_roles(server, database: str) -> list[asyncpg.Record]:
    """Who the services' connections to `database` are, with what that role owns there."""
    connection = await asyncpg.connect(libpq_dsn(server.set(database=database)))
    try:
        return await connection.fetch(
            """
            SELECT a.application_name, a.usename, r.rolsuper, r.rolcreaterole,
                   (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'public' AND c.relowner = r.oid) AS owned
            FROM pg_stat_activity a JOIN pg_roles r ON r.rolname = a.usename
            WHERE a.datname = $1 AND a.application_name IN ('deploy_svc', 'audit_svc')
            """,
            database,
        )
    finally:
        await connection.close()


def _assert_runtime_role(rows) -> None:
    assert {row["application_name"] for row in rows} == {"deploy_svc", "audit_svc"}, rows
    for row in rows:
        assert row["usename"] == RUNTIME_ROLE, row
        assert not row["rolsuper"] and not row["rolcreaterole"] and row["owned"] == 0, row


async def test_the_test_servers_run_as_the_runtime_role(relman, server_url, db_url):
    """The services every other test talks to connect as the runtime role."""
    _assert_runtime_role(await _services_roles(server_url, db_url.database))


async def test_make_run_on_the_embedded_database_uses_the_runtime_role(server_url):
    """`make run` with DATABASE_URL unset (the newcomer's path): migrated and seeded as the
    owner, served as a role that is not a superuser and owns nothing; the trail gauge is 1."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "MIGRATION_DATABASE_URL")
    }
    env.update(DEPLOY_SVC_ADDR="127.0.0.1:0", AUDIT_SVC_ADDR="127.0.0.1:0", DEPLOY_METRICS_PORT="0")
    process = await RelmanProcess.start(["-m", "shared.devtools.run"], env)
    try:
        await process.wait_listening("deploy_svc", "audit_svc")
        assert "using the database relman on " in process.output
        assert "(socket)" in process.output
        assert "seeded" in process.output and "did not seed" not in process.output
        assert "can alter the audit trail" not in process.output
        from shared.devtools import embedded_pg
        from shared.persistence.db import normalize_url

        _assert_runtime_role(await _services_roles(normalize_url(embedded_pg.start()), "relman"))
        assert (await scrape_metrics(process))[TRAIL_GAUGE] == 1
    finally:
        assert await process.stop() == 0, process.output


async def test_one_all_powerful_url_warns_and_reports_an_unprotected_trail(server_url, db_url):
    """DATABASE_URL of a role that could rewrite the trail (the server's superuser): the
    service starts, logs one WARNING naming what the role can do, exports 0; with
    REQUIRE_PROTECTED_TRAIL=1 it refuses to start (exit 2)."""
    one_url = {"DATABASE_URL": libpq_dsn(db_url), "MIGRATION_DATABASE_URL": ""}
    exposed = await start_service(db_url, "deploy_svc", DEPLOY_METRICS_PORT="0", **one_url)
    try:
        warning = await exposed.wait_for_line("can alter the audit trail")
        assert "WARNING" in warning and "superuser" in warning, warning
        assert (await scrape_metrics(exposed))[TRAIL_GAUGE] == 0
    finally:
        assert await exposed.stop() == 0, exposed.output

    protected = await start_service(db_url, "audit_svc", AUDIT_METRICS_PORT="0")
    try:
        assert (await scrape_metrics(protected))[TRAIL_GAUGE] == 1
        assert "can alter the audit trail" not in protected.output
    finally:
        assert await protected.stop() == 0, protected.output

    refused = await RelmanProcess.start(
        ["-m", "audit_svc"],
        env_for(db_url, AUDIT_SVC_ADDR="127.0.0.1:0", REQUIRE_PROTECTED_TRAIL="1", **one_url),
    )
    assert await refused.wait(60) == 2
    assert "REQUIRE_PROTECTED_TRAIL" in refused.output

    # LISTEN on a URL of its own (PgBouncer set-ups) is checked too: the superuser there
    # is a superuser in the process all the same.
    listening = await start_service(
        db_url, "deploy_svc", DEPLOY_METRICS_PORT="0", DATABASE_LISTEN_URL=libpq_dsn(db_url)
    )
    try:
        warning = await listening.wait_for_line("can alter the audit trail")
        assert "(DATABASE_LISTEN_URL)" in warning and "(DATABASE_URL)" not in warning, warning
        assert (await scrape_metrics(listening))[TRAIL_GAUGE] == 0
    finally:
        assert await listening.stop() == 0, listening.output


async def test_a_half_set_up_database_stops_with_one_line(server_url):
    """MIGRATION_DATABASE_URL without DATABASE_URL would migrate and seed one database
    and serve another (the embedded one): refused. A service on a database that was
    never migrated says so in one line, exit 2."""
    async with scratch_database(server_url, revision=None) as url:
        env = env_for(url)
        del env["DATABASE_URL"]
        run = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "shared.devtools.run"],
            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert run.returncode == 2, run.stderr
        assert "MIGRATION_DATABASE_URL is set but DATABASE_URL is not" in run.stderr
        bare = await RelmanProcess.start(
            ["-m", "audit_svc"], env_for(url, AUDIT_SVC_ADDR="127.0.0.1:0")
        )
        assert await bare.wait(60) == 2
        assert "migrate it first" in bare.output and "Traceback" not in bare.output


async def test_plaintext_on_a_non_loopback_address_warns(db_url):
    """Tokens and passwords would cross the network in clear: said at start-up."""
    wide = await RelmanProcess.start(
        ["-m", "audit_svc"], env_for(db_url, AUDIT_SVC_ADDR="0.0.0.0:0")
    )
    try:
        await wide.wait_listening("audit_svc")
        line = await wide.wait_for_line("without TLS")
        assert "WARNING" in line and "in clear" in line
    finally:
        assert await wide.stop() == 0
    local = await start_service(db_url, "audit_svc")  # 127.0.0.1
    try:
        assert "without TLS" not in local.output
    finally:
        assert await local.stop() == 0


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


async def test_make_run_on_a_real_database_seeds_no_published_password(server_url):
    """Attack 6: `DATABASE_URL=<a real database> make run` used to seed eight accounts
    whose password is published. Now it migrates and serves (on loopback), says it did
    not seed, and nobody can log in until `shared.identity.users create-admin` makes an admin."""
    if not (_port_free(50051) and _port_free(50052)):
        pytest.skip("make run's default ports are in use on this machine")
    async with scratch_database(server_url, revision=None) as url:
        env = env_for(url)
        for name in ("DEPLOY_SVC_ADDR", "AUDIT_SVC_ADDR", "SEED"):
            env.pop(name, None)
        process = await RelmanProcess.start(["-m", "shared.devtools.run"], env)
        try:
            addresses = await process.wait_listening("deploy_svc", "audit_svc")
            assert addresses == {"deploy_svc": "127.0.0.1:50051", "audit_svc": "127.0.0.1:50052"}
            assert "did not seed the sample users" in process.output
            async with grpc.aio.insecure_channel(client_address(addresses["deploy_svc"])) as ch:
                auth = auth_pb2_grpc.AuthServiceStub(ch)
                for username in ("admin", "lena", "priya"):
                    login = auth_pb2.LoginRequest(username=username, password="password123")
                    await fails(auth.Login(login), grpc.StatusCode.UNAUTHENTICATED)

                username = f"ada-{uuid.uuid4().hex[:6]}"
                made = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "shared.identity.users", "create-admin",
                     "--username", username, "--email", f"{username}@example.com"],
                    input="a long passphrase\n", cwd=PROJECT_ROOT, env=env_for(url),
                    capture_output=True, text=True, timeout=60, check=False,
                )  # fmt: skip
                assert made.returncode == 0, made.stderr
                signed_in = await auth.Login(
                    auth_pb2.LoginRequest(username=username, password="a long passphrase")
                )
                assert signed_in.user.role == common_pb2.ROLE_ADMIN
        finally:
            assert await process.stop() == 0, process.output


def test_create_admin_takes_no_password_argument():
    """A password given as an argument would stay in the shell's history and in `ps`."""
    shown = subprocess.run(
        [sys.executable, "-m", "shared.identity.users", "create-admin", "--help"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--password" not in shown.stdout and "--username" in shown.stdout


async def test_the_services_role_cannot_run_a_deployment_without_its_votes(
    db_url, clients, service_id
):
    """With the services' own credentials, SQL that lets a production deployment run
    without the approvals its policy requires (moving it out of awaiting_approval,
    inserting one as succeeded, moving another environment's into production) is refused
    at commit by the database (23514), and its policy cannot be deleted; a vote that
    counts opens it."""
    lead, reviewer = clients["lead"], clients["reviewer"]
    release = await deployed(lead, service_id, "1.0.0", DEV, STAGING)
    waiting = await lead.PromoteRelease(release_id=release.id, target_environment_id=PROD)
    connection = await asyncpg.connect(libpq_dsn(runtime_url(db_url)))
    try:
        deployment_id = uuid.UUID(waiting.id)
        in_staging = await connection.fetchval(
            "SELECT id FROM deployments WHERE release_id = $1 AND environment_id = $2",
            uuid.UUID(release.id),
            uuid.UUID(STAGING),
        )
        attacks = [
            (  # staging's succeeded deployment moved into production: counted as one there
                "UPDATE deployments SET environment_id = $2 WHERE id = $1",
                (in_staging, uuid.UUID(PROD)),
            ),
            ("UPDATE deployments SET status = 'pending' WHERE id = $1", (deployment_id,)),
            (  # posing as a rollback's redeployment: known by its rollback row, not a flag
                "UPDATE deployments SET status = 'pending', is_rollback = true WHERE id = $1",
                (deployment_id,),
            ),
            (
                "INSERT INTO deployments (release_id, service_id, environment_id, status,"
                " deployed_by) SELECT release_id, service_id, environment_id, 'succeeded',"
                " deployed_by FROM deployments WHERE id = $1",
                (deployment_id,),
            ),
        ]
        for statement, arguments in attacks:
            with pytest.raises(asyncpg.CheckViolationError) as refused:
                async with connection.transaction():
                    if statement.startswith("INSERT"):  # the slot is taken: free it first
                        await connection.execute(
                            "UPDATE deployments SET status = 'cancelled' WHERE id = $1",
                            deployment_id,
                        )
                    await connection.execute(statement, *arguments)
            assert refused.value.constraint_name == "check_approvals", statement
        status = await connection.fetchval(
            "SELECT status FROM deployments WHERE id = $1", deployment_id
        )
        assert status == "awaiting_approval"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # nor switch the rule off
            await connection.execute(
                "DELETE FROM environment_policies WHERE environment_id = $1", uuid.UUID(PROD)
            )
    finally:
        await connection.close()
    await reviewer.ApproveDeployment(deployment_id=waiting.id)
    opened = await lead.GetDeployment(deployment_id=waiting.id)
    assert opened.status == common_pb2.DEPLOYMENT_STATUS_PENDING
