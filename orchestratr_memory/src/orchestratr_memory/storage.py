# Over 600 lines on purpose: the reference storage, read top to bottom as one file.
"""The in-memory storage: the reference implementation of the Storage contract.

Every method does its whole work without awaiting, under one lock per store, so
each call is one atomic unit exactly as a transaction is on a SQL backend. The
job state machine is applied generically from :data:`orchestratr_core.job.TRANSITIONS`
(sources, target, guard, owner effects), so this backend cannot drift from it.

Stores are private to their :class:`MemoryStorage` object unless given a name
(``memory://name``): objects opened with the same name in one process share one
store, so a manager and a CLI client in that process see the same jobs.

Jobs are kept in a dict by id plus a sorted list of ids (keyset paging with
:mod:`bisect`), with indexes by name (uniqueness among jobs that are not
deleted), by status and by server, so a million jobs stay usable.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar
from urllib.parse import urlsplit

from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    DuplicateJobName,
    UnknownJob,
)
from orchestratr_core.job import (
    TRANSITIONS,
    Guard,
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
    make_fence,
    split_fence,
)
from orchestratr_core.placement import Pool
from orchestratr_core.protocol import ServerHeartbeat
from orchestratr_core.storage import (
    HEARTBEAT_REFRESH_STEP,
    REASON_CANCEL_REQUESTED,
    REASON_NOT_REPORTED,
    REASON_PAUSE_REQUESTED,
    REASON_RESUMED,
    REASON_SERVER_DEAD,
    REASON_SERVER_LEFT,
    REASON_UPDATE_FELL_BACK,
    REASON_UPDATE_REQUESTED,
    REASON_UPDATED,
    REASON_UPDATED_IN_PLACE,
    OutboxItem,
    OutboxKind,
    Storage,
    check_heartbeat,
    check_transition,
    heartbeat_gone,
)

__all__ = ["MemoryStorage"]

_RUNNING = frozenset({JobStatus.PROCESSING, JobStatus.DELETING})
_LIVE_SERVER = frozenset({ServerStatus.ALIVE, ServerStatus.DRAINING})

_REFRESH_STEP = timedelta(seconds=HEARTBEAT_REFRESH_STEP)
_FLOOR_STATUSES = frozenset({JobStatus.PENDING, JobStatus.PROCESSING, JobStatus.DELETING})


def _in_place(row: JobRecord) -> bool:
    """Whether the job's current generation was updated in place."""
    return row.inplace_floor is not None and row.inplace_floor >= row.generation


def _guard_holds(guard: Guard, row: JobRecord, server_id: str | None, fence: int) -> bool:
    """Evaluate a :class:`Guard` the way SQL would (``NULL = x`` is never true)."""
    owned_by_reporter = (
        row.server_id is not None and server_id is not None and row.server_id == server_id
    )
    if guard is Guard.NONE:
        return True
    if guard is Guard.OWNER:
        return owned_by_reporter and row.fence == fence
    if guard is Guard.NEWER:
        return row.fence < fence or (
            row.fence == fence and (row.server_id is None or owned_by_reporter)
        )
    if guard is Guard.NOT_OLDER:
        return row.server_id is None or row.fence <= fence
    if guard is Guard.UNOWNED:
        return row.server_id is None
    raise ValueError(f"unknown guard {guard!r}")  # pragma: no cover - enum is closed


@dataclass
class _OutboxRow:
    item: OutboxItem
    holder: str | None
    claimed_until: datetime | None


