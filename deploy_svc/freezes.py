"""Freeze windows (domain layer): times in which deployments into a scope are refused.

A window is one-off (start_time to end_time) or recurring: each occurrence starts when
its cron expression (five fields) matches the wall clock of its IANA time zone, and
lasts duration_minutes of real time, so a daily 22:00 window in Europe/Berlin starts at
21:00 UTC in winter and 20:00 UTC in summer (cronsim does the calendar, zoneinfo the
zone). A window's scope is an environment or all of them, a service or all of them.

Leads and admins create windows; only admins delete them, so a lead can stop
deployments but not lift a stop. Who may pass a window, and when, is decided by the
promotion gates (deploy_svc.gates) and the in-flight rule (deploy_svc.deployments).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from types import SimpleNamespace
from zoneinfo import ZoneInfo, available_timezones

import asyncpg
from cronsim import CronSim, CronSimError
from sqlalchemy import and_, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from deploy_svc import events
from deploy_svc.events import EventType
from shared.framework.errors import FailedPrecondition, InvalidArgument
from shared.framework.validation import text as text_field
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.db import Database, driver_connection, load
from shared.persistence.idempotency import RequestKey, remember, replay
from shared.persistence.models import Environment, FreezeWindow, Service
from shared.persistence.pagination import decode_token, encode_token, page_size

MAX_DURATION_MINUTES = 44_640  # 31 days
REASON_MAX = 1000
CRON_MAX = 200
# Times a window (and active_at) may name: far enough for any plan, and clear of the
# ends of the calendar, where the database's timestamps become +-infinity.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
# Names zoneinfo accepts that are no place: the server host's zone, and tz's internals.
_NOT_ZONES = {"localtime", "posixrules", "Factory"}


def _now() -> datetime:
    return datetime.now(UTC)


def occurrence_at(window: FreezeWindow, at: datetime) -> tuple[datetime, datetime] | None:
    """The (start, end) of the occurrence of `window` in force at `at`, or None.

    For a recurring window, the latest start at or before `at` decides: every earlier one
    ended no later, since all last the same."""
    if window.cron is None:
        return (
            (window.start_time, window.end_time)
            if window.start_time <= at < window.end_time
            else None
        )
    start = _latest_start(window.cron, window.time_zone, at)
    end = start + timedelta(minutes=window.duration_minutes)  # real minutes, not wall clock
    return (start, end) if start <= at < end else None


# (cron, zone) -> (latest start, the start after it): every deploy asks for the same
# windows at nearly the same instant, and walking the calendar with cronsim cost most of
# the freeze gate's CPU (make bench, check_promotion).
_STARTS: dict[tuple[str, str], tuple[datetime, datetime]] = {}
_STARTS_MAX = 4096


def _latest_start(cron: str, time_zone: str, at: datetime) -> datetime:
    """The latest start of an occurrence at or before `at`, in UTC."""
    key = (cron, time_zone)
    known = _STARTS.get(key)
    if known is not None and known[0] <= at < known[1]:
        return known[0]
    zone = ZoneInfo(time_zone)
    # cronsim's reverse walk starts strictly before its datetime: one second on, so that
    # an occurrence starting exactly at `at` counts.
    local = at.astimezone(zone).replace(microsecond=0) + timedelta(seconds=1)
    start = next(CronSim(cron, local, reverse=True))
    following = next(CronSim(cron, start))  # strictly after it
    if len(_STARTS) >= _STARTS_MAX:
        _STARTS.clear()
    _STARTS[key] = (start.astimezone(UTC), following.astimezone(UTC))
    return _STARTS[key][0]


@dataclass(frozen=True)
class Frozen:
    """A window in force, and when its occurrence ends."""

    window: FreezeWindow
    ends_at: datetime

    def refusal(self, **metadata: str) -> FailedPrecondition:
        """DEPLOYMENT_FROZEN, naming the window, when it ends, and its reason."""
        until = timestamp_text(self.ends_at)
        return FailedPrecondition(
            f"deployments are frozen until {until}: {self.window.reason}",
            reason="DEPLOYMENT_FROZEN",
            metadata={"freeze_window_id": str(self.window.id), "ends_at": until, **metadata},
        )


def timestamp_text(moment: datetime) -> str:
    """RFC 3339 in UTC, as error metadata and gate details show times."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def check_instant(field: str, moment: datetime) -> datetime:
    if not EARLIEST <= moment < LATEST:
        raise InvalidArgument.field(field, "must be from 2000-01-01 to 2099-12-31 UTC")
    return moment


def _scope(environment_id: uuid.UUID | None, service_id: uuid.UUID | None) -> list:
    """Windows whose scope takes the environment and the service in."""
    conditions = []
    if environment_id is not None:
        conditions.append(
            or_(
                FreezeWindow.environment_id.is_(None), FreezeWindow.environment_id == environment_id
            )
        )
    if service_id is not None:
        conditions.append(
            or_(FreezeWindow.service_id.is_(None), FreezeWindow.service_id == service_id)
        )
    return conditions


