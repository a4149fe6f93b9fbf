"""The sweeper (domain layer): a background task of every deploy_svc process, a use
case of its own that opens its own units of work.

Every SWEEP_INTERVAL_S it fails running stages past their timeout_seconds
(deploy_svc.deployments.fail_timed_out_stages) and writes down the weakening policy
changes whose time has come (deploy_svc.policies.apply_due_changes; the rules already
read them as in force), deletes request ids past their lifetime (purge_request_ids) and
webhook events dispatched a day ago (purge_webhook_events),
all safe with several replicas sweeping at once, and, when the process serves metrics,
refreshes the `relman_deployments` gauge (how many deployments the database holds in
each status).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import func, select

from deploy_svc import events
from deploy_svc.deployments import fail_timed_out_stages
from deploy_svc.policies import apply_due_changes
from shared.framework.observability import gauge, serving_metrics
from shared.persistence import idempotency
from shared.persistence.db import Database
from shared.persistence.models import Deployment, DeploymentStatus

DEPLOYMENTS = gauge("relman_deployments", "Deployments in the database, by status.", ("status",))

log = logging.getLogger("relman.sweeper")

SWEEP_INTERVAL_S = 2.0
# Request ids deleted per transaction, and transactions per sweep: a backlog (a day's
# keys of a busy service) goes over several sweeps, never in one long transaction.
PURGE_BATCH = 1000
PURGE_BATCHES_PER_SWEEP = 10


async def sweep_forever(database: Database) -> None:
    while True:
        try:
            async with database.transaction(deadline_s=30) as session:
                failed = await fail_timed_out_stages(session)
            if failed:
                log.info("failed %d timed-out stage(s)", failed)
            async with database.transaction(deadline_s=30) as session:
                applied = await apply_due_changes(session)
            if applied:
                log.info("%d environment policy change(s) took effect", applied)
            await purge_request_ids(database)
            await purge_webhook_events(database)
            if serving_metrics():
                await count_deployments(database)
        except Exception:  # the database may be away; the next sweep tries again
            log.warning("stage sweep failed", exc_info=True)
        await asyncio.sleep(SWEEP_INTERVAL_S)


async def purge_request_ids(database: Database) -> int:
    """Deletes request ids older than their lifetime (idempotency.KEPT_FOR); returns how
    many. One replica purges at a time (idempotency.purge)."""
    return await _purge_in_batches(database, idempotency.purge)


async def purge_webhook_events(database: Database) -> int:
    """Deletes webhook events dispatched more than a day ago (events.KEPT_FOR); returns how
    many."""
    return await _purge_in_batches(database, events.purge)


async def _purge_in_batches(database: Database, purge) -> int:
    """`purge(session, PURGE_BATCH)` a transaction at a time, at most PURGE_BATCHES_PER_SWEEP
    times: a backlog goes over several sweeps, never in one long transaction."""
    purged = 0
    for _ in range(PURGE_BATCHES_PER_SWEEP):
        async with database.transaction(deadline_s=30) as session:
            batch = await purge(session, PURGE_BATCH)
        purged += batch
        if batch < PURGE_BATCH:
            break
    return purged


async def count_deployments(database: Database) -> None:
    """The `relman_deployments` gauge, from the database (only when metrics are served)."""
    async with database.read(deadline_s=10) as session:
        counts = dict(
            (await session.execute(
                select(Deployment.status, func.count()).group_by(Deployment.status)
            )).all()
        )  # fmt: skip
    for status in DeploymentStatus:
        DEPLOYMENTS.labels(status.value).set(counts.get(status.value, 0))


def start(database: Database):
    """Starts the sweeper; returns the coroutine function that stops it."""
    task = asyncio.create_task(sweep_forever(database))

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return stop
