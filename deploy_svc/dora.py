"""The DORA metrics (GetDoraMetrics): five figures per bucket, from the deployments relman
holds, in one SQL query.

relman knows which deployment failed, which was rolled back and which redeployment
restored service, so the figures are exact rather than matched from loose events:

- deployments: production deployments that SUCCEEDED (one rolled back since counts as
  failed: its status is ROLLED_BACK); frequency = deployments / days in the bucket;
- lead time for changes: median of completed_at - the release's created_at over the
  succeeded ones that are not a rollback's redeployment;
- change failure rate: failed (FAILED or ROLLED_BACK) / (succeeded + failed); rejected and
  cancelled deployments never ran and are left out;
- failed deployment recovery time: median, over the failed ones, of the time from the
  failure (a FAILED deployment's completed_at; a ROLLED_BACK one's rollback) to the
  completed_at of the next SUCCEEDED deployment of that service in that environment; a
  failure not yet recovered is left out; it counts in the failed deployment's bucket;
- deployment rework rate: succeeded deployments that are a rollback's redeployment or
  ship a hotfix release, over deployments.

Production means every environment of type production, or the one environment asked
for. A deployment falls in the bucket of its completed_at. Medians are
percentile_cont(0.5) (the mean of the two middle values of an even count). Every bucket
of the range is returned, the first and last cut to it; a figure without data is 0.
Ids of nothing (a service, team or environment that does not exist) match no deployment.

A call reads no deployment itself: it aggregates deployment_outcomes, one row of these
facts per ended deployment, which the database derives at each commit that ends or
changes a deployment, a rollback or a release (migration 012), so the figures are as
exact as a query over the deployments and a year of them is one index range per bucket.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import text

from shared.framework.errors import InvalidArgument
from shared.persistence.db import Database


class Interval(StrEnum):
    """A bucket's length: PostgreSQL's date_trunc unit, in UTC (a week starts on Monday)."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    ALL = "all"


_STEP = {Interval.DAY: "1 day", Interval.WEEK: "1 week", Interval.MONTH: "1 month"}
DEFAULT_RANGE = timedelta(days=30)
MAX_BUCKETS = 1_000  # DAY over almost three years; MONTH over 83


@dataclass(frozen=True)
class Bucket:
    start_time: datetime
    end_time: datetime
    deployments: int
    lead_time_s: float
    failed: int
    recovery_time_s: float
    rework: int

    @property
    def days(self) -> float:
        return (self.end_time - self.start_time).total_seconds() / 86_400

    @property
    def frequency_per_day(self) -> float:
        return self.deployments / self.days if self.days else 0.0

    @property
    def change_failure_rate(self) -> float:
        ran = self.deployments + self.failed
        return self.failed / ran if ran else 0.0

    @property
    def rework_rate(self) -> float:
        return self.rework / self.deployments if self.deployments else 0.0


# The buckets: each interval's UTC boundaries from the one holding start_time, cut to
# [start_time, end_time). ALL: one bucket, the range.
_BUCKETS = """
    SELECT greatest(b AT TIME ZONE 'UTC', CAST(:start_time AS timestamptz)) AS start_time,
           least(
               (b + CAST(CAST(:step AS text) AS interval)) AT TIME ZONE 'UTC',
               CAST(:end_time AS timestamptz)
           ) AS end_time
    FROM generate_series(
        date_trunc(:unit, CAST(:start_time AS timestamptz) AT TIME ZONE 'UTC'),
        CAST(:end_time AS timestamptz) AT TIME ZONE 'UTC' - interval '1 microsecond',
        CAST(CAST(:step AS text) AS interval)
    ) AS b
"""
_ONE_BUCKET = """
    SELECT CAST(:start_time AS timestamptz) AS start_time,
           CAST(:end_time AS timestamptz) AS end_time
"""

