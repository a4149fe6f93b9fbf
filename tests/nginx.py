"""nginx in front of two replicas of each service, as docker/nginx.conf describes it.

The tests and `make bench` start the real nginx of the distribution with that file,
its `{{...}}` ports filled in, in a directory of its own (`-p`): its pid, error log and
temporary files stay there, and it runs in the foreground (`daemon off`) as a child of
the test, so that it ends with it. Run as root, nginx's workers run as `nobody`.

Replicas are `python -m deploy_svc` / `python -m audit_svc` processes on ports fixed
at their first start, so that a replica SIGKILLed by a test comes back on the address
nginx knows (`Replicas.revive`).
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import URL

from shared import PROJECT_ROOT
from tests.harness import RelmanProcess, client_address, env_for, free_port, ipv6_loopback

NGINX_CONF = PROJECT_ROOT / "docker" / "nginx.conf"
# The address nginx connects to the replicas from (`grpc_bind` in docker/nginx.conf):
# what TRUSTED_PROXIES names, apart from the clients' 127.0.0.1 and ::1.
PROXY_ADDRESS = "127.0.0.2"
SERVICES = ("deploy_svc", "audit_svc")
READINESS = {"deploy_svc": "relman.v1.DeployService", "audit_svc": "relman.v1.AuditService"}
START_TIMEOUT_S = 30
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def nginx_binary() -> str | None:
    """nginx on the PATH, or in /usr/sbin and /sbin (where the distribution puts it and
    where a non-root PATH often does not look)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def require_nginx() -> str:
    """nginx's path, or the test is skipped saying why."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip(
            "nginx is not installed (not on PATH, nor in /usr/sbin or /sbin): the tests of"
            " relman behind a balancer did not run; `.ci/run` installs it as root"
        )
    return binary


def render(ports: dict[str, int], *, ipv6: bool = True) -> str:
    """docker/nginx.conf with its placeholders filled in (a placeholder without a value is
    an error, not an empty port); without IPv6 here, without its `[::1]` listeners."""
    text = _PLACEHOLDER.sub(lambda match: str(ports[match[1]]), NGINX_CONF.read_text())
    if not ipv6:
        text = "".join(line for line in text.splitlines(True) if "listen [::1]" not in line)
    return text


@dataclass
class Nginx:
    process: asyncio.subprocess.Process
    directory: Path
    ports: dict[str, int]  # deploy_svc / audit_svc -> the port nginx listens on
    ipv6: bool  # listening on ::1 too

    def address(self, service: str, *, ipv6: bool = False) -> str:
        """Where a client reaches `service` through nginx (IPv4 or IPv6 loopback); a test
        that needs IPv6 where there is none is skipped, saying so."""
        if ipv6 and not self.ipv6:
            pytest.skip("no IPv6 loopback (::1) here: the test needs a client on IPv6")
        host = "[::1]" if ipv6 else "127.0.0.1"
        return f"{host}:{self.ports[service]}"

    @property
    def output(self) -> str:
        return (self.directory / "error.log").read_text(errors="replace")

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: calls in flight finish
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def _command(binary: str, directory: Path) -> list[str]:
    directives = "daemon off;"
    if os.geteuid() == 0:  # `user` means something (and is allowed) only to root
        nobody = pwd.getpwnam("nobody")
        directives += f" user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
    return [binary, "-p", f"{directory}/", "-c", str(directory / "nginx.conf"), "-g", directives]


async def _serving(address: str, service: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=READINESS[service]), timeout=2
            )
        except grpc.aio.AioRpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def _prepare(replica_ports: dict[str, Sequence[int]], ipv6: bool) -> tuple[Path, dict[str, int]]:
    """nginx's directory with the filled-in configuration, and the ports it listens on."""
    directory = Path(tempfile.mkdtemp(prefix="relman-nginx-"))
    directory.chmod(0o755)  # workers (nobody, under root) find their temporary paths
    (directory / "tmp").mkdir()
    ports = {service: free_port(ipv6) for service in SERVICES}
    values = {
        "deploy_port": ports["deploy_svc"],
        "audit_port": ports["audit_svc"],
        **{
            f"{service.split('_')[0]}_{n}": port
            for service in SERVICES
            for n, port in enumerate(replica_ports[service], start=1)
        },
    }
    (directory / "nginx.conf").write_text(render(values, ipv6=ipv6))
    return directory, ports


