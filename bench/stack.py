"""What every scenario runs against: a fresh database, both services as processes, tokens."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from sqlalchemy import URL

from shared.devtools.seed import seed
from shared.persistence.db import Database
from tests.harness import (
    RelmanProcess,
    client_address,
    mint_tokens,
    scratch_database,
    start_service,
)


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

    def cpu_seconds(self, process: RelmanProcess) -> float:
        """The CPU time (user and system) a service process has used so far."""
        with open(f"/proc/{process.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self, process: RelmanProcess) -> int:
        """The resident memory of a service process now."""
        with open(f"/proc/{process.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")


@asynccontextmanager
async def running(server: URL) -> AsyncIterator[Stack]:
    """A seeded scratch database on `server` and both services on free ports."""
    async with scratch_database(server) as url:
        await seed(url)
        tokens = await mint_tokens(url, ["admin"], "bench")
        database = Database(url, pool_size=8)
        deploy, audit = await asyncio.gather(
            start_service(url, "deploy_svc"), start_service(url, "audit_svc")
        )
        try:
            async with (
                grpc.aio.insecure_channel(client_address(deploy.addresses["deploy_svc"])) as dch,
                grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as ach,
            ):
                yield Stack(
                    url, database, deploy, audit, dch, ach, tokens["ci-bot"], tokens["admin"]
                )
        finally:
            codes = await asyncio.gather(deploy.stop(), audit.stop())
            await database.dispose()
            if any(codes):
                raise RuntimeError(f"a service exited with {codes}:\n{audit.output}")