# Each bucket aggregates its own range of deployment_outcomes, an index range scan of
# rows whose facts (lead time, recovery, rework) the database worked out as each
# deployment ended (migration 012): nothing is joined or looked up per deployment here.
# percentile_cont leaves out NULLs: a failure's lead time, a rollback's redeployment's,
# an unrecovered failure's recovery. {scope} is the filters a call sets (no
# `:x IS NULL OR ...`, whose generic plan, once the prepared statement has run five
# times, walks every row).
_QUERY = """
WITH buckets AS ({buckets})
SELECT b.start_time, b.end_time, o.*
FROM buckets b
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE o.succeeded) AS deployments,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY o.lead_time_s) AS lead_time_s,
           count(*) FILTER (WHERE NOT o.succeeded) AS failed,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY o.recovery_s) AS recovery_time_s,
           count(*) FILTER (WHERE o.rework) AS rework
    FROM deployment_outcomes o
    WHERE o.completed_at >= b.start_time AND o.completed_at < b.end_time
      {scope}
) o
ORDER BY b.start_time
"""


def _query(whole: bool, service: bool, team: bool, environment: bool):
    """The query for a call: its buckets, and only the filters it sets."""
    scope = []
    if environment:
        scope.append("AND o.environment_id = CAST(:environment_id AS uuid)")
    else:
        scope.append("AND o.production")
    if service:
        scope.append("AND o.service_id = CAST(:service_id AS uuid)")
    if team:
        scope.append(
            "AND o.service_id IN (SELECT id FROM services WHERE team_id = CAST(:team_id AS uuid))"
        )
    return text(
        _QUERY.format(
            buckets=_ONE_BUCKET if whole else _BUCKETS,
            scope="\n      ".join(scope),
        )
    )


_QUERIES = {shape: _query(*shape) for shape in itertools.product((True, False), repeat=4)}


def check_range(
    start_time: datetime | None, end_time: datetime | None, interval: Interval, now: datetime
) -> tuple[datetime, datetime]:
    """The range asked for, defaults filled in (the 30 days up to now); refused when it is
    empty or would cut into more than MAX_BUCKETS buckets."""
    end = end_time or now
    start = start_time or end - DEFAULT_RANGE
    if start >= end:
        raise InvalidArgument.field("start_time", "must be before end_time")
    if bucket_count(start, end, interval) > MAX_BUCKETS:
        raise InvalidArgument.field(
            "interval", f"cuts the range into more than {MAX_BUCKETS} buckets"
        )
    return start, end


def bucket_count(start: datetime, end: datetime, interval: Interval) -> int:
    """How many buckets _BUCKETS cuts [start, end) into, the first and last counted even
    when cut short."""
    if interval == Interval.ALL:
        return 1
    first, last = start.astimezone(UTC), (end - timedelta(microseconds=1)).astimezone(UTC)
    if interval == Interval.MONTH:
        return (last.year - first.year) * 12 + last.month - first.month + 1
    first_day = first.date() - timedelta(days=first.weekday() if interval == Interval.WEEK else 0)
    length = 7 if interval == Interval.WEEK else 1
    return (last.date() - first_day).days // length + 1


async def dora_metrics(
    database: Database,
    *,
    service_id: uuid.UUID | None,
    team_id: uuid.UUID | None,
    environment_id: uuid.UUID | None,
    start_time: datetime | None,
    end_time: datetime | None,
    interval: Interval,
) -> list[Bucket]:
    """Every bucket of the range, oldest first (see the module's docstring)."""
    start, end = check_range(start_time, end_time, interval, datetime.now(UTC))
    whole = interval == Interval.ALL
    parameters = {"start_time": start, "end_time": end}
    for name, value in (
        ("service_id", service_id),
        ("team_id", team_id),
        ("environment_id", environment_id),
    ):
        if value is not None:
            parameters[name] = value
    shape = (whole, service_id is not None, team_id is not None, environment_id is not None)
    if not whole:
        parameters |= {"unit": interval.value, "step": _STEP[interval]}
    async with database.replica_read() as session:
        rows = (await session.execute(_QUERIES[shape], parameters)).all()
    return [
        Bucket(
            start_time=row.start_time,
            end_time=row.end_time,
            deployments=row.deployments,
            lead_time_s=row.lead_time_s or 0.0,
            failed=row.failed,
            recovery_time_s=row.recovery_time_s or 0.0,
            rework=row.rework,
        )
        for row in rows
    ]
