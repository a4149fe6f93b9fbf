"""The one keyset paginator and page-token codec (AIP-158), used by every List RPC.

Pages walk `(created_at, id)` (newest first by default), never OFFSET, so a deep
page costs what the first does and rows inserted meanwhile neither repeat nor
shift the walk. The page token is opaque to callers: the last row's key plus a
fingerprint of the filters it was made for; a token that does not decode, or
that comes back with other filters, is INVALID_ARGUMENT. Lists in another order keep
the same token: a number (seal_number), or a tuple of ids (ListLiveDeployments walks
(service id, environment id)).

`total_size` is exact up to EXACT_TOTAL_LIMIT matches and PostgreSQL's planner
estimate above, so counting never costs more than a bounded scan, and no more than
a 1,000-row probe when the planner expects far more matches than the limit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ClauseElement, Executable, Select, and_, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute

from shared.framework.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
EXACT_TOTAL_LIMIT = 10_000
PROBE_LIMIT = 1_000
# An estimate this far above the limit is taken as it is: a planner off by 2x on an
# indexed equality is rare, and total_size may be an estimate (AIP-158).
ESTIMATE_TRUSTED_ABOVE = 2 * EXACT_TOTAL_LIMIT


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_page_token: str
    total_size: int


def page_size(requested: int) -> int:
    """0 means the default; above the maximum is capped (AIP-158); negative is refused."""
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _fingerprint(filters: Mapping[str, Any]) -> str:
    canonical = json.dumps(filters, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _pack(key: list, filters: Mapping[str, Any]) -> str:
    payload = {"k": key, "f": _fingerprint(filters)}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _refused() -> InvalidArgument:
    return InvalidArgument.field(
        "page_token", "is not a token this API returned", reason="INVALID_PAGE_TOKEN"
    )


def _unpack(token: str, filters: Mapping[str, Any]) -> list:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        key, fingerprint = payload["k"], payload["f"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise _refused() from None
    if not isinstance(key, list):
        raise _refused()
    if fingerprint != _fingerprint(filters):
        raise InvalidArgument.field(
            "page_token",
            "was made for other filters: repeat the first request's filters",
            reason="PAGE_TOKEN_FILTER_MISMATCH",
        )
    return key


def encode_token(created_at: datetime, row_id: uuid.UUID, filters: Mapping[str, Any]) -> str:
    return _pack([created_at.isoformat(), str(row_id)], filters)


def decode_token(token: str, filters: Mapping[str, Any]) -> tuple[datetime, uuid.UUID]:
    key = _unpack(token, filters)
    try:
        # In UTC, as encoded: a forged offset cannot carry it off the calendar.
        return datetime.fromisoformat(key[0]).astimezone(UTC), uuid.UUID(key[1])
    except (ValueError, IndexError, TypeError, OverflowError):
        raise _refused() from None


def encode_number_token(number: int, filters: Mapping[str, Any]) -> str:
    """A page token for lists in the order of a number (seal_number)."""
    return _pack([number], filters)


def decode_number_token(token: str, filters: Mapping[str, Any]) -> int:
    key = _unpack(token, filters)
    if len(key) != 1 or type(key[0]) is not int or not 0 < key[0] < 2**63:
        raise _refused()
    return key[0]


def encode_ids_token(ids: Sequence[uuid.UUID], filters: Mapping[str, Any]) -> str:
    """A page token for lists in the order of a tuple of ids (ListLiveDeployments: service,
    environment)."""
    return _pack([str(value) for value in ids], filters)


def decode_ids_token(token: str, filters: Mapping[str, Any], count: int) -> tuple[uuid.UUID, ...]:
    key = _unpack(token, filters)
    if len(key) != count:
        raise _refused()
    try:
        return tuple(uuid.UUID(value) for value in key)
    except (ValueError, TypeError, AttributeError):  # not text, or not a UUID's
        raise _refused() from None


async def paginate(
    session: AsyncSession,
    query: Select,
    *,
    created_at: InstrumentedAttribute,
    row_id: InstrumentedAttribute,
    filters: Mapping[str, Any],
    requested_size: int,
    page_token: str,
    newest_first: bool = True,
) -> Page:
    """One page of `query` (already filtered) in `(created_at, id)` order."""
    size = page_size(requested_size)
    page_query = query
    if page_token:
        last_created_at, last_id = decode_token(page_token, filters)
        after = tuple_(last_created_at, last_id)
        key = tuple_(created_at, row_id)
        # The row comparison alone prunes no partition (audit_logs is partitioned by
        # month): the plain bound on created_at, implied by it, lets a deep page skip
        # every month after (before) the token's instead of descending each one.
        page_query = page_query.where(
            and_(key < after, created_at <= last_created_at)
            if newest_first
            else and_(key > after, created_at >= last_created_at)
        )
    order = (created_at.desc(), row_id.desc()) if newest_first else (created_at, row_id)
    rows = list((await session.scalars(page_query.order_by(*order).limit(size + 1))).all())
    next_token = ""
    if len(rows) > size:
        rows = rows[:size]
        last = rows[-1]
        next_token = encode_token(getattr(last, created_at.key), getattr(last, row_id.key), filters)
    return Page(rows, next_token, await total_size(session, query))


async def total_size(session: AsyncSession, query: Select) -> int:
    """Exact up to EXACT_TOTAL_LIMIT matches; above it, the planner's estimate.

    A first count stops at PROBE_LIMIT, where most lists end (no planner round trip
    for them). Past it, the planner's estimate decides: when it expects far more than
    EXACT_TOTAL_LIMIT, nothing more is counted (counting the limit's worth of index
    entries was most of a big page's cost).
    """
    return await total_after_probe(
        await _count_up_to(session, query, PROBE_LIMIT),
        lambda: _planner_estimate(session, query),
        lambda limit: _count_up_to(session, query, limit),
    )


async def total_after_probe(
    probe: int,
    estimate: Callable[[], Awaitable[int]],
    count_up_to: Callable[[int], Awaitable[int]],
) -> int:
    """total_size's rules, from the first count (up to PROBE_LIMIT + 1) however it was
    made (ListAuditLogs counts in its page's statement): `estimate` gives the planner's
    estimate, `count_up_to(limit)` the matches or limit + 1, each asked only if needed."""
    if probe <= PROBE_LIMIT:
        return probe
    planned = await estimate()
    if planned > ESTIMATE_TRUSTED_ABOVE:
        return planned
    count = await count_up_to(EXACT_TOTAL_LIMIT)
    return count if count <= EXACT_TOTAL_LIMIT else max(planned, count)


def planned_rows(plan: Any) -> int:
    """The top node's row estimate of `EXPLAIN (FORMAT JSON)`'s result (text, or decoded)."""
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


async def _count_up_to(session: AsyncSession, query: Select, limit: int) -> int:
    """The number of matches, or limit + 1 when there are more."""
    bounded = query.order_by(None).limit(limit + 1).subquery()
    return await session.scalar(select(func.count()).select_from(bounded))


class _Explain(Executable, ClauseElement):
    """`EXPLAIN (FORMAT JSON) <query>`, compiled like the query itself: its filter values
    stay bind parameters, never SQL text (rendered as literals inside text(), a value
    such as `a :x` became a parameter of its own and the call failed)."""

    # Compiled on each use (only past PROBE_LIMIT matches): a cached form would carry the
    # query's own result columns, not the plan's.
    inherit_cache = False

    def __init__(self, query: Select) -> None:
        self.query = query


@compiles(_Explain)
def _compile_explain(element: _Explain, compiler, **kw) -> str:
    return f"EXPLAIN (FORMAT JSON) {compiler.process(element.query, **kw)}"


async def _planner_estimate(session: AsyncSession, query: Select) -> int:
    """The planner's row estimate for `query`, planned with its actual filter values."""
    return planned_rows(await session.scalar(_Explain(query.order_by(None))))


async def list_page(
    session: AsyncSession,
    model,
    *,
    page_size: int,
    page_token: str,
    equal: Mapping[str, Any] | None = None,
    where: Mapping[str, tuple[Any, Any]] | None = None,
) -> Page:
    """One page of `model` rows, newest first, filtered by the List RPC's fields.

    `equal` maps columns to values (None: no filter); `where` maps other filters
    to (value, SQL condition) for those that are not an equality (None: no filter).
    All of them are part of the page token's fingerprint.
    """
    query = select(model)
    fingerprint = {}
    for column, value in (equal or {}).items():
        fingerprint[column] = "" if value is None else str(value)
        if value is not None:
            query = query.where(getattr(model, column) == value)
    for name, (value, condition) in (where or {}).items():
        fingerprint[name] = "" if value is None else str(value)
        if value is not None:
            query = query.where(condition)
    return await paginate(
        session,
        query,
        created_at=model.created_at,
        row_id=model.id,
        filters=fingerprint,
        requested_size=page_size,
        page_token=page_token,
    )
