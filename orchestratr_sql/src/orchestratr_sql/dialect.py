"""What differs between SQL dialects besides the query text: how values are
encoded, how lists travel as one parameter, and the few fragments that the
monitor queries assemble (filters, paging).

The dialect knows nothing about drivers: the SQL Server dialect's T-SQL and the
aioodbc connector are separate, so the ODBC connector can be tested with
another database's own dialect.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestratr_core.protocol import RunningJob
from orchestratr_core.storage import HEARTBEAT_REFRESH_STEP

__all__ = ["Dialect", "get_dialect"]

_TEXT_TIME = "%Y-%m-%d %H:%M:%S.%f"
_REFRESH_STEP = timedelta(seconds=HEARTBEAT_REFRESH_STEP)


class Dialect:
    """The dialect of SQL a storage speaks. Subclasses override what differs."""

    name = "generic"
    lock_in_transaction = False
    """True if the migration lock is the migration's own transaction (SQLite)."""
    insert_rows = 100
    """Rows per multi-row ``INSERT`` of ``create_jobs`` (10 parameters a row)."""
    insert_bytes = 4 << 20
    """...and at most about this many bytes of names and arguments per statement."""
    stored_as_sent = True
    """True if a row reads back exactly as inserted (every time keeps its
    microseconds), so ``create_job`` can build the record without reading it."""

    # -- values ---------------------------------------------------------------------

    def time_in(self, value: datetime | None) -> Any:
        """A timezone-aware datetime as the database stores it (naive UTC here)."""
        if value is None:
            return None
        return _utc(value).replace(tzinfo=None)

    def time_out(self, value: Any) -> datetime | None:
        """A stored time back as a timezone-aware UTC datetime."""
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if not isinstance(value, datetime):
            raise TypeError(f"unexpected time value {value!r}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def json_time(self, value: datetime) -> str:
        """A time inside a JSON parameter."""
        return _utc(value).strftime(_TEXT_TIME)

    def id_list(self, values: Sequence[str]) -> Any:
        """A list of ids as one parameter (a JSON array unless overridden)."""
        return json.dumps(list(values))

    def int_list(self, values: Sequence[int]) -> Any:
        """A list of integers as one parameter."""
        return json.dumps([int(v) for v in values])

    def text_list(self, values: Sequence[str]) -> Any:
        """A list of any strings (names) as one parameter: JSON without
        ``\\u`` escapes, so that no parser has to join surrogate pairs."""
        return json.dumps(list(values), ensure_ascii=False)

    def heartbeat_batch(self, jobs: Sequence[RunningJob], now: datetime) -> dict[str, Any]:
        """The reported jobs of a heartbeat as statement parameters.

        ``batch`` is a JSON array of ``{"id", "f" (fence), "h" (last heartbeat),
        "r" (restarts), "o" (last heartbeat minus HEARTBEAT_REFRESH_STEP: a stored
        one after this is recent enough to keep)}``; ``ids`` the ids alone.
        """
        rows = []
        for job in jobs:
            beat = _epoch(job.last_heartbeat, now)
            rows.append(
                {
                    "id": job.job_id,
                    "f": int(job.fence),
                    "h": self.json_time(beat),
                    "r": int(job.restarts),
                    "o": self.json_time(beat - _REFRESH_STEP),
                }
            )
        return {"batch": json.dumps(rows), "ids": self.id_list([job.job_id for job in jobs])}

    # -- fragments of the monitor queries --------------------------------------------

    def name_prefix(self, prefix: str) -> tuple[str, dict[str, Any]]:
        """A condition selecting names that start with ``prefix`` (index-friendly)."""
        escaped = prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_")
        escaped = escaped.replace("[", "![")
        return "name LIKE :name_pattern ESCAPE '!'", {"name_pattern": escaped + "%"}

    def page(self, limit: int | None, offset: int) -> tuple[str, dict[str, Any]]:
        """The clause that follows ``ORDER BY`` to take one page."""
        if limit is None and offset == 0:
            return "", {}
        if limit is None:
            return "LIMIT -1 OFFSET :page_offset", {"page_offset": offset}
        return "LIMIT :page_limit OFFSET :page_offset", {"page_limit": limit, "page_offset": offset}


class SQLiteDialect(Dialect):
    """SQLite 3.33+ (``UPDATE ... FROM``, ``json_each``). Times are ISO text in UTC,
    which sorts like the time it spells."""

    name = "sqlite"
    lock_in_transaction = True
    insert_rows = 90  # 900 parameters: under SQLite's old limit of 999 too

    def time_in(self, value: datetime | None) -> Any:
        """Times are stored as ``YYYY-MM-DD HH:MM:SS.ffffff`` text, UTC."""
        return None if value is None else self.json_time(value)

    def name_prefix(self, prefix: str) -> tuple[str, dict[str, Any]]:
        """SQLite's LIKE ignores ASCII case, so use a binary range instead: a valid
        name never contains U+10FFFF (a noncharacter that validation rejects)."""
        return (
            "name >= :name_low AND name < :name_high",
            {"name_low": prefix, "name_high": prefix + "\U0010ffff"},
        )


class PostgresDialect(Dialect):
    """PostgreSQL 12+ through asyncpg: native arrays and timestamptz."""

    name = "postgresql"
    insert_rows = 5000  # unnest: one array parameter per column, whatever the rows
    insert_bytes = 32 << 20

    def time_in(self, value: datetime | None) -> Any:
        """asyncpg takes aware datetimes for timestamptz."""
        return None if value is None else _utc(value)

    def id_list(self, values: Sequence[str]) -> Any:
        """A ``text[]`` parameter."""
        return list(values)

    def int_list(self, values: Sequence[int]) -> Any:
        """A ``bigint[]`` parameter."""
        return [int(v) for v in values]

    def text_list(self, values: Sequence[str]) -> Any:
        """A ``text[]`` parameter."""
        return list(values)

    def heartbeat_batch(self, jobs: Sequence[RunningJob], now: datetime) -> dict[str, Any]:
        """Parallel arrays for ``unnest``, and the refresh step as an interval."""
        return {
            "ids": [job.job_id for job in jobs],
            "fences": [int(job.fence) for job in jobs],
            "beats": [_epoch(job.last_heartbeat, now) for job in jobs],
            "restarts": [int(job.restarts) for job in jobs],
            "refresh_step": _REFRESH_STEP,
        }

    def name_prefix(self, prefix: str) -> tuple[str, dict[str, Any]]:
        """``name`` is ``COLLATE "C"`` (code point order), so a range serves a
        prefix from the index even with generic plans of prepared statements."""
        return (
            "name >= :name_low AND name < :name_high",
            {"name_low": prefix, "name_high": prefix + "\U0010ffff"},
        )

    def page(self, limit: int | None, offset: int) -> tuple[str, dict[str, Any]]:
        """``LIMIT ALL`` when there is no limit."""
        if limit is None and offset == 0:
            return "", {}
        if limit is None:
            return "OFFSET :page_offset", {"page_offset": offset}
        return "LIMIT :page_limit OFFSET :page_offset", {"page_limit": limit, "page_offset": offset}


class MySQLDialect(Dialect):
    """MySQL 8 / MariaDB 10.6+ (``JSON_TABLE``). Times are ``DATETIME(6)`` in UTC."""

    name = "mysql"
    # aiomysql interpolates parameters client-side; the limit is the packet
    # (max_allowed_packet: 16 MiB on MariaDB, 64 MiB on MySQL 8 by default).
    insert_rows = 500

    def page(self, limit: int | None, offset: int) -> tuple[str, dict[str, Any]]:
        """MySQL has no "no limit": use the largest one."""
        if limit is None and offset == 0:
            return "", {}
        return "LIMIT :page_limit OFFSET :page_offset", {
            "page_limit": 18446744073709551615 if limit is None else limit,
            "page_offset": offset,
        }


class SQLServerDialect(Dialect):
    """SQL Server 2016+ (``OPENJSON``, filtered indexes). Times are ``DATETIME2(6)`` UTC."""

    name = "sqlserver"
    insert_rows = 200  # 2,000 parameters: under SQL Server's 2,100 (and 1,000 VALUES rows)
    # Not verified on a real SQL Server (how the Microsoft driver binds DATETIME2):
    # read the row back rather than trust it kept every microsecond.
    stored_as_sent = False

    def json_time(self, value: datetime) -> str:
        """ISO 8601 with a ``T``, which ``OPENJSON ... datetime2`` reads."""
        return _utc(value).strftime("%Y-%m-%dT%H:%M:%S.%f")

    def page(self, limit: int | None, offset: int) -> tuple[str, dict[str, Any]]:
        """``OFFSET ... ROWS FETCH NEXT ... ROWS ONLY``."""
        if limit is None and offset == 0:
            return "", {}
        if limit is None:
            return "OFFSET :page_offset ROWS", {"page_offset": offset}
        return "OFFSET :page_offset ROWS FETCH NEXT :page_limit ROWS ONLY", {
            "page_offset": offset,
            "page_limit": limit,
        }


_DIALECTS: dict[str, Dialect] = {
    d.name: d for d in (SQLiteDialect(), PostgresDialect(), MySQLDialect(), SQLServerDialect())
}


def get_dialect(name: str) -> Dialect:
    """The dialect called ``name``."""
    return _DIALECTS[name]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _epoch(value: float | None, default: datetime) -> datetime:
    return default if value is None else datetime.fromtimestamp(value, UTC)