def _maybe_in_force(at: datetime):
    """One-off windows around `at`, and every recurring one (decided in Python)."""
    return or_(
        FreezeWindow.cron.is_not(None),
        and_(FreezeWindow.start_time <= at, FreezeWindow.end_time > at),
    )


def maybe_in_force(environment: str, service: str, at: str) -> str:
    """The query of the windows that may be in force at `at` over (`environment`,
    `service`), SQL expressions: one-off windows around it, and every recurring one
    (decided in Python, in_force_of), as _scope and _maybe_in_force say for the listing."""
    return f"""
    SELECT * FROM freeze_windows
    WHERE (environment_id IS NULL OR environment_id = {environment})
      AND (service_id IS NULL OR service_id = {service})
      AND (cron IS NOT NULL OR (start_time <= {at} AND end_time > {at}))"""


_MAYBE_IN_FORCE = maybe_in_force("$1", "$2", "$3")
WINDOW_COLUMNS = tuple(column.name for column in FreezeWindow.__table__.columns)


def in_force_of(windows, at: datetime) -> list[Frozen]:
    """Of `windows` (rows of maybe_in_force, or tuples of WINDOW_COLUMNS), those in force
    at `at`, the one ending last first."""
    found = []
    for row in windows:
        window = SimpleNamespace(
            **(
                row
                if isinstance(row, asyncpg.Record)
                else dict(zip(WINDOW_COLUMNS, row, strict=True))
            )
        )
        if (occurrence := occurrence_at(window, at)) is not None:
            found.append(Frozen(window, occurrence[1]))
    found.sort(key=lambda frozen: (frozen.ends_at, str(frozen.window.id)), reverse=True)
    return found


async def in_force(
    session: AsyncSession, environment_id: uuid.UUID, service_id: uuid.UUID, at: datetime
) -> list[Frozen]:
    """The windows covering (environment, service) at `at`, the one ending last first
    (plain rows on the unit of work's asyncpg connection)."""
    connection = await driver_connection(session)
    return in_force_of(await connection.fetch(_MAYBE_IN_FORCE, environment_id, service_id, at), at)


# -- creating, listing, deleting --------------------------------------------------------------


@dataclass(frozen=True)
class WindowRequest:
    """A CreateFreezeWindow request as the transport read it (timestamps None when unset)."""

    environment_id: uuid.UUID | None
    service_id: uuid.UUID | None
    reason: str
    start_time: datetime | None
    end_time: datetime | None
    cron: str
    time_zone: str
    duration_minutes: int
    key: RequestKey | None


def _check_form(request: WindowRequest) -> dict:
    """The window's columns, after checking it is one form or the other, and whole."""
    one_off = request.start_time is not None or request.end_time is not None
    recurring = bool(request.cron or request.time_zone or request.duration_minutes)
    if one_off and recurring:
        extra = "cron" if request.cron else "time_zone" if request.time_zone else "duration_minutes"
        raise InvalidArgument.field(
            f"freeze_window.{extra}",
            "a window is one-off (start_time, end_time) or recurring (cron, time_zone, "
            "duration_minutes), not both",
        )
    if one_off:
        if request.start_time is None or request.end_time is None:
            missing = "start_time" if request.start_time is None else "end_time"
            raise InvalidArgument.field(f"freeze_window.{missing}", "is required with the other")
        check_instant("freeze_window.start_time", request.start_time)
        check_instant("freeze_window.end_time", request.end_time)
        if request.end_time <= request.start_time:
            raise InvalidArgument.field("freeze_window.end_time", "must be after start_time")
        return {"start_time": request.start_time, "end_time": request.end_time}
    if not recurring:
        raise InvalidArgument.field(
            "freeze_window.start_time",
            "is required: give start_time and end_time, or cron, time_zone and duration_minutes",
        )
    return {
        "cron": _check_cron(request.cron),
        "time_zone": _check_time_zone(request.time_zone),
        "duration_minutes": _check_duration(request.duration_minutes),
    }


def _check_cron(expression: str) -> str:
    expression = " ".join(expression.split())
    if len(expression) > CRON_MAX:
        raise InvalidArgument.field("freeze_window.cron", f"at most {CRON_MAX} characters")
    if len(expression.split()) != 5:
        raise InvalidArgument.field(
            "freeze_window.cron",
            "must have five fields: minute hour day-of-month month day-of-week",
        )
    try:
        next(CronSim(expression, datetime.now(UTC)))
    except (CronSimError, StopIteration, ValueError) as exc:
        raise InvalidArgument.field(
            "freeze_window.cron", f"is not a cron expression: {exc}"
        ) from None
    return expression


@cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones() - _NOT_ZONES)


def _check_time_zone(name: str) -> str:
    """An IANA zone by name (not a directory of zones, not the server host's own)."""
    if not name:
        raise InvalidArgument.field("freeze_window.time_zone", "is required with cron")
    if name not in _zones():
        raise InvalidArgument.field(
            "freeze_window.time_zone", "is not an IANA time zone (e.g. Europe/Berlin)"
        )
    return name


def _check_duration(minutes: int) -> int:
    if not 1 <= minutes <= MAX_DURATION_MINUTES:
        raise InvalidArgument.field(
            "freeze_window.duration_minutes", f"must be from 1 to {MAX_DURATION_MINUTES}"
        )
    return minutes


async def create_window(database: Database, actor: Actor, request: WindowRequest) -> FreezeWindow:
    """Creates a window (a retried request_id returns the window it made, even once that
    window has ended)."""
    reason = text_field("freeze_window.reason", request.reason, REASON_MAX)
    columns = _check_form(request)
    async with database.transaction() as session:
        if earlier := await replay(session, request.key, FreezeWindow):
            return earlier
        if columns.get("end_time") is not None and columns["end_time"] <= _now():
            raise InvalidArgument.field("freeze_window.end_time", "is in the past")
        if request.environment_id is not None:
            await load(session, Environment, request.environment_id)
        if request.service_id is not None:
            await load(session, Service, request.service_id)
        window = FreezeWindow(
            environment_id=request.environment_id,
            service_id=request.service_id,
            reason=reason,
            created_by=actor.user_id,
            **columns,
        )
        session.add(window)
        await session.flush()
        await audit_log.append(
            session, actor, "freeze.create", "freeze_window", window.id, _described(window)
        )
        await remember(session, request.key, "freeze_window", window.id)
        await session.refresh(window)
        await events.resource_event(
            session, EventType.FREEZE_WINDOW_CREATED, window.service_id, "freeze_window", window
        )
        return window


def _described(window: FreezeWindow) -> dict:
    return {
        "environment_id": str(window.environment_id) if window.environment_id else None,
        "service_id": str(window.service_id) if window.service_id else None,
        "reason": window.reason,
        "start_time": window.start_time.isoformat() if window.start_time else None,
        "end_time": window.end_time.isoformat() if window.end_time else None,
        "cron": window.cron,
        "time_zone": window.time_zone,
        "duration_minutes": window.duration_minutes,
    }


async def delete_window(database: Database, actor: Actor, window_id: uuid.UUID) -> None:
    """Deletes a window; its audit row keeps what it was."""
    async with database.transaction() as session:
        window = await load(session, FreezeWindow, window_id, for_update=True)
        details = _described(window)
        await events.resource_event(
            session, EventType.FREEZE_WINDOW_DELETED, window.service_id, "freeze_window", window
        )
        await session.delete(window)
        await session.flush()
        await audit_log.append(session, actor, "freeze.delete", "freeze_window", window_id, details)


@dataclass(frozen=True)
class WindowPage:
    items: list[FreezeWindow]
    next_page_token: str


_SCAN = 500  # rows read at a time while filtering by active_at


async def list_windows(
    database: Database,
    *,
    environment_id: uuid.UUID | None,
    service_id: uuid.UUID | None,
    active_at: datetime | None,
    requested_page_size: int,
    page_token: str,
) -> WindowPage:
    """Windows oldest first on a (created_at, id) keyset; `active_at` is decided per row
    in Python (cron), reading on until the page is full or the windows run out."""
    size = page_size(requested_page_size)
    filters = {
        "environment_id": str(environment_id or ""),
        "service_id": str(service_id or ""),
        "active_at": active_at.isoformat() if active_at else "",
    }
    after = decode_token(page_token, filters) if page_token else None
    conditions = _scope(environment_id, service_id)
    if active_at is not None:
        conditions.append(_maybe_in_force(active_at))
    items: list[FreezeWindow] = []
    more = False
    async with database.replica_read() as session:
        while True:
            query = select(FreezeWindow).where(*conditions)
            if after is not None:
                query = query.where(tuple_(FreezeWindow.created_at, FreezeWindow.id) > after)
            rows = (
                await session.scalars(
                    query.order_by(FreezeWindow.created_at, FreezeWindow.id).limit(_SCAN)
                )
            ).all()
            for row in rows:
                after = (row.created_at, row.id)
                if active_at is None or occurrence_at(row, active_at) is not None:
                    if len(items) == size:
                        more = True
                        break
                    items.append(row)
            if more or len(rows) < _SCAN:
                break
    token = ""
    if more:
        last = items[-1]
        token = encode_token(last.created_at, last.id, filters)
    return WindowPage(items, token)
