"""The container files, checked against the settings the code reads.

No container engine runs where the tests run, so docker-compose.yml and the
Dockerfile are parsed and checked, not started: every setting they pass is one the
code reads and accepts, ports and health checks match the addresses, the services
start in the right order. The health-check command itself is run against the real
servers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import PurePosixPath

import yaml

from audit_svc.retention import parse_months
from audit_svc.signing_keys import retired_dir
from shared import PROJECT_ROOT
from shared.framework.config import Settings
from shared.persistence.db import normalize_url
from shared.persistence.roles import OWNER_ROLE, RUNTIME_ROLE
from tests.harness import client_address

COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
# Every environment variable the code reads: Settings' names, and DATABASE_URL.
READ = set(
    re.findall(
        r'reader\.\w+\(\s*"([A-Z_]+)"', (PROJECT_ROOT / "shared/framework/config.py").read_text()
    )
)
READ |= {"DATABASE_URL", "LOG_LEVEL"}
# The roles docker/postgres-init.sh creates: name -> (the psql variable holding its
# password, its CREATE ROLE line), and the environment variable behind each psql variable.
INIT_SCRIPT = (PROJECT_ROOT / "docker/postgres-init.sh").read_text()
INIT_ROLES = {
    name: (variable, line)
    for line in INIT_SCRIPT.splitlines()
    if (match := re.match(r"CREATE ROLE (\w+) LOGIN PASSWORD :'(\w+)';$", line))
    for name, variable in [match.groups()]
}
PSQL_VARIABLES = dict(re.findall(r'-v (\w+)="\$(\w+)"', INIT_SCRIPT))
# What compose's interpolation of ${NAME:?message} gives with the passwords set.
PASSWORDS = {"POSTGRES_PASSWORD": "s3", "RELMAN_OWNER_PASSWORD": "o1", "RELMAN_APP_PASSWORD": "a2"}


def interpolated(value) -> str:
    """`value` as compose passes it on; a reference without `:?` (no default refused when
    unset) would let a password go empty, so every reference must have one."""

    def one(match: re.Match) -> str:
        assert match[2], f"${{{match[1]}}} must be required (:?)"
        return PASSWORDS[match[1]]

    return re.sub(r"\$\{(\w+)(:\?[^}]*)?\}", one, str(value))


SVC = {"deploy_svc": ("DEPLOY", 50051, "relman.v1.DeployService"),
       "audit_svc": ("AUDIT", 50052, "relman.v1.AuditService")}  # fmt: skip


def test_postgres_16_with_a_named_volume_and_a_healthcheck():
    postgres = SERVICES["postgres"]
    assert postgres["image"] == "postgres:16"
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in COMPOSE["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    init = postgres["volumes"][1].split(":")
    assert init[0] == "./docker/postgres-init.sh"
    assert init[1].startswith("/docker-entrypoint-initdb.d/") and init[1].endswith(".sh")


def test_the_init_script_makes_the_two_roles_the_code_expects():
    """An owner and a runtime role, neither a superuser nor able to create roles, the
    relman database owned by the owner, and no password in the repository: each comes
    from an environment variable compose requires."""
    assert set(INIT_ROLES) == {OWNER_ROLE, RUNTIME_ROLE}
    for _, line in INIT_ROLES.values():
        assert not re.search(r"SUPERUSER|CREATEROLE|CREATEDB|BYPASSRLS", line), line
    assert f"CREATE DATABASE relman OWNER {OWNER_ROLE};" in INIT_SCRIPT
    postgres_env = SERVICES["postgres"]["environment"]
    for variable, _ in INIT_ROLES.values():
        source = PSQL_VARIABLES[variable]
        assert interpolated(postgres_env[source]) == PASSWORDS[source]
    assert interpolated(postgres_env["POSTGRES_PASSWORD"]) == PASSWORDS["POSTGRES_PASSWORD"]


def _url_of(environment: dict, name: str):
    url = normalize_url(interpolated(environment[name]))
    assert (url.host, url.database) == ("postgres", "relman")
    assert url.password == PASSWORDS[PSQL_VARIABLES[INIT_ROLES[url.username][0]]]
    return url


def test_migrate_runs_once_after_postgres_and_seeds_only_when_asked():
    migrate = SERVICES["migrate"]
    command = " ".join(migrate["command"])
    assert (
        "python -m shared.persistence.schema" in command
        and "python -m shared.devtools.seed" in command
    )
    # Migrations and the seed run as the owner; the grants go to the services' role.
    assert _url_of(migrate["environment"], "MIGRATION_DATABASE_URL").username == OWNER_ROLE
    assert _url_of(migrate["environment"], "DATABASE_URL").username == RUNTIME_ROLE
    assert '"$$SEED" = 1' in command  # $$: compose passes a literal $ to the shell
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert migrate["restart"] == "no" and migrate["build"] == "."


def test_each_service_gets_settings_the_code_reads_and_accepts():
    for name, (prefix, port, readiness) in SVC.items():
        service = SERVICES[name]
        env = {key: interpolated(value) for key, value in service["environment"].items()}
        assert set(env) <= READ, set(env) - READ
        settings = Settings.from_env(env)  # raises on any value the code refuses
        address = getattr(settings, f"{name.split('_')[0]}_addr")
        assert address.endswith(f":{port}") and f"{port}:{port}" in service["ports"]
        metrics = getattr(settings, f"{prefix.lower()}_metrics_port")
        assert f"{metrics}:{metrics}" in service["ports"]
        # The runtime role, never the owner's URL, and a refusal to start otherwise.
        assert _url_of(env, "DATABASE_URL").username == RUNTIME_ROLE
        assert "MIGRATION_DATABASE_URL" not in env
        assert settings.require_protected_trail
        assert service["command"] == ["python", "-m", name]
        assert service["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
        probe = service["healthcheck"]["test"]
        assert probe[-2:] == [f"localhost:{port}", readiness]
        grace = int(service["stop_grace_period"].rstrip("s"))
        assert grace > settings.shutdown_grace_s  # the process exits before it is killed


def test_retention_runs_only_when_asked_as_the_owner_with_settings_it_accepts():
    """`docker compose up` leaves it out (a profile); run, it is the owner, the one role
    that may drop a month, with a retention the command accepts and a mounted archive."""
    retention = SERVICES["retention"]
    assert retention["profiles"] == ["retention"]
    assert retention["command"] == ["python", "-m", "audit_svc.retention"]
    env = {key: interpolated(value) for key, value in retention["environment"].items()}
    assert set(env) == {"MIGRATION_DATABASE_URL", "AUDIT_RETENTION_MONTHS", "AUDIT_ARCHIVE_DIR"}
    assert _url_of(env, "MIGRATION_DATABASE_URL").username == OWNER_ROLE
    assert parse_months(env["AUDIT_RETENTION_MONTHS"]) == 12
    mounts = dict(volume.split(":")[::-1] for volume in retention["volumes"])
    assert env["AUDIT_ARCHIVE_DIR"] in mounts
    assert retention["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}


def test_audit_svc_keeps_its_signing_key_on_a_named_volume_its_replicas_share():
    """The key that signs audit seals is made at first start: on the container's own
    layer it would die with the container, and each replica would sign with a key of its
    own. It lives on a writable named volume (with its retired keys beside it), in a
    directory only the image's user may enter, and no other service mounts it."""
    key_file = _key_on_a_volume_of_its_own("audit_svc", "AUDIT_SIGNING_KEY_FILE")
    settings = Settings.from_env({"AUDIT_SIGNING_KEY_FILE": str(key_file)})
    assert str(settings.audit_signing_key_file) == str(key_file)
    assert PurePosixPath(retired_dir(key_file)).parent == key_file.parent


