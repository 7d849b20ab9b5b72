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
for wrong credentials or an unknown database;
:class:`~orchestratr_core.errors.DataRejected` for a value the database refused
(a fence above 2^63-1, a count above 2^31-1, text it cannot store, a check
constraint), at once and without retrying: the manager dead-letters the event
that carried it. Never a driver's own exception for any of these: the core
decides on these three types alone. Messages never contain credentials.

Text: job names and arguments reach a storage validated
(:func:`~orchestratr_core.job.validate_name`, :func:`~orchestratr_core.job.validate_argument`:
no NUL, no lone surrogates), error texts cleaned
(:func:`~orchestratr_core.job.clean_text`); a backend stores them exactly.

Times are timezone-aware UTC datetimes; backends store at least millisecond
precision. Ids are strings (time-ordered UUIDs, see :func:`orchestratr_core.job.new_id`).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from orchestratr_core.errors import DataRejected
from orchestratr_core.job import (
    MAX_COUNT,
    MAX_FENCE,
    JobEvent,
    JobPage,
    JobQuery,
    JobRecord,
    JobStatus,
    NewJob,
    ServerQuery,
    ServerRecord,
    ServerStatus,
    TransitionResult,
)
from orchestratr_core.placement import Pool
from orchestratr_core.protocol import ServerHeartbeat

__all__ = [
    "HEARTBEAT_REFRESH_STEP",
    "REASON_CANCEL_REQUESTED",
    "REASON_NOT_REPORTED",
    "REASON_PAUSE_REQUESTED",
    "REASON_RESUMED",
    "REASON_SERVER_DEAD",
    "REASON_SERVER_LEFT",
    "REASON_UPDATED",
    "REASON_UPDATED_IN_PLACE",
    "REASON_UPDATE_FELL_BACK",
    "REASON_UPDATE_REQUESTED",
    "FailureCount",
    "OutboxItem",
    "OutboxKind",
    "SpreadJob",
    "Storage",
    "check_heartbeat",
    "check_transition",
    "heartbeat_gone",
]

HEARTBEAT_REFRESH_STEP = 30.0
"""Seconds. A heartbeat that would change nothing about a job but its
``last_heartbeat`` (same owner, fence, status and restarts) may leave the row
untouched while the stored ``last_heartbeat`` is less than this much older than
the reported one: a job's ``last_heartbeat`` (and ``updated_at``) is exact to
within this step, not to the heartbeat period. Server liveness is the server
row's ``last_seen``, which every heartbeat writes."""


# The job reasons (``JobRecord.reason``) every storage writes for the same event.
REASON_CANCEL_REQUESTED = "cancel requested"
"""A client asked to cancel the job (``CANCEL``)."""
REASON_NOT_REPORTED = "not reported by its server"
"""The job's server sent a heartbeat without it (``RELEASE``)."""
REASON_SERVER_DEAD = "server dead"
"""The job's server missed its heartbeats (``SERVER_LOST``)."""
REASON_SERVER_LEFT = "server left"
"""The job's server said it stopped (``SERVER_LOST``)."""
REASON_PAUSE_REQUESTED = "pause requested"
"""A client asked to pause the job (``PAUSE``)."""
REASON_RESUMED = "resumed"
"""A client resumed the job (``RESUME``)."""
REASON_UPDATE_REQUESTED = "update requested"
"""A client updated the argument of a live job: its copy is stopped (``pausing``)
and it restarts with the new argument (:meth:`Storage.request_update`)."""
REASON_UPDATED = "restarted with the updated argument"
"""The copy that ran the old argument was confirmed stopped; the job is pending
under a new generation (``CONFIRM_HELD`` of a job with ``update_pending``)."""


REASON_UPDATED_IN_PLACE = "argument updated in place"
"""A client updated the argument of a running job whose function takes it without
a restart: it stays ``processing`` (:meth:`Storage.request_update`, in place)."""
REASON_UPDATE_FELL_BACK = "update not acknowledged in place: restarting"
"""The owner did not acknowledge an update in place in time: the job is stopped
to restart with the new argument (:meth:`Storage.fall_back_update`)."""


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


@dataclass(frozen=True)
class FailureCount:
    """One failure to count (:meth:`Storage.record_failures`): the arguments of
    one :meth:`Storage.record_failure`."""

    job_id: str
    seq: int
    """The ``failure_seq`` the count was computed from (compare-and-set)."""
    failure_log: str
    quarantine: str | None = None


