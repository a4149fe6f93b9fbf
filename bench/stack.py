"""What every scenario runs against: a fresh database, both services as processes, tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from sqlalchemy import URL, select

from shared.db import Database
from shared.models import User
from shared.seed import seed
from shared.tokens import issue_token
from tests.harness import RelmanProcess, client_address, env_for, run_cli, scratch_database


@dataclass
class Stack:
    url: URL
    database: Database
    deploy: RelmanProcess
    audit: RelmanProcess
    deploy_channel: grpc.aio.Channel
    audit_channel: grpc.aio.Channel
    service_token: str  # ci-bot, a service user: may log on behalf of others
    admin_token: str

    def rss_bytes(self, process: RelmanProcess) -> int:
        """The resident memory of a service process now."""
        with open(f"/proc/{process.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")


async def _service(url: URL, module: str) -> RelmanProcess:
    env = env_for(url, DEPLOY_SVC_ADDR="127.0.0.1:0", AUDIT_SVC_ADDR="127.0.0.1:0")
    process = await RelmanProcess.start(["-m", module], env)
    await process.wait_listening(module)
    return process


@asynccontextmanager
async def running(server: URL) -> AsyncIterator[Stack]:
    """A seeded scratch database on `server` and both services on free ports."""
    async with scratch_database(server) as url:
        await seed(url)
        minted = await asyncio.to_thread(
            run_cli, url, "shared.tokens", "create", "--user", "ci-bot", "--name", "bench",
            "--service-user",
        )  # fmt: skip
        if minted.returncode != 0:
            raise RuntimeError(minted.stderr)
        database = Database(url, pool_size=8)
        async with database.transaction() as session:
            admin = await session.scalar(select(User).where(User.username == "admin"))
            admin_token, _ = await issue_token(session, admin, "bench", None)
        deploy, audit = await asyncio.gather(
            _service(url, "deploy_svc"), _service(url, "audit_svc")
        )
        try:
            async with (
                grpc.aio.insecure_channel(client_address(deploy.addresses["deploy_svc"])) as dch,
                grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as ach,
            ):
                yield Stack(
                    url, database, deploy, audit, dch, ach, minted.stdout.strip(), admin_token
                )
        finally:
            codes = await asyncio.gather(deploy.stop(), audit.stop())
            await database.dispose()
            if any(codes):
                raise RuntimeError(f"a service exited with {codes}:\n{audit.output}")