def test_deploy_svc_keeps_its_webhook_secret_key_on_a_named_volume_of_its_own():
    """The key that opens webhook secrets is made at first start: on the container's
    layer (the image's /app is not its user's to write) deploy_svc could not start, and
    replicas would each make their own."""
    key_file = _key_on_a_volume_of_its_own("deploy_svc", "WEBHOOK_SECRET_KEY_FILE")
    settings = Settings.from_env({"WEBHOOK_SECRET_KEY_FILE": str(key_file)})
    assert str(settings.webhook_secret_key_file) == str(key_file)


def _key_on_a_volume_of_its_own(service_name: str, variable: str) -> PurePosixPath:
    """The key file `variable` names for the service: an absolute path on a writable named
    volume no other service mounts, in a directory the image makes its user's, mode 0700
    (a new named volume copies it, owner and mode included); the image's default too."""
    own = SERVICES[service_name]
    key_file = PurePosixPath(own["environment"][variable])
    assert key_file.is_absolute()
    mounts = {target: (source, rest) for source, target, *rest in
              (volume.split(":") for volume in own["volumes"])}  # fmt: skip
    source, options = mounts[str(key_file.parent)]
    assert source in COMPOSE["volumes"] and "ro" not in options
    for name, service in SERVICES.items():
        if name != service_name:
            assert not any(v.startswith(f"{source}:") for v in service.get("volumes", [])), name
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)[-1]
    pattern = rf"install -d -m 0700 -o {user} -g {user} {re.escape(str(key_file.parent))}( \\)?\n"
    assert re.search(pattern, dockerfile), key_file.parent
    assert re.search(rf"{variable}={re.escape(str(key_file))}( \\)?\n", dockerfile), variable
    return key_file


def test_the_image_is_slim_non_root_with_generated_code_and_one_default_command():
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert "grpc_tools.protoc" in dockerfile  # the generated code is built in
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert 'CMD ["python", "-m", "deploy_svc"]' in dockerfile
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".data", "relman"} <= set(ignored)


def test_the_healthcheck_command_answers_for_the_real_servers(relman):
    def probe(*args: str) -> int:
        return subprocess.run(
            [sys.executable, "-m", "shared.framework.healthcheck", *args],
            cwd=PROJECT_ROOT,
            capture_output=True,
            timeout=30,
            check=False,
        ).returncode

    deploy = client_address(relman.addresses["deploy_svc"])
    audit = client_address(relman.addresses["audit_svc"])
    assert probe(deploy, "relman.v1.DeployService") == 0
    assert probe(audit, "relman.v1.AuditService") == 0
    assert probe(audit) == 0  # liveness
    assert probe(deploy, "relman.v1.NoSuchService") == 1
    assert probe("127.0.0.1:1", "") == 1  # nothing listens