async def _start_nginx(binary: str, replica_ports: dict[str, Sequence[int]]) -> Nginx:
    ipv6 = ipv6_loopback()
    directory, ports = _prepare(replica_ports, ipv6)
    log = os.open(directory / "error.log", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        process = await asyncio.create_subprocess_exec(
            *_command(binary, directory),
            cwd=directory,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    finally:
        os.close(log)
    nginx = Nginx(process, directory, ports, ipv6)
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            for service in SERVICES:
                # Polled: nginx says nothing when it is ready, and a replica's health
                # through it is the proof that matters.
                while not await _serving(nginx.address(service), service):
                    if process.returncode is not None:
                        raise RuntimeError(
                            f"nginx exited with {process.returncode}:\n{nginx.output}"
                        )
                    await asyncio.sleep(0.05)
    except BaseException:
        await nginx.stop()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return nginx


@asynccontextmanager
async def running_nginx(replica_ports: dict[str, Sequence[int]]) -> AsyncIterator[Nginx]:
    """nginx with docker/nginx.conf in front of `replica_ports` (service -> two ports),
    once both services answer SERVING through it; a port taken meanwhile by someone
    else is tried again with others."""
    binary = require_nginx()
    for attempt in range(3):
        try:
            nginx = await _start_nginx(binary, replica_ports)
            break
        except RuntimeError as error:
            if attempt == 2 or "Address already in use" not in str(error):
                raise
    try:
        yield nginx
    finally:
        await nginx.stop()
        shutil.rmtree(nginx.directory, ignore_errors=True)


@dataclass
class Replicas:
    """Two processes of each service on one database, on ports fixed at first start."""

    url: URL
    settings: dict[str, str]
    processes: dict[str, list[RelmanProcess]] = field(default_factory=dict)
    addresses: dict[str, list[str]] = field(default_factory=dict)  # 127.0.0.1:port

    def ports(self) -> dict[str, list[int]]:
        return {s: [int(a.rpartition(":")[2]) for a in self.addresses[s]] for s in SERVICES}

    def target(self, service: str) -> list[str]:
        """The replicas' addresses, for shared.client's per-call round robin."""
        return list(self.addresses[service])

    async def _start(self, service: str, address: str) -> RelmanProcess:
        env = env_for(
            self.url,
            **{
                "DEPLOY_SVC_ADDR": address,
                "AUDIT_SVC_ADDR": address,
                "DEPLOY_METRICS_PORT": "0",
                "AUDIT_METRICS_PORT": "0",
                **self.settings,
            },
        )
        process = await RelmanProcess.start(["-m", service], env)
        await process.wait_listening(service)
        return process

    async def start(self) -> None:
        for service in SERVICES:
            self.processes[service] = []
            self.addresses[service] = []
            for _ in range(2):
                process = await self._start(service, "127.0.0.1:0")
                self.processes[service].append(process)
                self.addresses[service].append(client_address(process.addresses[service]))

    async def kill(self, service: str, index: int) -> None:
        """SIGKILL: no drain, no goodbye; connections and transactions simply end."""
        process = self.processes[service][index]
        process.signal(signal.SIGKILL)
        await process.wait(30)

    async def revive(self) -> None:
        """Starts again, on its old address, every replica that is not running."""
        for service in SERVICES:
            for n, process in enumerate(self.processes[service]):
                if process.process.returncode is not None:
                    self.processes[service][n] = await self._start(
                        service, self.addresses[service][n]
                    )

    async def stop(self) -> list[int]:
        """Stops them all (SIGTERM); the exit codes of those that were still running."""
        running = [p for ps in self.processes.values() for p in ps if p.process.returncode is None]
        return list(await asyncio.gather(*(process.stop() for process in running)))


@asynccontextmanager
async def running_replicas(url: URL, **settings: str) -> AsyncIterator[Replicas]:
    """Two replicas of each service on database `url` with `settings` (and metrics on)."""
    replicas = Replicas(url, settings)
    try:
        await replicas.start()
        yield replicas
    finally:
        codes = await replicas.stop()
        if any(codes):
            outputs = "\n".join(p.output for ps in replicas.processes.values() for p in ps)
            raise RuntimeError(f"a replica exited with {codes}:\n{outputs}")
