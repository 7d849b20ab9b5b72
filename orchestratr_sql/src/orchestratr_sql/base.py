"""The plumbing under :class:`~orchestratr_sql.storage.SqlStorage`: one transaction
per call, retried as a whole on transient failures under the core's one backoff
policy (:func:`orchestratr_core.retry.retrying`); opening (with migrations); rows
to records."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from orchestratr_core.errors import OrchestratrError
from orchestratr_core.job import JobRecord, JobStatus, NewJob, ServerRecord, ServerStatus
from orchestratr_core.placement import DEFAULT_KIND
from orchestratr_core.retry import retrying
from orchestratr_core.storage import OutboxItem, OutboxKind, Storage
from orchestratr_sql.connection import Connection, Connector, ErrorKind, Row, scrub
from orchestratr_sql.dialect import Dialect
from orchestratr_sql.errors import backend_error
from orchestratr_sql.queries import load_queries
from orchestratr_sql.schema import guard, migrate
from orchestratr_sql.url import DatabaseUrl

__all__ = ["SqlStorageBase", "join_list", "split_list"]

log = logging.getLogger("orchestratr.storage.sql")

T = TypeVar("T")

_PERMANENT = (ErrorKind.AUTH, ErrorKind.UNKNOWN_DATABASE, ErrorKind.DATA)


class _Transient(Exception):
    """A classified driver error worth another attempt; its text is scrubbed."""

    def __init__(self, text: str, cause: Exception, kind: ErrorKind) -> None:
        super().__init__(text)
        self.cause = cause
        self.kind = kind


class SqlStorageBase(Storage):
    """What every :class:`~orchestratr_sql.storage.SqlStorage` operation stands on."""

    def __init__(self, connector: Connector, dialect: Dialect) -> None:
        self.connector = connector
        self.dialect = dialect
        self.url: DatabaseUrl = connector.url
        self._q = load_queries(dialect.name, connector.style)
        # PostgreSQL inserts a job and its outbox row in one statement.
        self._one_statement_create = "create_job" in self._q
        self._opened = False

    def __repr__(self) -> str:
        return f"SqlStorage({self.dialect.name}, {self.url.masked!r})"

    # -- plumbing ---------------------------------------------------------------------

    async def _retried(
        self,
        what: str,
        fn: Callable[[], Awaitable[T]],
        *,
        on_unique: Callable[[], Exception] | None = None,
        log_failure: bool = True,
    ) -> T:
        """``fn()`` until it succeeds, a permanent error, or ``retries`` attempts
        of transient ones (then :class:`BackendUnavailable` naming the count)."""
        options = self.url.options
        where = f"{what} on {self.connector.product} at {self.url.masked}"
        result: T
        try:
            async for attempt in retrying(
                where,
                initial=options.retry_initial,
                maximum=options.retry_max,
                retry_on=(_Transient,),
                logger=log,
                attempts=options.retries,
            ):
                with attempt:
                    try:
                        result = await fn()
                    except OrchestratrError:
                        raise
                    except Exception as exc:
                        kind = self.connector.classify(exc)
                        if kind is None or (kind is ErrorKind.UNIQUE and on_unique is None):
                            raise
                        if kind is ErrorKind.UNIQUE and on_unique is not None:
                            raise on_unique() from None
                        if kind in _PERMANENT:
                            raise backend_error(self.connector, exc, kind, what) from None
                        detail = scrub(str(exc) or type(exc).__name__, self.url.secrets)
                        raise _Transient(
                            f"{kind.value}: {detail}; attempt {attempt.number} of "
                            f"{options.retries}",
                            exc,
                            kind,
                        ) from None
        except _Transient as failed:
            error = backend_error(
                self.connector, failed.cause, failed.kind, f"{what}, {options.retries} attempts"
            )
            if log_failure:
                log.error("%s", error)
            raise error from None
        return result

    async def _run(
        self,
        what: str,
        fn: Callable[[Connection], Awaitable[T]],
        *,
        write: bool = True,
        on_unique: Callable[[], Exception] | None = None,
        statement: bool = False,
    ) -> T:
        """Run ``fn`` in one transaction, retrying transient failures.
        ``statement``: ``fn`` runs exactly one statement, which is atomic by
        itself, so it may run without ``BEGIN``/``COMMIT`` where the driver
        allows (:meth:`Connector.statement`)."""

        async def once() -> T:
            if statement:
                scope = self.connector.statement(write=write)
            else:
                scope = self.connector.transaction(write=write)
            async with scope as conn:
                return await fn(conn)

        return await self._retried(what, once, on_unique=on_unique)

    def _t(self, value: datetime | None) -> Any:
        return self.dialect.time_in(value)

    def _time(self, value: Any) -> datetime:
        out = self.dialect.time_out(value)
        if out is None:
            raise ValueError("a required time column is NULL")
        return out

    def _job(self, row: Row) -> JobRecord:
        d = self.dialect
        return JobRecord(
            id=str(row["id"]),
            name=str(row["name"]),
            argument=str(row["argument"]),
            status=JobStatus(row["status"]),
            server_id=None if row["server_id"] is None else str(row["server_id"]),
            fence=int(row["fence"]),
            generation=int(row["generation"]),
            created_at=self._time(row["created_at"]),
            updated_at=self._time(row["updated_at"]),
            started_at=d.time_out(row["started_at"]),
            last_heartbeat=d.time_out(row["last_heartbeat"]),
            restarts=int(row["restarts"]),
            last_error=row["last_error"],
            reason=row["reason"],
            heartbeat_timeout=(
                None if row["heartbeat_timeout"] is None else float(row["heartbeat_timeout"])
            ),
            checkpoint=row.get("checkpoint"),
            checkpoint_fence=_int_or_none(row.get("checkpoint_fence")),
            checkpoint_at=d.time_out(row.get("checkpoint_at")),
            max_restarts=_int_or_none(row.get("max_restarts")),
            restart_window=(
                None if row.get("restart_window") is None else float(row["restart_window"])
            ),
            failure_seq=int(row.get("failure_seq") or 0),
            failure_log=row.get("failure_log"),
            kind=str(row["kind"]),
            constraints=split_list(row["requires"]),
            spread=row["spread"],
            pending_reason=row["pending_reason"],
            argument_version=int(row.get("argument_version") or 0),
            argument_updated_at=d.time_out(row.get("argument_updated_at")),
            update_pending=bool(row.get("update_pending") or 0),
            update_floor=_int_or_none(row.get("update_floor")),
            inplace_floor=_int_or_none(row.get("inplace_floor")),
            argument_applied_version=int(row.get("argument_applied_version") or 0),
        )

    def _server(self, row: Row, running: Sequence[JobRecord] = ()) -> ServerRecord:
        return ServerRecord(
            id=str(row["id"]),
            name=str(row["name"]),
            max_workers=int(row["max_workers"]),
            status=ServerStatus(row["status"]),
            started_at=self._time(row["started_at"]),
            last_seen=self._time(row["last_seen"]),
            host=str(row["host"]),
            pid=int(row["pid"]),
            running=tuple(running),
            kinds=split_list(row["kinds"]) or (DEFAULT_KIND,),
            labels=split_list(row["labels"]),
            updatable=None if row.get("updatable") is None else split_list(row["updatable"]),
        )

    def _outbox(self, row: Row) -> OutboxItem:
        return OutboxItem(
            id=int(row["id"]),
            job_id=str(row["job_id"]),
            kind=OutboxKind(row["kind"]),
            generation=int(row["generation"]),
            created_at=self._time(row["created_at"]),
        )

    def _insert_values(self, job: NewJob) -> dict[str, Any]:
        return {
            "id": job.id,
            "name": job.name,
            "argument": job.argument,
            "generation": job.generation,
            "heartbeat_timeout": job.heartbeat_timeout,
            "now": self._t(job.created_at),
            "job_kind": job.kind,
            "requires": join_list(job.constraints),
            "spread": job.spread,
        }

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        """Create the pool (retrying an unreachable database like any operation)
        and, unless ``migrate=false``, apply pending migrations under a lock."""
        if self._opened:
            return
        await self._retried("connect", self.connector.open, log_failure=False)
        self._opened = True
        if self.url.options.migrate:
            try:
                await guard(self.connector, migrate(self.connector, self.dialect))
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """Close the pool. Idempotent."""
        self._opened = False
        await self.connector.close()


def _int_or_none(value: object) -> int | None:
    """A nullable integer column (drivers return int or Decimal)."""
    return None if value is None else int(value)  # type: ignore[call-overload]


def join_list(items: Sequence[str]) -> str:
    """Kinds, labels or constraints as one column: comma-joined (none of them holds
    a comma: :mod:`orchestratr_core.placement` refuses it)."""
    return ",".join(items)


def split_list(value: object) -> tuple[str, ...]:
    """Inverse of :func:`join_list`; ``NULL`` and ``''`` are empty."""
    if not value:
        return ()
    return tuple(str(value).split(","))
