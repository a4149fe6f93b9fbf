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
# [start_time, end_time); `bucket` is the uncut start a deployment's completed_at truncates
# to. ALL: one bucket, the range.
_BUCKETS = """
    SELECT b AT TIME ZONE 'UTC' AS bucket,
           greatest(b AT TIME ZONE 'UTC', CAST(:start_time AS timestamptz)) AS start_time,
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
    SELECT CAST(:start_time AS timestamptz) AS bucket,
           CAST(:start_time AS timestamptz) AS start_time,
           CAST(:end_time AS timestamptz) AS end_time
"""
_BUCKET_OF = {
    True: "CAST(:start_time AS timestamptz)",
    False: "date_trunc(:unit, d.completed_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
}

# The succeeded deployments and the failures, each aggregated by bucket first, then
# joined to every bucket of the range: a bucket's figures come from its own rows only, and
# the next-success lookup runs for failures alone. {scope} is the filters a call sets (no
# `:x IS NULL OR ...`, whose generic plan, once the prepared statement has run five
# times, walked every deployment through index lookups: three times slower).
_QUERY = """
WITH buckets AS ({buckets}),
succeeded AS (
    SELECT {bucket_of} AS bucket,
           count(*) AS deployments,
           percentile_cont(0.5) WITHIN GROUP (
               ORDER BY extract(epoch FROM d.completed_at - r.created_at)
           ) FILTER (WHERE NOT d.is_rollback) AS lead_time_s,
           count(*) FILTER (WHERE d.is_rollback OR r.hotfix) AS rework
    FROM deployments d
    JOIN releases r ON r.id = d.release_id
    {scope_joins}
    WHERE d.status = 'succeeded'
      AND d.completed_at >= :start_time AND d.completed_at < :end_time
      {scope}
    GROUP BY 1
),
failures AS (
    SELECT {bucket_of} AS bucket,
           count(*) AS failed,
           percentile_cont(0.5) WITHIN GROUP (
               ORDER BY extract(epoch FROM next_success.completed_at - f.failed_at)
           ) FILTER (WHERE next_success.completed_at IS NOT NULL) AS recovery_time_s
    FROM deployments d
    {scope_joins}
    LEFT JOIN rollbacks rb ON rb.deployment_id = d.id AND d.status = 'rolled_back'
    CROSS JOIN LATERAL (
        SELECT CASE WHEN d.status = 'rolled_back' THEN rb.created_at ELSE d.completed_at END
            AS failed_at
    ) f
    LEFT JOIN LATERAL (
        SELECT n.completed_at FROM deployments n
        WHERE n.service_id = d.service_id AND n.environment_id = d.environment_id
          AND n.status = 'succeeded' AND n.completed_at > f.failed_at
        ORDER BY n.completed_at
        LIMIT 1
    ) next_success ON true
    WHERE d.status IN ('failed', 'rolled_back')
      AND d.completed_at >= :start_time AND d.completed_at < :end_time
      {scope}
    GROUP BY 1
)
SELECT b.start_time,
       b.end_time,
       coalesce(s.deployments, 0) AS deployments,
       s.lead_time_s,
       coalesce(f.failed, 0) AS failed,
       f.recovery_time_s,
       coalesce(s.rework, 0) AS rework
FROM buckets b
LEFT JOIN succeeded s ON s.bucket = b.bucket
LEFT JOIN failures f ON f.bucket = b.bucket
ORDER BY b.bucket
"""


def _query(whole: bool, service: bool, team: bool, environment: bool):
    """The query for a call: its buckets, and only the filters it sets."""
    joins, scope = [], []
    if environment:
        scope.append("AND d.environment_id = CAST(:environment_id AS uuid)")
    else:
        joins.append("JOIN environments e ON e.id = d.environment_id")
        scope.append("AND e.environment_type = 'production'")
    if service:
        scope.append("AND d.service_id = CAST(:service_id AS uuid)")
    if team:
        joins.append("JOIN services s ON s.id = d.service_id")
        scope.append("AND s.team_id = CAST(:team_id AS uuid)")
    return text(
        _QUERY.format(
            buckets=_ONE_BUCKET if whole else _BUCKETS,
            bucket_of=_BUCKET_OF[whole],
            scope_joins="\n    ".join(joins),
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