@dataclass
class _Store:
    """The data of one store, shared by every :class:`MemoryStorage` bound to it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    by_status: dict[JobStatus, set[str]] = field(
        default_factory=lambda: {status: set() for status in JobStatus}
    )
    by_server: dict[str, set[str]] = field(default_factory=dict)
    servers: dict[str, ServerRecord] = field(default_factory=dict)
    outbox: dict[int, _OutboxRow] = field(default_factory=dict)
    next_outbox_id: int = 1
    leases: dict[str, tuple[str, datetime]] = field(default_factory=dict)
    updated: set[str] = field(default_factory=set)
    """Ids of the jobs whose argument was ever updated (``update_floors``)."""

    # -- index maintenance: every job write goes through put() ----------------------

    def put(self, old: JobRecord | None, new: JobRecord) -> None:
        """Store ``new`` (replacing ``old``, the current row or ``None``) and keep
        every index in step."""
        if old is None:
            if self.order and self.order[-1] < new.id:
                self.order.append(new.id)
            else:
                bisect.insort(self.order, new.id)
        else:
            if old.status is not new.status:
                self.by_status[old.status].discard(old.id)
            if old.server_id != new.server_id and old.server_id is not None:
                owned = self.by_server.get(old.server_id)
                if owned is not None:
                    owned.discard(old.id)
                    if not owned:
                        del self.by_server[old.server_id]
        self.by_status[new.status].add(new.id)
        if new.server_id is not None:
            self.by_server.setdefault(new.server_id, set()).add(new.id)
        if new.update_floor is not None or new.inplace_floor is not None:
            self.updated.add(new.id)
        if new.status is JobStatus.DELETED:
            if self.names.get(new.name) == new.id:
                del self.names[new.name]
        else:
            self.names[new.name] = new.id
        self.jobs[new.id] = new

    def add_outbox(
        self, job: JobRecord, kind: OutboxKind, now: datetime, holder: str, until: datetime
    ) -> None:
        """Queue a message that the holder sends at once (claimed until ``until``)."""
        item = OutboxItem(
            id=self.next_outbox_id,
            job_id=job.id,
            kind=kind,
            generation=job.generation,
            created_at=now,
        )
        self.next_outbox_id += 1
        self.outbox[item.id] = _OutboxRow(item, holder, until)

    # -- the state machine ---------------------------------------------------------------

    def apply(
        self,
        row: JobRecord,
        event: JobEvent,
        *,
        server_id: str | None,
        fence: int,
        now: datetime,
        error: str | None = None,
        restarts: int | None = None,
        reason: str | None = None,
    ) -> tuple[bool, JobRecord]:
        """Apply one row of TRANSITIONS to ``row`` as a guarded update; return
        whether it applied and the row afterwards."""
        rule = TRANSITIONS[event]
        if row.status not in rule.sources or not _guard_holds(rule.guard, row, server_id, fence):
            return False, row
        if (
            event is JobEvent.START
            and row.inplace_floor is not None
            and split_fence(fence)[0] <= row.inplace_floor
            and not (row.server_id == server_id and row.fence == fence)
        ):
            return False, row  # a message an update in place superseded: the old argument
        changes: dict[str, object] = {"updated_at": now, "reason": reason}
        republish = (
            event in (JobEvent.SERVER_LOST, JobEvent.RELEASE)
            and row.status is JobStatus.PROCESSING
            and _in_place(row)
        )
        if republish:
            # Updated in place under this generation: the broker's message carries
            # the old argument (a drop mark drops it); a new one, with the new
            # argument, is sent under the next generation (Storage.expire_servers).
            changes["generation"] = row.generation + 1
            changes["fence"] = max(row.fence, make_fence(row.generation + 1, 0))
        if event is JobEvent.SERVER_LOST:
            # The rows whose target depends on the source (see TRANSITIONS).
            if row.status is JobStatus.PROCESSING:
                changes["status"] = JobStatus.PENDING
        elif event is JobEvent.CONFIRM_HELD:
            if row.status is JobStatus.PAUSING and row.update_pending:
                # An update stopped it: pending under a new generation, with the
                # new argument (the restart is in this transaction: never lost).
                changes["status"] = JobStatus.PENDING
                changes["generation"] = row.generation + 1
                # Any older message's copy (the old argument) now fails START's guard.
                changes["fence"] = max(row.fence, make_fence(row.generation + 1, 0))
                changes["update_pending"] = False
                changes["reason"] = REASON_UPDATED
            elif row.status is JobStatus.PAUSING:
                changes["status"] = JobStatus.PAUSED
            else:
                changes["reason"] = row.reason  # a quarantine keeps its reason
        elif rule.target is not None:
            changes["status"] = rule.target
        if rule.sets_owner:
            if server_id is None:
                raise ValueError(f"{event.value} needs the reporting server's id")
            if row.server_id != server_id or row.fence != fence:
                changes["started_at"] = now
            changes["server_id"] = server_id
            changes["fence"] = fence
            changes["last_heartbeat"] = now
        if rule.clears_owner:
            changes["server_id"] = None
        if event is JobEvent.FAIL:
            changes["last_error"] = error
            if restarts is not None:
                changes["restarts"] = restarts
        elif event is JobEvent.START and restarts is not None:
            changes["restarts"] = restarts
        elif event is JobEvent.RESUME:
            changes["generation"] = row.generation + 1
            changes["failure_log"] = None
            # A count read before the resume must lose its compare-and-set.
            changes["failure_seq"] = row.failure_seq + 1
        elif event is JobEvent.QUARANTINE:
            if error is not None:
                changes["last_error"] = error
            if restarts is not None:
                changes["restarts"] = restarts
        new = dataclasses.replace(row, **changes)  # type: ignore[arg-type]
        self.put(row, new)
        if republish or (event is JobEvent.CONFIRM_HELD and new.status is JobStatus.PENDING):
            self.add_outbox(new, OutboxKind.PUBLISH, now, "", now)  # unclaimed: the relay's
        return True, new

    def lose_jobs(
        self,
        server_id: str,
        now: datetime,
        reason: str,
        keep: Iterable[str] | None = None,
        only: Iterable[str] | None = None,
    ) -> None:
        """Apply SERVER_LOST to every job owned by ``server_id``. From a heartbeat
        (``keep``: its reported jobs, or ``only``: the jobs a delta says are gone)
        only to its running (``processing``, ``deleting``) jobs not in ``keep``
        (and among ``only``), as the SQL storages do: a ``pausing`` job keeps its
        owner until that owner confirms or dies."""
        owned = self.by_server.get(server_id, set())
        if keep is not None or only is not None:
            kept = set(keep or ())
            owned = {j for j in owned if j not in kept and self.jobs[j].status in _RUNNING}
        if only is not None:
            owned &= set(only)
        for job_id in sorted(owned):
            self.apply(
                self.jobs[job_id],
                JobEvent.SERVER_LOST,
                server_id=server_id,
                fence=0,
                now=now,
                reason=reason,
            )

    def with_running(self, server: ServerRecord) -> ServerRecord:
        """``server`` with ``running`` filled from the job table."""
        running = tuple(
            self.jobs[job_id]
            for job_id in sorted(self.by_server.get(server.id, ()))
            if self.jobs[job_id].status in _RUNNING
        )
        return dataclasses.replace(server, running=running)


def _matches(job: JobRecord, query: JobQuery) -> bool:
    if query.statuses is not None:
        if job.status not in query.statuses:
            return False
    elif job.status is JobStatus.DELETED and not query.include_deleted:
        return False
    if query.name_prefix is not None and not job.name.startswith(query.name_prefix):
        return False
    if query.kind is not None and job.kind != query.kind:
        return False
    return query.server_id is None or job.server_id == query.server_id


def _name_from_url(url: str | None) -> str | None:
    if url is None:
        return None
    value = url.strip()
    if not value or value.lower() in ("memory", "memory:", "memory://"):
        return None
    parts = urlsplit(value)
    if parts.scheme.lower() != "memory":
        raise ConfigurationError(
            f"the memory storage takes memory://name URLs, not {parts.scheme or value!r}://"
        )
    name = (parts.netloc + parts.path).strip("/")
    return name or None


class MemoryStorage(Storage):
    """The in-process reference :class:`~orchestratr_core.storage.Storage`.

    :param url: ``None`` or ``memory://`` for a private store; ``memory://name``
        to share the store called ``name`` with every other ``MemoryStorage`` of
        that name in this process.
    """

    process_local = True
    _shared: ClassVar[dict[str, _Store]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str | None = None) -> None:
        self.name = _name_from_url(url)
        """The shared store's name, or ``None`` for a private store."""
        if self.name is None:
            self._store = _Store()
        else:
            with MemoryStorage._shared_lock:
                self._store = MemoryStorage._shared.setdefault(self.name, _Store())
        self._closed = False

    def __repr__(self) -> str:
        where = f"memory://{self.name}" if self.name else "private"
        return f"MemoryStorage({where}, {len(self._store.jobs)} jobs)"

    @classmethod
    def forget(cls, name: str) -> None:
        """Drop the shared store called ``name`` (objects still bound to it keep it)."""
        with cls._shared_lock:
            cls._shared.pop(name, None)

    def _data(self) -> _Store:
        if self._closed:
            raise BackendUnavailable("this memory storage is closed")
        return self._store

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Nothing to connect; (re)opens a closed object on the same store."""
        self._closed = False

    async def close(self) -> None:
        """Mark this object closed (the data stays for other objects of a shared
        store). Idempotent."""
        self._closed = True

    # -- jobs -------------------------------------------------------------------------------

    async def create_job(self, job: NewJob, holder: str, lease_until: datetime) -> JobRecord:
        """See :meth:`Storage.create_job`."""
        return self._create([job], holder, lease_until)[0]

    async def create_jobs(
        self, jobs: Sequence[NewJob], holder: str, lease_until: datetime
    ) -> list[JobRecord]:
        """See :meth:`Storage.create_jobs`: every check first, then every write,
        under the store's lock (all or nothing)."""
        return self._create(jobs, holder, lease_until)

    def _create(
        self, jobs: Sequence[NewJob], holder: str, lease_until: datetime
    ) -> list[JobRecord]:
        store = self._data()
        with store.lock:
            names: set[str] = set()
            ids: set[str] = set()
            for job in jobs:
                if job.name in store.names or job.name in names:
                    raise DuplicateJobName(job.name)
                if job.id in store.jobs or job.id in ids:
                    raise ValueError(f"a job with id {job.id!r} already exists")
                names.add(job.name)
                ids.add(job.id)
            records: list[JobRecord] = []
            for job in jobs:
                record = job.record()
                store.put(None, record)
                store.add_outbox(record, OutboxKind.PUBLISH, job.created_at, holder, lease_until)
                records.append(record)
            return records

    async def request_cancel(
        self, job_id: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """See :meth:`Storage.request_cancel`."""
        return self._request(
            job_id,
            JobEvent.CANCEL,
            OutboxKind.CANCEL,
            now,
            holder,
            lease_until,
            REASON_CANCEL_REQUESTED,
        )

    async def request_pause(
        self, job_id: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """See :meth:`Storage.request_pause` (an update's restart is called off)."""
        job, changed = self._request(
            job_id,
            JobEvent.PAUSE,
            OutboxKind.CANCEL,
            now,
            holder,
            lease_until,
            REASON_PAUSE_REQUESTED,
        )
        if changed or job.status is not JobStatus.PAUSING or not job.update_pending:
            return job, changed
        store = self._data()
        with store.lock:
            row = store.jobs[job_id]
            if row.status is not JobStatus.PAUSING or not row.update_pending:
                return row, False
            new = dataclasses.replace(
                row, update_pending=False, reason=REASON_PAUSE_REQUESTED, updated_at=now
            )
            store.put(row, new)
            store.add_outbox(new, OutboxKind.CANCEL, now, holder, lease_until)
            return new, True

    async def request_update(
        self, job_id: str, argument: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """See :meth:`Storage.request_update`."""
        store = self._data()
        with store.lock:
            row = store.jobs.get(job_id)
            if row is None:
                raise UnknownJob(job_id)
            if row.status.final or row.status is JobStatus.DELETING:
                return row, False
            changes: dict[str, object] = {
                "argument": argument,
                "argument_version": row.argument_version + 1,
                "argument_updated_at": now,
                "updated_at": now,
            }
            if row.status in (JobStatus.PENDING, JobStatus.PROCESSING):
                changes.update(
                    status=JobStatus.PAUSING,
                    update_pending=True,
                    update_floor=row.generation,
                    reason=REASON_UPDATE_REQUESTED,
                )
            new = dataclasses.replace(row, **changes)  # type: ignore[arg-type]
            store.put(row, new)
            if new.status is JobStatus.PAUSING:
                store.add_outbox(new, OutboxKind.CANCEL, now, holder, lease_until)
            return new, True

    async def request_update_in_place(
        self, job_id: str, argument: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool] | None:
        """See :meth:`Storage.request_update_in_place`."""
        store = self._data()
        with store.lock:
            row = store.jobs.get(job_id)
            if row is None:
                raise UnknownJob(job_id)
            owner = None if row.server_id is None else store.servers.get(row.server_id)
            if (
                row.status is not JobStatus.PROCESSING
                or owner is None
                or owner.status is not ServerStatus.ALIVE
                or row.kind not in (owner.updatable or ())
                or any(
                    server.status in _LIVE_SERVER and server.updatable is None
                    for server in store.servers.values()
                )
            ):
                return None
            new = dataclasses.replace(
                row,
                argument=argument,
                argument_version=row.argument_version + 1,
                argument_updated_at=now,
                updated_at=now,
                inplace_floor=row.generation,
                reason=REASON_UPDATED_IN_PLACE,
            )
            store.put(row, new)
            store.add_outbox(new, OutboxKind.CANCEL, now, holder, lease_until)
            return new, True

    async def record_update_applied(
        self, job_id: str, server_id: str, fence: int, argument_version: int
    ) -> bool:
        """See :meth:`Storage.record_update_applied`."""
        store = self._data()
        with store.lock:
            row = store.jobs.get(job_id)
            if (
                row is None
                or row.status is not JobStatus.PROCESSING
                or not _guard_holds(Guard.OWNER, row, server_id, fence)
                or not _in_place(row)
                or not row.argument_applied_version < argument_version <= row.argument_version
            ):
                return False
            store.put(row, dataclasses.replace(row, argument_applied_version=argument_version))
            return True

    async def unapplied_updates(self, updated_since: datetime) -> list[JobRecord]:
        """See :meth:`Storage.unapplied_updates`."""
        store = self._data()
        with store.lock:
            jobs = (store.jobs[job_id] for job_id in sorted(store.updated))
            return [
                job
                for job in jobs
                if job.status is JobStatus.PROCESSING
                and _in_place(job)
                and job.argument_applied_version < job.argument_version
                and job.argument_updated_at is not None
                and job.argument_updated_at >= updated_since
            ]

    async def fall_back_update(
        self, job_id: str, argument_version: int, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """See :meth:`Storage.fall_back_update`."""
        store = self._data()
        with store.lock:
            row = store.jobs.get(job_id)
            if row is None:
                raise UnknownJob(job_id)
            if (
                row.status is not JobStatus.PROCESSING
                or not _in_place(row)
                or row.argument_version != argument_version
                or row.argument_applied_version >= argument_version
            ):
                return row, False
            new = dataclasses.replace(
                row,
                status=JobStatus.PAUSING,
                update_pending=True,
                update_floor=row.generation,
                reason=REASON_UPDATE_FELL_BACK,
                updated_at=now,
            )
            store.put(row, new)
            store.add_outbox(new, OutboxKind.CANCEL, now, holder, lease_until)
            return new, True

    async def inplace_floors(self, updated_since: datetime) -> list[tuple[str, int]]:
        """See :meth:`Storage.inplace_floors`."""
        return self._floors(updated_since, lambda job: job.inplace_floor)

    async def update_floors(self, updated_since: datetime) -> list[tuple[str, int]]:
        """See :meth:`Storage.update_floors`."""
        return self._floors(updated_since, lambda job: job.update_floor)

    def _floors(
        self, updated_since: datetime, floor: Callable[[JobRecord], int | None]
    ) -> list[tuple[str, int]]:
        """``(id, floor(job))`` of the jobs updated at or after ``updated_since``
        that are ``pending``, ``processing`` or ``deleting`` (neither held nor
        final), for which ``floor`` gives a generation."""
        store = self._data()
        with store.lock:
            out = []
            for job_id in store.updated:
                job = store.jobs[job_id]
                value = floor(job)
                if (
                    value is not None
                    and job.argument_updated_at is not None
                    and job.argument_updated_at >= updated_since
                    and job.status in _FLOOR_STATUSES
                ):
                    out.append((job_id, value))
            return sorted(out)

    async def raise_pending_generation(self, job_id: str, generation: int) -> bool:
        """See :meth:`Storage.raise_pending_generation`."""
        store = self._data()
        with store.lock:
            row = store.jobs.get(job_id)
            if (
                row is None
                or row.status is not JobStatus.PENDING
                or row.server_id is not None
                or row.generation != generation
            ):
                return False
            store.jobs[job_id] = dataclasses.replace(row, generation=generation + 1)
            return True

    async def request_resume(
        self, job_id: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """See :meth:`Storage.request_resume`."""
        return self._request(
            job_id, JobEvent.RESUME, OutboxKind.PUBLISH, now, holder, lease_until, REASON_RESUMED
        )

    def _request(
        self,
        job_id: str,
        event: JobEvent,
        kind: OutboxKind,
        now: datetime,
        holder: str,
        lease_until: datetime,
        reason: str,
    ) -> tuple[JobRecord, bool]:
        store = self._data()
        with store.lock:
            row = store.jobs.get(job_id)
            if row is None:
                raise UnknownJob(job_id)
            applied, job = store.apply(row, event, server_id=None, fence=0, now=now, reason=reason)
            if applied:
                store.add_outbox(job, kind, now, holder, lease_until)
            return job, applied

    async def save_checkpoints(
        self, server_id: str, checkpoints: Sequence[tuple[str, int, str]], now: datetime
    ) -> list[str]:
        """See :meth:`Storage.save_checkpoints`."""
        for _, fence, _ in checkpoints:
            check_transition(fence, None)
        store = self._data()
        saved: list[str] = []
        with store.lock:
            for job_id, fence, checkpoint in checkpoints:
                row = store.jobs.get(job_id)
                if (
                    row is None
                    or row.status.final
                    or not _guard_holds(Guard.OWNER, row, server_id, fence)
                    or (row.checkpoint_fence is not None and row.checkpoint_fence > fence)
                ):
                    continue
                new = dataclasses.replace(
                    row, checkpoint=checkpoint, checkpoint_fence=fence, checkpoint_at=now
                )
                store.put(row, new)
                saved.append(job_id)
        return saved

    async def held_jobs(self) -> list[tuple[str, int]]:
        """See :meth:`Storage.held_jobs`."""
        store = self._data()
        with store.lock:
            ids = set()
            for status in (JobStatus.PAUSING, JobStatus.PAUSED, JobStatus.QUARANTINED):
                ids.update(store.by_status[status])
            return [(job_id, store.jobs[job_id].generation) for job_id in sorted(ids)]

    async def record_failure(
        self,
        job_id: str,
        *,
        seq: int,
        failure_log: str,
        now: datetime,
        quarantine: str | None = None,
    ) -> TransitionResult:
        """See :meth:`Storage.record_failure`."""
        store = self._data()
        with store.lock:
            row = store.jobs.get(job_id)
            if row is None:
                return TransitionResult(applied=False, job=None)
            if row.failure_seq != seq or row.status.final:
                return TransitionResult(applied=False, job=row)
            changes: dict[str, object] = {
                "failure_seq": seq + 1,
                "failure_log": failure_log,
                "updated_at": now,
            }
            if quarantine is not None and row.status in (JobStatus.PENDING, JobStatus.PROCESSING):
                changes["status"] = JobStatus.QUARANTINED
                changes["reason"] = quarantine
            new = dataclasses.replace(row, **changes)  # type: ignore[arg-type]
            store.put(row, new)
            return TransitionResult(applied=True, job=new)

    async def set_restart_budget(
        self, job_id: str, max_restarts: int | None, restart_window: float | None
    ) -> None:
        """See :meth:`Storage.set_restart_budget`."""
        store = self._data()
        with store.lock:
            row = store.jobs.get(job_id)
            if row is not None:
                store.put(
                    row,
                    dataclasses.replace(
                        row, max_restarts=max_restarts, restart_window=restart_window
                    ),
                )

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
        """See :meth:`Storage.transition`."""
        if event in (JobEvent.SERVER_LOST, JobEvent.RESUME):
            raise ValueError(
                f"{event.value} is applied by expire_servers(), server_left() or request_resume()"
            )
        check_transition(fence, restarts)
        store = self._data()
        with store.lock:
            row = store.jobs.get(job_id)
            if row is None:
                return TransitionResult(applied=False, job=None)
            applied, job = store.apply(
                row,
                event,
                server_id=server_id,
                fence=fence,
                now=now,
                error=error,
                restarts=restarts,
                reason=reason,
            )
            return TransitionResult(applied=applied, job=job)

    async def apply_heartbeat(self, heartbeat: ServerHeartbeat, now: datetime) -> list[JobRecord]:
        """See :meth:`Storage.apply_heartbeat`."""
        check_heartbeat(heartbeat)
        store = self._data()
        server_id = heartbeat.server_id
        with store.lock:
            previous = store.servers.get(server_id)
            draining = heartbeat.draining or (
                previous is not None and previous.status is ServerStatus.DRAINING
            )
            store.servers[server_id] = ServerRecord(
                id=server_id,
                name=heartbeat.name,
                max_workers=heartbeat.max_workers,
                status=ServerStatus.DRAINING if draining else ServerStatus.ALIVE,
                started_at=datetime.fromtimestamp(heartbeat.started_at, UTC),
                last_seen=now,
                host=heartbeat.host,
                pid=heartbeat.pid,
                kinds=heartbeat.runs_kinds,
                labels=tuple(sorted(heartbeat.labels)),
                updatable=tuple(sorted(heartbeat.updatable)) if heartbeat.drops else None,
            )
            reported: set[str] = set()
            refused: list[JobRecord] = []
            for running in heartbeat.jobs:
                row = store.jobs.get(running.job_id)
                if row is None:
                    continue
                reported.add(row.id)
                beat = (
                    now
                    if running.last_heartbeat is None
                    else datetime.fromtimestamp(running.last_heartbeat, UTC)
                )
                if (
                    row.status is JobStatus.PROCESSING
                    and row.server_id == server_id
                    and row.fence == running.fence
                    and row.restarts == running.restarts
                    and row.reason is None
                    and row.last_heartbeat is not None
                    and beat - row.last_heartbeat < _REFRESH_STEP
                ):
                    continue  # nothing but a recent last_heartbeat would change
                applied, job = store.apply(
                    row,
                    JobEvent.START,
                    server_id=server_id,
                    fence=running.fence,
                    now=now,
                    restarts=running.restarts,
                )
                if not applied:
                    refused.append(job)
                elif running.last_heartbeat is not None:
                    store.put(job, dataclasses.replace(job, last_heartbeat=beat))
            gone = heartbeat_gone(heartbeat)
            if gone is None:
                store.lose_jobs(server_id, now, REASON_NOT_REPORTED, keep=reported)
            else:
                store.lose_jobs(server_id, now, REASON_NOT_REPORTED, only=gone)
            return refused

    async def expire_servers(self, seen_before: datetime, now: datetime) -> list[ServerRecord]:
        """See :meth:`Storage.expire_servers`."""
        store = self._data()
        with store.lock:
            expired = [
                server
                for server in store.servers.values()
                if server.status in _LIVE_SERVER and server.last_seen < seen_before
            ]
            marked: list[ServerRecord] = []
            for server in sorted(expired, key=lambda s: (s.name, s.id)):
                dead = dataclasses.replace(server, status=ServerStatus.DEAD)
                store.servers[server.id] = dead
                store.lose_jobs(server.id, now, REASON_SERVER_DEAD)
                marked.append(dead)
            return marked

    async def server_left(self, server_id: str, now: datetime) -> bool:
        """See :meth:`Storage.server_left`."""
        store = self._data()
        with store.lock:
            server = store.servers.get(server_id)
            if server is None:
                return False
            store.servers[server_id] = dataclasses.replace(server, status=ServerStatus.LEFT)
            store.lose_jobs(server_id, now, REASON_SERVER_LEFT)
            return True

    # -- outbox and leases -----------------------------------------------------------------

    async def claim_outbox(
        self, holder: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxItem]:
        """See :meth:`Storage.claim_outbox`."""
        store = self._data()
        claimed: list[OutboxItem] = []
        if limit <= 0:
            return claimed
        with store.lock:
            for row in store.outbox.values():  # insertion order is id order
                if row.claimed_until is not None and row.claimed_until >= now:
                    continue
                row.holder = holder
                row.claimed_until = lease_until
                claimed.append(row.item)
                if len(claimed) >= limit:
                    break
        return claimed

    async def complete_outbox(self, ids: Sequence[int]) -> None:
        """See :meth:`Storage.complete_outbox`."""
        store = self._data()
        with store.lock:
            for outbox_id in ids:
                store.outbox.pop(outbox_id, None)

    async def complete_outbox_for_job(self, job_id: str, kind: OutboxKind, holder: str) -> int:
        """See :meth:`Storage.complete_outbox_for_job`."""
        store = self._data()
        with store.lock:
            done = [
                outbox_id
                for outbox_id, row in store.outbox.items()
                if row.item.job_id == job_id and row.item.kind is kind and row.holder == holder
            ]
            for outbox_id in done:
                del store.outbox[outbox_id]
            return len(done)

    async def complete_outbox_for_jobs(
        self, job_ids: Sequence[str], kind: OutboxKind, holder: str
    ) -> int:
        """See :meth:`Storage.complete_outbox_for_jobs` (one pass, one lock)."""
        store = self._data()
        wanted = set(job_ids)
        with store.lock:
            done = [
                outbox_id
                for outbox_id, row in store.outbox.items()
                if row.item.job_id in wanted and row.item.kind is kind and row.holder == holder
            ]
            for outbox_id in done:
                del store.outbox[outbox_id]
            return len(done)

    async def acquire_lease(self, name: str, holder: str, now: datetime, until: datetime) -> bool:
        """See :meth:`Storage.acquire_lease`."""
        store = self._data()
        with store.lock:
            current = store.leases.get(name)
            if current is not None and current[0] != holder and current[1] >= now:
                return False
            store.leases[name] = (holder, until)
            return True

    async def cancelled_job_ids(self, deleted_since: datetime) -> list[str]:
        """See :meth:`Storage.cancelled_job_ids`."""
        store = self._data()
        with store.lock:
            ids = set(store.by_status[JobStatus.DELETING])
            for status in (JobStatus.DELETED, JobStatus.COMPLETED):
                ids.update(
                    job_id
                    for job_id in store.by_status[status]
                    if store.jobs[job_id].updated_at >= deleted_since
                )
            return sorted(ids)

    # -- queries -------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobRecord | None:
        """See :meth:`Storage.get_job`."""
        store = self._data()
        with store.lock:
            return store.jobs.get(job_id)

    async def get_jobs(self, job_ids: Sequence[str]) -> list[JobRecord]:
        """See :meth:`Storage.get_jobs`."""
        store = self._data()
        with store.lock:
            found = {job_id: store.jobs[job_id] for job_id in job_ids if job_id in store.jobs}
            return [found[job_id] for job_id in sorted(found)]

    async def list_jobs(self, query: JobQuery, *, with_total: bool = False) -> JobPage:
        """See :meth:`Storage.list_jobs`."""
        if query.offset < 0:
            raise ValueError("offset must not be negative")
        if query.limit is not None and query.limit < 0:
            raise ValueError("limit must not be negative")
        store = self._data()
        with store.lock:
            ids = self._candidates(store, query)
            start = 0 if query.after is None else bisect.bisect_right(ids, query.after)
            skip = query.offset
            want = None if query.limit is None else query.limit + 1
            items: list[JobRecord] = []
            for index in range(start, len(ids)):
                job = store.jobs[ids[index]]
                if not _matches(job, query):
                    continue
                if skip:
                    skip -= 1
                    continue
                items.append(job)
                if want is not None and len(items) >= want:
                    break
            more = query.limit is not None and len(items) > query.limit
            if more:
                items.pop()
            total = None
            if with_total:
                total = sum(1 for job_id in ids if _matches(store.jobs[job_id], query))
            return JobPage(
                items=tuple(items),
                next_cursor=items[-1].id if more and items else None,
                total=total,
            )

    @staticmethod
    def _candidates(store: _Store, query: JobQuery) -> list[str]:
        """The sorted ids worth scanning: a small index hit when there is one,
        else every id."""
        small = len(store.order) // 4
        if query.server_id is not None:
            owned = store.by_server.get(query.server_id, set())
            if len(owned) <= small:
                return sorted(owned)
        if query.statuses is not None:
            sets = [store.by_status[status] for status in query.statuses]
            if sum(len(ids) for ids in sets) <= small:
                return sorted(set().union(*sets))
        return store.order

    async def list_servers(self, query: ServerQuery) -> list[ServerRecord]:
        """See :meth:`Storage.list_servers`."""
        store = self._data()
        with store.lock:
            servers = [
                server
                for server in store.servers.values()
                if (query.statuses is None or server.status in query.statuses)
                and (query.name_prefix is None or server.name.startswith(query.name_prefix))
                and (query.label is None or query.label in server.labels)
                and (query.kind is None or query.kind in server.kinds)
            ]
            servers.sort(key=lambda s: (s.name, s.id))
            if query.with_jobs:
                return [store.with_running(server) for server in servers]
            return servers

    async def count_running_by_server(self) -> dict[str, int]:
        """See :meth:`Storage.count_running_by_server` (from the server index)."""
        store = self._data()
        with store.lock:
            counts: dict[str, int] = {}
            for server_id, owned in store.by_server.items():
                running = sum(
                    1 for job_id in owned if store.jobs[job_id].status is JobStatus.PROCESSING
                )
                if running:
                    counts[server_id] = running
            return counts

    async def pending_pools(self) -> dict[Pool, int]:
        """See :meth:`Storage.pending_pools` (from the status index)."""
        store = self._data()
        with store.lock:
            counts: dict[Pool, int] = {}
            for job_id in store.by_status[JobStatus.PENDING]:
                job = store.jobs[job_id]
                pool = Pool(job.kind, job.constraints)
                counts[pool] = counts.get(pool, 0) + 1
            return counts

    async def set_pending_reason(self, pool: Pool, reason: str | None) -> int:
        """See :meth:`Storage.set_pending_reason`."""
        store = self._data()
        with store.lock:
            changed = 0
            for job_id in list(store.by_status[JobStatus.PENDING]):
                job = store.jobs[job_id]
                if (job.kind, job.constraints) == (pool.kind, pool.constraints) and (
                    job.pending_reason != reason
                ):
                    store.put(job, dataclasses.replace(job, pending_reason=reason))
                    changed += 1
            return changed

    async def get_server(self, server_id: str) -> ServerRecord | None:
        """See :meth:`Storage.get_server`."""
        store = self._data()
        with store.lock:
            server = store.servers.get(server_id)
            return None if server is None else store.with_running(server)

    async def set_server_status(self, server_id: str, status: ServerStatus, now: datetime) -> bool:
        """See :meth:`Storage.set_server_status`."""
        store = self._data()
        with store.lock:
            server = store.servers.get(server_id)
            if server is None:
                return False
            store.servers[server_id] = dataclasses.replace(server, status=ServerStatus(status))
            return True
