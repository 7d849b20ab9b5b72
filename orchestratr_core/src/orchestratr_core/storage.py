"""The storage contract: what a database backend must do for the manager.

A storage plugin returns a :class:`Storage` from the ``orchestratr_make_storage``
hook. Only managers (and the client and monitors, which run in a manager's
process or a CLI) use a storage; servers never do.

Several managers may use one storage at once. Every method is therefore one
atomic unit (one transaction), and every job status change is a *guarded*
update as described by :data:`orchestratr_core.job.TRANSITIONS`: the backend
writes ``UPDATE ... WHERE id = :id AND status IN (:sources) AND <guard>`` (or
its equivalent) and reports whether a row changed. Check-then-write in Python is
not allowed: it is what let the original run a deleted job again.

Errors: :class:`~orchestratr_core.errors.BackendUnavailable` when the database
cannot be reached or a transient failure persisted after the backend's own
retries (the manager retries later); :class:`~orchestratr_core.errors.PermanentBackendError`
for wrong credentials or an unknown database. Messages never contain credentials.

Times are timezone-aware UTC datetimes; backends store at least millisecond
precision. Ids are strings (time-ordered UUIDs, see :func:`orchestratr_core.job.new_id`).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from orchestratr_core.job import (
    JobEvent,
    JobPage,
    JobQuery,
    JobRecord,
    NewJob,
    ServerQuery,
    ServerRecord,
    ServerStatus,
    TransitionResult,
)
from orchestratr_core.protocol import ServerHeartbeat

__all__ = ["OutboxItem", "OutboxKind", "Storage"]


class OutboxKind(enum.StrEnum):
    """What an outbox row asks the manager to send."""

    PUBLISH = "publish"
    """Publish the job's message (generation given by the row)."""
    CANCEL = "cancel"
    """Add the job to the transport's cancellation set and broadcast it."""


@dataclass(frozen=True)
class OutboxItem:
    """A message that must be sent because a committed transaction said so."""

    id: int
    job_id: str
    kind: OutboxKind
    generation: int
    created_at: datetime