@dataclass(frozen=True)
class SpreadJob:
    """A running job of a spread group: what separating a group needs to know."""

    job_id: str
    server_id: str
    pool: Pool
    spread: str
    fence: int


class Storage(abc.ABC):
    """A manager's database. See the module docstring for the rules."""

    process_local: ClassVar[bool] = False
    """True when the data lives inside this process (the memory storage): no
    other process shares it."""

    # -- lifecycle --------------------------------------------------------------

    async def running_spread_jobs(self) -> list[SpreadJob]:
        """Every ``processing`` job that names a spread group and has an owner, in
        id order. What the leader's spread separation reads each rebalancing round
        (``docs/architecture.md``, "Spread groups"). This default reads every
        running job; override it with one query over the spread column."""
        page = await self.list_jobs(
            JobQuery(statuses=frozenset({JobStatus.PROCESSING}), limit=None)
        )
        return [
            SpreadJob(job.id, job.server_id, Pool(job.kind, job.constraints), job.spread, job.fence)
            for job in page.items
            if job.server_id is not None and job.spread is not None
        ]

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

    async def create_jobs(
        self, jobs: Sequence[NewJob], holder: str, lease_until: datetime
    ) -> list[JobRecord]:
        """Insert several jobs and a ``PUBLISH`` outbox row for each, exactly as
        :meth:`create_job` does for one, **in one transaction: all or nothing**.
        Returns the records in the order of ``jobs``; an empty ``jobs`` returns
        ``[]`` and writes nothing. Raises :class:`DuplicateJobName` naming a name
        that is taken by a job that is not ``deleted``, or that occurs twice in
        ``jobs``; then nothing is written.

        Optional: this default raises :class:`NotImplementedError` (a loop over
        :meth:`create_job` could not undo the jobs it created before a duplicate,
        and the client promises all or nothing), so a backend without it keeps
        working for everything else and ``OrchestratorClient.create_jobs`` says
        clearly that the backend lacks it. Override it with one transaction
        (a multi-row ``INSERT``, chunked to the database's parameter limits)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement create_jobs (an atomic batch insert); "
            "create the jobs one by one with create_job"
        )

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

        * upsert the server row (name, max_workers, host, pid, started_at, the
          kinds it runs (``heartbeat.kinds``, the default kind when empty) and its
          labels,
          ``updatable`` (``heartbeat.updatable`` if ``heartbeat.drops``, else
          ``None``: a server that reads no drop marks),
          ``last_seen = now``, status ``draining`` if ``heartbeat.draining`` or
          the row is already ``draining`` (a drain was requested), else
          ``alive``). A server already marked ``dead`` or ``left`` comes back
          ``alive`` when it is heard again.
        * for every reported job, apply ``START`` with the reported fence
          (guard ``NEWER``) and set ``last_heartbeat`` from the report
          (``now`` when the report's is ``None``; ``restarts`` too; ``updated_at``
          is bumped as by :meth:`transition`). A job the report would change
          in nothing but ``last_heartbeat`` (``processing`` on this server with
          this fence and these restarts, ``reason`` unset) may be left as it is
          while its stored ``last_heartbeat`` is less than
          :data:`HEARTBEAT_REFRESH_STEP` older than the reported one (it still
          accepted the report: it is not returned);
        * every job recorded ``processing`` on this server that the report does
          not list goes back to ``pending`` (owner cleared, ``reason`` set) — the
          server no longer runs it. Jobs ``deleting`` on it that the report does
          not list lose the owner too (they stay ``deleting``). A heartbeat of
          what changed (``heartbeat.base`` set) lists only the jobs that are new
          or changed: then this applies to the ids in ``heartbeat.gone`` alone
          (:func:`heartbeat_gone`), and the other jobs are left as they are.

        Returns the reported jobs whose row did *not* accept the report: owned
        by another server with a newer or equal token, ``deleting``,
        ``deleted``, ``completed`` — and a :class:`JobRecord` cannot be returned
        for an unknown id, so unknown ids are left out. The manager tells the
        server to stop those copies."""

    async def read_and_apply_heartbeat(
        self, heartbeat: ServerHeartbeat, now: datetime, read: Sequence[str]
    ) -> tuple[list[JobRecord], list[JobRecord]]:
        """:meth:`get_jobs` of ``read`` as they were before the heartbeat, then
        :meth:`apply_heartbeat`: returns ``(before, rejected)``. The manager
        reads the jobs whose start reports a heartbeat carries
        (``ServerHeartbeat.started``) before applying it. The default makes the
        two calls; a storage that can do both in one round trip should (the
        heartbeats sent while a fleet fills carry starts, and a manager applies
        them one after another)."""
        before = await self.get_jobs(read) if read else []
        return before, await self.apply_heartbeat(heartbeat, now)

    async def touch_servers(self, heartbeats: Sequence[tuple[ServerHeartbeat, datetime]]) -> None:
        """Write the server rows of heartbeats that list no job and name none gone
        (each with the time it was received), as :meth:`apply_heartbeat` would,
        in this order: the manager gathers the heartbeats that change nothing but
        their server's row and writes them together. The default applies them one
        by one; a storage that can write them in one statement should."""
        for heartbeat, now in heartbeats:
            if heartbeat.jobs or heartbeat.gone or not heartbeat.base:
                raise ValueError("touch_servers takes heartbeats that list no job")
            await self.apply_heartbeat(heartbeat, now)

    @abc.abstractmethod
    async def expire_servers(self, seen_before: datetime, now: datetime) -> list[ServerRecord]:
        """Mark every ``alive`` or ``draining`` server with ``last_seen < seen_before``
        ``dead`` and apply ``SERVER_LOST`` to its jobs, in one transaction.
        Returns the servers it marked.

        Every release of a ``processing`` job (``SERVER_LOST`` here and in
        :meth:`server_left` and :meth:`apply_heartbeat`, ``RELEASE`` in
        :meth:`transition`) whose argument was updated in place under its current
        generation (``inplace_floor >= generation``) makes it ``pending`` under
        ``generation + 1`` with ``fence := max(fence, make_fence(generation + 1,
        0))`` and inserts an unclaimed ``PUBLISH`` outbox row, in the same
        transaction, as ``CONFIRM_HELD`` of an ``update_pending`` job does: the
        broker's message of the old generation carries the old argument (a drop
        mark drops it); the relay sends one with the new argument."""

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

    async def complete_outbox_for_jobs(
        self, job_ids: Sequence[str], kind: OutboxKind, holder: str
    ) -> int:
        """:meth:`complete_outbox_for_job` for many jobs: delete the outbox rows of
        ``kind`` for these jobs that ``holder`` has claimed; returns how many.
        Need not be one transaction (each row's deletion stands alone). This
        default calls :meth:`complete_outbox_for_job` per job; override it with
        one statement."""
        deleted = 0
        for job_id in dict.fromkeys(job_ids):
            deleted += await self.complete_outbox_for_job(job_id, kind, holder)
        return deleted

    async def raise_pending_generation(self, job_id: str, generation: int) -> bool:
        """Give a job that waits for a server a new generation, before its message is
        sent again (the outbox relay): ``generation := generation + 1`` in one
        guarded update, applied only while the job is ``pending``, no server owns
        it and its generation is still ``generation``. Returns whether it applied.

        A message that may have been sent already (its sender could not delete its
        outbox row) is then never sent twice under one generation: a copy of the
        older message gets a smaller fencing token than a copy of the new one, and
        is superseded by it (I1). Nothing else of the row changes. The one place a
        generation is raised for a re-send; a backend written before it raises
        NotImplementedError (the relay then re-sends under the old generation)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement raise_pending_generation"
        )

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

    # -- lifecycle controls (orchestratr_core.lifecycle) -------------------------------
    # Optional for a backend written before them: each default raises
    # NotImplementedError, which the client turns into a clear message.

    async def request_pause(
        self, job_id: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """Apply :data:`JobEvent.PAUSE` (reason :data:`REASON_PAUSE_REQUESTED`) and,
        if it applied, insert an outbox row ``CANCEL`` (it asks for the stop set,
        hold marks included, to be written) claimed by ``holder`` — in one
        transaction. A ``pausing`` job with ``update_pending`` (an update stops
        its copy to restart it) changes too: ``update_pending := 0`` and the
        reason, so that it ends ``paused`` instead of restarting (with the new
        argument once resumed). Returns the job after the attempt and whether it
        changed. Raises :class:`UnknownJob` for an unknown id."""
        raise NotImplementedError(f"{type(self).__name__} does not implement pause")

    async def request_resume(
        self, job_id: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """Apply :data:`JobEvent.RESUME` (``paused|quarantined -> pending`` while no
        server owns it; ``generation := generation + 1``, reason
        :data:`REASON_RESUMED`, ``failure_log := NULL``, ``failure_seq := failure_seq + 1``
        so that a failure counted from the state before the resume loses its
        compare-and-set in :meth:`record_failure`) and, if it applied, insert an outbox row
        ``PUBLISH`` of the new generation claimed by ``holder`` — in one
        transaction. Returns the job after the attempt and whether it changed.
        Raises :class:`UnknownJob` for an unknown id."""
        raise NotImplementedError(f"{type(self).__name__} does not implement resume")

    async def request_update(
        self, job_id: str, argument: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """Replace a job's argument (validated), in one guarded update and one
        transaction (``docs/architecture.md``, "Updating a job's argument"):

        * ``pending`` or ``processing``: the job becomes ``pausing`` with
          ``update_pending`` set, ``update_floor := generation`` and reason
          :data:`REASON_UPDATE_REQUESTED` (the owner stays: it confirms), and an
          outbox row ``CANCEL`` (the stop set, with the job's hold mark) claimed
          by ``holder`` is inserted. Once a server confirms the old copy stopped
          (``CONFIRM_HELD``), the job is ``pending`` under a new generation.
        * ``pausing``, ``paused`` or ``quarantined``: the status and
          ``update_pending`` stay (a paused job resumes with the new argument);
          a ``pausing`` one gets the outbox row too.
        * in every case above ``argument := argument``, ``argument_version + 1``,
          ``argument_updated_at := now``, ``updated_at := now``.

        ``deleting``, ``deleted`` and ``completed`` jobs are left unchanged
        (returned with ``False``). Raises :class:`UnknownJob` for an unknown id.
        Returns the job after the attempt and whether it changed."""
        raise NotImplementedError(f"{type(self).__name__} does not implement update")

    async def request_update_in_place(
        self, job_id: str, argument: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool] | None:
        """Replace the argument of a running job *in place*, if it can be: in one
        guarded update and one transaction (``docs/architecture.md``, "Updating
        in place"), applied only while

        * the job is ``processing`` and its owner's server row is ``alive`` and
          lists the job's kind among its ``updatable`` kinds, and
        * no ``alive`` or ``draining`` server has ``updatable`` ``NULL`` (a
          server of an older version, which would start a message a drop mark
          covers);

        then ``argument := argument``, ``argument_version + 1``,
        ``argument_updated_at := now``, ``updated_at := now``, ``inplace_floor :=
        generation``, reason :data:`REASON_UPDATED_IN_PLACE` — status, owner,
        fence and generation unchanged — and an outbox row ``CANCEL`` (the stop
        set, with the drop mark :meth:`inplace_floors` gives) claimed by
        ``holder``. Returns the job and ``True``; ``None`` when it did not apply
        (the caller takes :meth:`request_update`'s restart instead). Raises
        :class:`UnknownJob` for an unknown id. A backend without it raises
        :class:`NotImplementedError` (every update restarts)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement update in place")

    async def record_update_applied(
        self, job_id: str, server_id: str, fence: int, argument_version: int
    ) -> bool:
        """The copy of ``job_id`` under ``fence`` on ``server_id`` took argument
        version ``argument_version`` in place (``JobUpdated``): ``argument_applied_version
        := argument_version`` in one guarded update, applied only while the job
        is ``processing`` with this owner and fence (guard ``OWNER``),
        ``inplace_floor >= generation`` and ``argument_applied_version <
        argument_version <= :argument_version``'s stored ``argument_version``
        (an acknowledgement of an older version than stored counts nothing).
        Returns whether it applied."""
        raise NotImplementedError(f"{type(self).__name__} does not implement update in place")

    async def unapplied_updates(self, updated_since: datetime) -> list[JobRecord]:
        """Every ``processing`` job updated in place (``inplace_floor >=
        generation``) whose owner has not acknowledged the latest version
        (``argument_applied_version < argument_version``) and whose argument was
        updated at or after ``updated_since``, ascending by id: what the leader
        sends ``UpdateJob`` for again, or restarts (:meth:`fall_back_update`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement update in place")

    async def fall_back_update(
        self, job_id: str, argument_version: int, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """Restart a job whose update in place was not acknowledged, exactly as
        :meth:`request_update` restarts a ``processing`` job (``pausing``,
        ``update_pending``, ``update_floor := generation``, reason
        :data:`REASON_UPDATE_FELL_BACK`, an outbox row ``CANCEL`` claimed by
        ``holder``), in one guarded update applied only while the job is
        ``processing``, ``inplace_floor >= generation``, ``argument_version =
        :argument_version`` and ``argument_applied_version < argument_version``
        (a newer update, or a late acknowledgement, wins). Returns the job and
        whether it changed; raises :class:`UnknownJob` for an unknown id."""
        raise NotImplementedError(f"{type(self).__name__} does not implement update in place")

    async def inplace_floors(self, updated_since: datetime) -> list[tuple[str, int]]:
        """``(id, inplace_floor)`` of every job updated in place whose argument was
        updated at or after ``updated_since`` and that is ``pending``,
        ``processing`` or ``deleting``, ascending by id: the drop marks of the
        servers' cancellation set (a message of the job up to that generation
        carries an older argument and is dropped; a copy that runs is not
        stopped). A backend without it returns none."""
        return []

    async def update_floors(self, updated_since: datetime) -> list[tuple[str, int]]:
        """``(id, update_floor)`` of every job whose argument was updated at or
        after ``updated_since`` and that is neither held nor final, ascending by
        id: hold marks that make servers drop a stray message of a generation
        that carried the old argument (a held job has its own, higher mark)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement update")

    async def save_checkpoints(
        self, server_id: str, checkpoints: Sequence[tuple[str, int, str]], now: datetime
    ) -> list[str]:
        """Store ``(job_id, fence, checkpoint)`` reports of ``server_id``, each as
        one guarded update (I9): kept only if the job is not ``deleted`` or
        ``completed``, ``server_id`` is its recorded owner under this fence
        (guard ``OWNER``: a stale owner, or a copy whose start was refused, never
        writes one) and the fence is not below the stored checkpoint's.
        :meth:`apply_heartbeat` runs first, so a heartbeat's own start counts.
        Sets ``checkpoint``, ``checkpoint_fence := :fence``, ``checkpoint_at :=
        now``; nothing else. Returns the ids whose checkpoint was stored."""
        raise NotImplementedError(f"{type(self).__name__} does not implement checkpoints")

    async def held_jobs(self) -> list[tuple[str, int]]:
        """``(id, generation)`` of every ``pausing``, ``paused`` or ``quarantined``
        job, ascending by id: the hold marks of the servers' cancellation set.
        This default reads them through :meth:`list_jobs`."""
        page = await self.list_jobs(
            JobQuery(
                statuses=frozenset({JobStatus.PAUSING, JobStatus.PAUSED, JobStatus.QUARANTINED}),
                limit=None,
            )
        )
        return [(job.id, job.generation) for job in page.items]

    async def record_failure(
        self,
        job_id: str,
        *,
        seq: int,
        failure_log: str,
        now: datetime,
        quarantine: str | None = None,
    ) -> TransitionResult:
        """Count one failure of a job (its function raised, or its server died
        holding it), as a compare-and-set: applies only while ``failure_seq =
        seq`` and the job is not ``deleted`` or ``completed``; then
        ``failure_seq := seq + 1``, ``failure_log := failure_log``,
        ``updated_at := now``, and with a ``quarantine`` reason a ``pending``
        or ``processing`` job becomes ``quarantined`` (:data:`JobEvent.QUARANTINE`;
        its owner kept, to confirm) with ``reason := quarantine``. The caller
        reads the job again and retries when it did not apply."""
        raise NotImplementedError(f"{type(self).__name__} does not implement restart budgets")

    async def record_failures(self, counts: Sequence[FailureCount], now: datetime) -> list[str]:
        """:meth:`record_failure` for many jobs at once (the owner deaths of a
        server declared dead), each its own compare-and-set: returns the ids of
        the jobs whose count applied; the caller reads the others again and
        retries. A job named twice counts once (the second finds a moved
        ``failure_seq``). This default calls :meth:`record_failure` per job; a
        storage that can write them in one statement should (PostgreSQL)."""
        applied = []
        for count in counts:
            result = await self.record_failure(
                count.job_id,
                seq=count.seq,
                failure_log=count.failure_log,
                now=now,
                quarantine=count.quarantine,
            )
            if result.applied:
                applied.append(count.job_id)
        return applied

    async def set_restart_budget(
        self, job_id: str, max_restarts: int | None, restart_window: float | None
    ) -> None:
        """Record a job's restart budget (``max_restarts``, ``restart_window``),
        nothing else. Unknown ids are ignored."""
        raise NotImplementedError(f"{type(self).__name__} does not implement restart budgets")

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

    async def count_running_by_server(self) -> dict[str, int]:
        """How many jobs are ``processing`` on each server: server id -> count,
        servers without such a job left out (``deleting`` jobs are not counted).
        What rebalancing needs, without reading the jobs. This default counts the
        running jobs :meth:`list_servers` returns for every server (whatever its
        status); override it with one aggregate query."""
        servers = await self.list_servers(ServerQuery(statuses=None, with_jobs=True))
        counts: dict[str, int] = {}
        for server in servers:
            running = sum(1 for job in server.running if job.status is JobStatus.PROCESSING)
            if running:
                counts[server.id] = running
        return counts

    async def pending_pools(self) -> dict[Pool, int]:
        """How many jobs are ``pending`` in each pool (kind and constraints), pools
        without a pending job left out. What the leader needs to work out pending
        reasons. This default reads every pending job; override it with one
        aggregate query."""
        page = await self.list_jobs(JobQuery(statuses=frozenset({JobStatus.PENDING}), limit=None))
        counts: dict[Pool, int] = {}
        for job in page.items:
            pool = Pool(job.kind, job.constraints)
            counts[pool] = counts.get(pool, 0) + 1
        return counts

    async def set_pending_reason(self, pool: Pool, reason: str | None) -> int:
        """Set ``pending_reason`` of every ``pending`` job of ``pool`` (kind and
        constraints) to ``reason``, in one statement; returns how many rows
        changed. Jobs in other statuses keep theirs (a reader shows it only
        while pending). Optional: this default raises :class:`NotImplementedError`
        and the manager then shows no reasons."""
        raise NotImplementedError(f"{type(self).__name__} does not store pending reasons")

    async def count_running_by_pool(self) -> dict[tuple[str, Pool], int]:
        """How many jobs are ``processing`` on each server in each pool:
        ``(server id, pool) -> count``. What rebalancing by pool needs. This default
        reads every running job; override it with one aggregate query."""
        page = await self.list_jobs(
            JobQuery(statuses=frozenset({JobStatus.PROCESSING}), limit=None)
        )
        counts: dict[tuple[str, Pool], int] = {}
        for job in page.items:
            if job.server_id is not None:
                key = (job.server_id, Pool(job.kind, job.constraints))
                counts[key] = counts.get(key, 0) + 1
        return counts

    @abc.abstractmethod
    async def get_server(self, server_id: str) -> ServerRecord | None:
        """One server with its running jobs."""

    @abc.abstractmethod
    async def set_server_status(self, server_id: str, status: ServerStatus, now: datetime) -> bool:
        """Set a server's status (e.g. ``draining`` when a drain is requested).
        ``now`` is when it was requested; ``last_seen`` is not touched (only a
        heartbeat says a server is alive). False for an unknown server."""


def _in_range(what: str, value: int, high: int) -> None:
    if not 0 <= value <= high:
        raise DataRejected(f"{what} {value} is outside 0..{high}, the range its column stores")


def check_transition(fence: int, restarts: int | None) -> None:
    """Raise :class:`DataRejected` for a fence or restart count no storage column
    holds (``BIGINT`` / ``INTEGER``). Backends call it before writing: some
    databases would otherwise store such a value differently (a JSON number
    read as a float) instead of refusing it."""
    _in_range("fence", fence, MAX_FENCE)
    if restarts is not None:
        _in_range("restarts", restarts, MAX_COUNT)


def heartbeat_gone(heartbeat: ServerHeartbeat) -> list[str] | None:
    """The jobs a heartbeat releases by name: ``None`` for a complete listing
    (every unlisted job of the server is released), else the ids it says are gone,
    less any it also lists as running (a delta never holds both)."""
    if not heartbeat.base:
        return None
    listed = {job.job_id for job in heartbeat.jobs}
    return sorted({job_id for job_id in heartbeat.gone if job_id not in listed})


def check_heartbeat(heartbeat: ServerHeartbeat) -> None:
    """:func:`check_transition` for a whole heartbeat, with its ``max_workers`` and ``pid``."""
    _in_range("max_workers", heartbeat.max_workers, MAX_COUNT)
    _in_range("pid", heartbeat.pid, MAX_COUNT)
    for job in heartbeat.jobs:
        check_transition(job.fence, job.restarts)