class Storage(abc.ABC):
    """A manager's database. See the module docstring for the rules."""

    # -- lifecycle --------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect (create pools) and, unless the backend was configured not to,
        bring the schema up to date. Must be safe when several managers open an
        empty database at the same moment."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every connection. Idempotent."""

    # -- jobs -------------------------------------------------------------------

    @abc.abstractmethod
    async def create_job(self, job: NewJob, holder: str, lease_until: datetime) -> JobRecord:
        """Insert the job (status ``pending``, fence 0, generation ``job.generation``,
        ``heartbeat_timeout`` kept as given)
        and an outbox row ``PUBLISH`` for it, in one transaction. The outbox row
        is claimed by ``holder`` until ``lease_until`` (the creating manager
        publishes it at once). Raises :class:`DuplicateJobName` if a job of the
        same name exists that is not ``deleted`` — enforced by a constraint in the
        database, so that of many concurrent creates exactly one wins. Names are
        compared exactly, code point by code point (case- and accent-sensitive)."""

    @abc.abstractmethod
    async def request_cancel(
        self, job_id: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """Apply :data:`JobEvent.CANCEL` and, if it applied, insert an outbox row
        ``CANCEL`` claimed by ``holder`` — in one transaction. Returns the job
        after the attempt and whether it changed. A job already ``deleting``,
        ``deleted`` or ``completed`` is returned unchanged. Raises
        :class:`UnknownJob` for an unknown id."""

    @abc.abstractmethod
    async def transition(
        self,
        job_id: str,
        event: JobEvent,
        *,
        server_id: str | None,
        fence: int,
        now: datetime,
        error: str | None = None,
        restarts: int | None = None,
        reason: str | None = None,
    ) -> TransitionResult:
        """Apply one transition of :data:`TRANSITIONS` to one job, atomically and
        guarded. On success also set ``updated_at = now``, ``reason``; for
        ``FAIL`` set ``last_error = error`` and ``restarts = restarts``; for
        ``START`` set ``restarts`` when given. ``SERVER_LOST`` is not applied
        through this method (it raises :class:`ValueError`; see
        :meth:`expire_servers` and :meth:`server_left`). ``reason`` is set to the
        given value, ``None`` included.
        Returns the job after the attempt; ``job`` is ``None`` for an unknown id."""

    @abc.abstractmethod
    async def apply_heartbeat(self, heartbeat: ServerHeartbeat, now: datetime) -> list[JobRecord]:
        """Ingest one server heartbeat, in one transaction and with a bounded
        number of statements (not one per job):

        * upsert the server row (name, max_workers, host, pid, started_at,
          ``last_seen = now``, status ``draining`` if ``heartbeat.draining`` or
          the row is already ``draining`` (a drain was requested), else
          ``alive``). A server already marked ``dead`` or ``left`` comes back
          ``alive`` when it is heard again.
        * for every reported job, apply ``START`` with the reported fence
          (guard ``NEWER``) and set ``last_heartbeat`` from the report
          (``now`` when the report's is ``None``; ``restarts`` too; ``updated_at``
          is bumped as by :meth:`transition`);
        * every job recorded ``processing`` on this server that the report does
          not list goes back to ``pending`` (owner cleared, ``reason`` set) — the
          server no longer runs it. Jobs ``deleting`` on it that the report does
          not list lose the owner too (they stay ``deleting``).

        Returns the reported jobs whose row did *not* accept the report: owned
        by another server with a newer or equal token, ``deleting``,
        ``deleted``, ``completed`` — and a :class:`JobRecord` cannot be returned
        for an unknown id, so unknown ids are left out. The manager tells the
        server to stop those copies."""

    @abc.abstractmethod
    async def expire_servers(self, seen_before: datetime, now: datetime) -> list[ServerRecord]:
        """Mark every ``alive`` or ``draining`` server with ``last_seen < seen_before``
        ``dead`` and apply ``SERVER_LOST`` to its jobs, in one transaction.
        Returns the servers it marked."""

    @abc.abstractmethod
    async def server_left(self, server_id: str, now: datetime) -> bool:
        """Mark the server ``left`` and apply ``SERVER_LOST`` to its jobs. Returns
        False for an unknown server."""

    # -- outbox and leases --------------------------------------------------------

    @abc.abstractmethod
    async def claim_outbox(
        self, holder: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxItem]:
        """Claim up to ``limit`` outbox rows that are unclaimed or whose claim
        expired before ``now``, oldest first, for ``holder`` until
        ``lease_until``. Two managers never claim the same row at once; rows under
        a live claim (``holder``'s own included) are not returned."""

    @abc.abstractmethod
    async def complete_outbox(self, ids: Sequence[int]) -> None:
        """Delete these outbox rows (their messages were confirmed by the broker)."""

    @abc.abstractmethod
    async def complete_outbox_for_job(self, job_id: str, kind: OutboxKind, holder: str) -> int:
        """Delete the outbox rows of ``kind`` for ``job_id`` that ``holder`` has
        claimed (the fast path: the manager that created or cancelled the job
        sent its message at once). Returns how many rows it deleted."""

    @abc.abstractmethod
    async def acquire_lease(self, name: str, holder: str, now: datetime, until: datetime) -> bool:
        """Take or renew the named lease for ``holder`` until ``until``. Succeeds if
        nobody holds it, ``holder`` holds it, or the holder's lease ended before
        ``now``. Atomic: of two managers racing, one wins."""

    @abc.abstractmethod
    async def cancelled_job_ids(self, deleted_since: datetime) -> list[str]:
        """Ids of jobs ``deleting``, plus ``deleted`` and ``completed`` ones with
        ``updated_at >= deleted_since``: the set of jobs servers must never run
        again (a completed job's ack may be lost, and its message redelivered)."""

    # -- queries ----------------------------------------------------------------

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> JobRecord | None:
        """One job by id, whatever its status."""

    @abc.abstractmethod
    async def get_jobs(self, job_ids: Sequence[str]) -> list[JobRecord]:
        """Several jobs by id (unknown ids left out), in one query."""

    @abc.abstractmethod
    async def list_jobs(self, query: JobQuery, *, with_total: bool = False) -> JobPage:
        """Jobs matching ``query``, ascending by id, keyset-paged by ``query.after``
        (then ``query.offset``), at most ``query.limit``. ``next_cursor`` is the
        last id of the page if more may follow. ``total`` when ``with_total``:
        every job matching the filters, ignoring ``after``, ``offset`` and ``limit``."""

    @abc.abstractmethod
    async def list_servers(self, query: ServerQuery) -> list[ServerRecord]:
        """Servers matching ``query`` ordered by name then id, each with
        ``running`` filled (jobs ``processing`` or ``deleting`` on it) when
        ``query.with_jobs``."""

    @abc.abstractmethod
    async def get_server(self, server_id: str) -> ServerRecord | None:
        """One server with its running jobs."""

    @abc.abstractmethod
    async def set_server_status(self, server_id: str, status: ServerStatus, now: datetime) -> bool:
        """Set a server's status (e.g. ``draining`` when a drain is requested).
        ``now`` is when it was requested; ``last_seen`` is not touched (only a
        heartbeat says a server is alive). False for an unknown server."""
