"""Creating and cancelling jobs (``OrchestratorClient``)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from types import TracebackType

from orchestratr_core._aio import spawn
from orchestratr_core.errors import (
    BackendUnavailable,
    DuplicateJobName,
    InvalidJobInput,
    JobNotUpdatable,
    OrchestratrError,
    PublishError,
)
from orchestratr_core.job import (
    JobEvent,
    JobQuery,
    JobRecord,
    JobStatus,
    NewJob,
    new_id,
    utcnow,
    validate_argument,
    validate_name,
)
from orchestratr_core.lifecycle import hold_mark, validate_restart_budget
from orchestratr_core.placement import (
    DEFAULT_KIND,
    parse_constraints,
    validate_kind,
    validate_spread,
)
from orchestratr_core.plugin.manager import get_plugin_manager
from orchestratr_core.protocol import JobMessage
from orchestratr_core.storage import OutboxKind, Storage
from orchestratr_core.transport import Transport

__all__ = [
    "DEFAULT_CANCEL_RETENTION",
    "DEFAULT_KIND",
    "OrchestratorClient",
    "job_message",
    "stop_set",
]

log = logging.getLogger("orchestratr.client")

DEFAULT_CANCEL_RETENTION = 24 * 3600.0
"""Seconds a deleted job stays in the servers' cancellation set, so that a stray
duplicate of its message (a publish retried after a lost confirm) is dropped too."""


OUTBOX_FLUSH_INTERVAL = 0.01
"""Seconds the client collects sent jobs before deleting their outbox rows."""
OUTBOX_FLUSH_BATCH = 500
"""At most this many outbox rows are deleted by one statement (a full batch goes at once)."""
PUBLISH_CHUNK = 200
"""``create_jobs`` publishes this many messages concurrently (pipelined on the
transport's connection), then the next chunk."""
FAST_LEASE = 2.0
"""Seconds the fast path holds a new outbox row at least (at most the
``outbox_lease``): the relay sends the message of a client that died between
its commit and its publish once this has passed (plus the relay's wait)."""
LEASE_HEADROOM = 4.0
"""The fast path's claim lasts this many times the slowest recent publish (a
commit, a publish and the batched delete must fit in it under load)."""
OUTBOX_DELETE_ATTEMPTS = 5
"""Tries of one batch delete of sent rows (the database failing over) before
the rows are left to the relay."""


def job_message(job: JobRecord, generation: int) -> JobMessage:
    """The job message for one generation of a job."""
    return JobMessage(
        job_id=job.id,
        name=job.name,
        argument=job.argument,
        generation=generation,
        created_at=job.created_at.timestamp(),
        heartbeat_timeout=job.heartbeat_timeout,
        checkpoint=job.checkpoint,
        kind=job.kind,
        constraints=job.constraints,
        spread=job.spread,
    )


async def stop_set(storage: Storage, deleted_since: datetime) -> list[str]:
    """The servers' cancellation set: every job that must never run again
    (:meth:`Storage.cancelled_job_ids`), a hold mark for every held job
    (:mod:`orchestratr_core.lifecycle`) and one for every job whose argument was
    updated within ``deleted_since`` (:meth:`Storage.update_floors`)."""
    entries = await storage.cancelled_job_ids(deleted_since)
    try:
        held = await storage.held_jobs()
    except NotImplementedError:
        held = []
    entries.extend(hold_mark(job_id, generation) for job_id, generation in held)
    try:
        floors = await storage.update_floors(deleted_since)
    except NotImplementedError:
        floors = []
    # An updated job's older messages carry the old argument: dropped everywhere.
    entries.extend(hold_mark(job_id, generation) for job_id, generation in floors)
    return entries


class _OutboxFlusher:
    """Deletes the outbox rows of sent messages in batches, in the background.

    Why deleting late is safe: the row was committed with the job and is claimed
    by this client until its lease ends. If the process dies before the batch is
    deleted, the leader's outbox relay claims the row once that lease has ended
    and publishes the message again — under a new generation if the job still
    waits (:meth:`Storage.raise_pending_generation`), so a copy of the first
    message carries a smaller fencing token than a copy of the second and is
    superseded by it; a job that already runs is not sent again. Likewise a
    batch whose deletion fails (storage down) is only logged.
    """

    def __init__(
        self, storage: Storage, kind: OutboxKind, holder: str, interval: float, batch: int
    ) -> None:
        self._storage = storage
        self._kind = kind
        self._holder = holder
        self._interval = interval
        self._batch = max(1, batch)
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._urgent = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Ids waiting for their rows to be deleted."""
        return len(self._pending)

    def add(self, job_ids: Sequence[str]) -> None:
        """Queue the rows of these jobs for deletion (within ``interval``)."""
        if not job_ids:
            return
        self._pending.extend(job_ids)
        if self._task is None or self._task.done():
            self._task = spawn(self._run(), name="orchestratr-outbox-flush", logger=log)
        elif len(self._pending) >= self._batch:
            self._wake.set()

    async def flush(self) -> None:
        """Delete every queued row now, and return when that is done."""
        task = self._task
        if task is None or task.done():
            return
        self._urgent += 1
        self._wake.set()
        try:
            await asyncio.shield(task)
        finally:
            self._urgent -= 1

    async def _run(self) -> None:
        while self._pending:
            if not self._urgent and len(self._pending) < self._batch:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._wake.wait()
            batch = self._pending[: self._batch]
            del self._pending[: self._batch]
            await self._delete(batch)

    async def _delete(self, batch: list[str]) -> None:
        """Delete one batch, retried (backoff 0.2 s doubling) while the storage is
        unavailable -- a failover: a row left behind makes the relay wait for the
        servers' heartbeats before it judges the job -- at most
        :data:`OUTBOX_DELETE_ATTEMPTS` times; then the rows are left to the relay."""
        for attempt in range(1, OUTBOX_DELETE_ATTEMPTS + 1):
            try:
                await self._storage.complete_outbox_for_jobs(batch, self._kind, self._holder)
                return
            except (OrchestratrError, OSError) as exc:
                if attempt < OUTBOX_DELETE_ATTEMPTS:
                    await asyncio.sleep(0.2 * 2 ** (attempt - 1))
                    continue
                log.warning(
                    "could not delete %d sent outbox row(s); the manager's relay finds "
                    "them once the servers report the jobs (%s)",
                    len(batch),
                    exc,
                )
            except Exception:
                log.exception("deleting %d sent outbox row(s) failed", len(batch))
                return


class OrchestratorClient:
    """Creates and cancels jobs.

    Every change is first committed to the storage together with an *outbox*
    row; the message is sent only after the commit. With a transport, the client
    sends it at once and deletes the outbox row (in batches, in the background:
    call :meth:`close` when done, or use ``async with``); without one (or if
    the send fails), a running manager sends it. So there is never a message
    without a job row, nor a committed job without a message.

    :param storage: an opened storage, or a plugin name or URL
        (``"postgresql://..."``, as :class:`ServerManager` accepts): the client
        then builds the storage, opens it on first use (or in ``async with`` /
        :meth:`open`) and closes it in :meth:`close`.
    :param transport: a connected transport, a plugin name or URL (built,
        connected and closed by the client, like a storage given by URL), or
        ``None`` to leave sending to a running manager.
    :param holder: who claims the outbox rows (the manager's id).
    :param outbox_flush_interval: seconds sent jobs are collected before their
        outbox rows are deleted in one statement (at most ``outbox_flush_batch``).
    """

    def __init__(
        self,
        storage: Storage | str,
        transport: Transport | str | None = None,
        *,
        holder: str | None = None,
        outbox_lease: float = 10.0,
        cancel_retention: float = DEFAULT_CANCEL_RETENTION,
        outbox_flush_interval: float = OUTBOX_FLUSH_INTERVAL,
        outbox_flush_batch: int = OUTBOX_FLUSH_BATCH,
    ) -> None:
        self._owned: list[Storage | Transport] = []
        self._opened = False
        self._closed = False
        self._opening = asyncio.Lock()
        # Given by plugin name or URL (as ServerManager accepts them): made, owned, closed here.
        plugins = get_plugin_manager()
        if isinstance(storage, Storage):
            self._storage = storage
        else:
            self._storage = plugins.make_storage(_spec(storage, "storage", Storage))
            self._owned.append(self._storage)
        if transport is None or isinstance(transport, Transport):
            self._transport = transport
        else:
            self._transport = plugins.make_transport(_spec(transport, "transport", Transport))
            self._owned.append(self._transport)
        self._holder = holder or f"client-{new_id()}"
        # The fast path holds its outbox row for as long as its commit, publish and
        # delete take (_claim): at least FAST_LEASE, so that the relay sends the
        # message of a client that died in between soon; longer when publishes
        # are slow (load), so that the relay never sends again a message whose
        # publish is still under way; at most the manager's own outbox lease.
        self._lease = min(outbox_lease, FAST_LEASE)
        self._max_lease = max(outbox_lease, self._lease)
        self._single: collections.deque[float] = collections.deque(maxlen=32)
        """Seconds the recent publishes of one message took."""
        self._shares: collections.deque[float] = collections.deque(maxlen=32)
        """Seconds per message the recent chunks of a batch took."""
        self._retention = timedelta(seconds=cancel_retention)
        self._sent = _OutboxFlusher(
            self._storage,
            OutboxKind.PUBLISH,
            self._holder,
            outbox_flush_interval,
            outbox_flush_batch,
        )

    def _claim(self, now: datetime, jobs: int | None = None) -> datetime:
        """Until when the fast path claims its new outbox rows: one row, or the
        ``jobs`` rows of a batch (``now`` without a transport: a manager sends
        them at once). Long enough for the commit and the publish at the pace of
        the recent publishes (:data:`LEASE_HEADROOM` times the slowest), at least
        :data:`FAST_LEASE`; at most the outbox lease, per publish chunk of a batch."""
        if self._transport is None:
            return now
        if jobs is None:
            seconds = min(
                max(self._lease, LEASE_HEADROOM * _slowest(self._single)), self._max_lease
            )
        else:
            chunks = -(-jobs // PUBLISH_CHUNK)
            wanted = LEASE_HEADROOM * _slowest(self._shares) * jobs + 0.001 * jobs
            seconds = min(max(self._lease, wanted), self._max_lease * chunks)
        return now + timedelta(seconds=seconds)

    def _may_publish(self, lease_until: datetime, jobs: int | None = None) -> bool:
        """Whether a publish (one message, or a chunk of ``jobs`` of a batch) still
        fits in the claim: one that could end after it might be sent again by the
        relay (two messages of one job), so a claim spent by a slow commit leaves
        the rest to the relay."""
        needed = _slowest(self._single) if jobs is None else _slowest(self._shares) * jobs
        return (lease_until - utcnow()).total_seconds() > max(0.05, needed)

    async def _timed_publish(self, record: JobRecord) -> None:
        """Publish one job's message, noting how long it took."""
        assert self._transport is not None
        began = time.monotonic()
        await self._transport.publish_job(job_message(record, record.generation))
        self._single.append(time.monotonic() - began)

    async def open(self) -> None:
        """Open the storage and connect the transport the client made from a name
        or URL (nothing for objects given to it). Called by ``async with`` and
        by the first create or cancel; idempotent.

        :raises OrchestratrError: the client made its backends and was closed.
        """
        if not self._owned:
            return
        async with self._opening:
            if self._closed:
                raise OrchestratrError(
                    "this OrchestratorClient was closed, and with it the storage and "
                    "transport it opened: make a new client"
                )
            if self._opened:
                return
            opened: list[Storage | Transport] = []
            try:
                for backend in self._owned:
                    if isinstance(backend, Storage):
                        await backend.open()
                    else:
                        await backend.connect()
                    opened.append(backend)
            except BaseException:
                await _close_all(opened)
                raise
            self._opened = True

    async def __aenter__(self) -> OrchestratorClient:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def flush(self) -> None:
        """Delete the outbox rows of every message sent so far, now (they are
        otherwise deleted in batches within ``outbox_flush_interval``)."""
        await self._sent.flush()

    async def close(self) -> None:
        """Flush (see :meth:`flush`), then close the storage and transport the
        client made from a name or URL: such a client is done. Objects given to
        the client stay open (they belong to the caller) and the client stays
        usable. Idempotent."""
        await self._sent.flush()
        if self._owned:
            async with self._opening:
                if self._opened:
                    await _close_all(self._owned)
                self._opened = False
                self._closed = True

    aclose = close

    async def create_job(
        self,
        name: str,
        argument: str = "",
        *,
        heartbeat_timeout: float | None = None,
        max_restarts: int | None = None,
        restart_window: float | None = None,
        kind: str = DEFAULT_KIND,
        require: Sequence[str] | None = None,
        spread: str | None = None,
    ) -> str:
        """Create a job and start it on one server as soon as one has room.

        :param heartbeat_timeout: optional watchdog: if the job function does not
            call ``heartbeat()`` within this many seconds, its server restarts it
            (recorded as a failure with a ``watchdog`` error).
        :param max_restarts: the job's restart budget: at most this many failures
            (exceptions and deaths of its server) within ``restart_window``
            seconds; ``None`` keeps the defaults of :mod:`orchestratr_core.lifecycle`.
        :param restart_window: the budget's window in seconds.
        :param kind: the job's kind: only a server that runs this kind runs it.
        :param require: hard constraints on the labels of the server that runs it
            (``["region=eu", "nic!=1g"]``).
        :param spread: a spread group: servers avoid running two jobs of one group
            while others could take them.

        :returns: the new job's id.
        :raises InvalidJobInput: empty, blank, over-long name or one with control
            characters; an argument that is not a string or too large.
        :raises DuplicateJobName: a job of this name exists and is not deleted.
        """
        name = validate_name(name)
        argument = validate_argument(argument)
        timeout = _heartbeat_timeout(heartbeat_timeout)
        budget = validate_restart_budget(max_restarts, restart_window)
        kind, constraints, spread = _placement(kind, require, spread)
        await self.open()
        now = utcnow()
        # Without a transport the row is left unclaimed, for a manager to send at once.
        lease_until = self._claim(now)
        record = await self._storage.create_job(
            NewJob(
                id=new_id(),
                name=name,
                argument=argument,
                created_at=now,
                heartbeat_timeout=timeout,
                max_restarts=budget[0],
                restart_window=budget[1],
                kind=kind,
                constraints=constraints,
                spread=spread,
            ),
            self._holder,
            lease_until,
        )
        if budget != (None, None):
            await self._storage.set_restart_budget(record.id, *budget)
        if self._transport is not None:
            if not self._may_publish(lease_until):
                log.warning(
                    "job %s created; its commit took its outbox claim: the manager sends it",
                    record.id,
                )
                return record.id
            try:
                await self._timed_publish(record)
            except (PublishError, BackendUnavailable) as exc:
                log.warning(
                    "job %s created; its message will be sent by the manager (%s)", record.id, exc
                )
                return record.id
            # Sent: its outbox row goes with the next batch (see _OutboxFlusher
            # for why a crash before that is harmless).
            self._sent.add([record.id])
        return record.id

    async def create_jobs(
        self,
        items: Sequence[tuple[str, str]] | Sequence[tuple[str, str, str]] | Sequence[str],
        *,
        heartbeat_timeout: float | None = None,
        kind: str = DEFAULT_KIND,
        require: Sequence[str] | None = None,
        spread: str | None = None,
    ) -> list[str]:
        """Create many jobs at once, all or nothing: every item is checked first,
        then every job and its outbox row is inserted in one transaction, then
        the messages are published (pipelined) and the outbox rows deleted.

        :param items: ``(name, argument)`` pairs, ``(name, argument, kind)``
            triples, or names alone (argument ``""``).
        :param heartbeat_timeout: the watchdog of every job (see :meth:`create_job`).
        :param kind: the kind of every item that names none.
        :param require: the constraints of every job; ``spread``: their spread group.
        :returns: the new jobs' ids, in the order of ``items``.
        :raises InvalidJobInput: an item is not valid; the message names its
            index. Nothing is stored.
        :raises DuplicateJobName: a name is taken by a job that is not deleted,
            or occurs twice in ``items``. Nothing is stored.
        :raises NotImplementedError: the storage has no atomic batch insert
            (:meth:`Storage.create_jobs`); use :meth:`create_job`.
        """
        if isinstance(items, str | bytes) or not isinstance(items, Sequence):
            raise InvalidJobInput("items must be a sequence of (name, argument) pairs or names")
        timeout = _heartbeat_timeout(heartbeat_timeout)
        default_kind, constraints, spread = _placement(kind, require, spread)
        triples: list[tuple[str, str, str]] = []
        for index, item in enumerate(items):
            try:
                item_kind = default_kind
                if isinstance(item, str):
                    name, argument = item, ""
                elif isinstance(item, tuple | list) and len(item) == 2:
                    name, argument = item
                elif isinstance(item, tuple | list) and len(item) == 3:
                    name, argument, item_kind = item
                    item_kind = validate_kind(item_kind)
                else:
                    raise InvalidJobInput(
                        "must be a (name, argument) pair, a (name, argument, kind) triple or a name"
                    )
                triples.append((validate_name(name), validate_argument(argument), item_kind))
            except InvalidJobInput as exc:
                raise InvalidJobInput(f"item {index}: {exc}") from None
        seen: set[str] = set()
        for name, _, _ in triples:
            if name in seen:
                raise DuplicateJobName(name)
            seen.add(name)
        if not triples:
            return []
        await self.open()
        now = utcnow()
        jobs = [
            NewJob(
                id=new_id(),
                name=name,
                argument=argument,
                created_at=now,
                heartbeat_timeout=timeout,
                kind=job_kind,
                constraints=constraints,
                spread=spread,
            )
            for name, argument, job_kind in triples
        ]
        lease_until = self._claim(now, len(jobs))
        records = await self._storage.create_jobs(jobs, self._holder, lease_until)
        if self._transport is not None:
            await self._publish_all(records, lease_until)
        return [record.id for record in records]

    async def _publish_all(self, records: Sequence[JobRecord], lease_until: datetime) -> None:
        """Publish the messages of new jobs, ``PUBLISH_CHUNK`` at a time, and queue
        the outbox rows of those sent for deletion; the rest are left to the relay,
        also every chunk that no longer fits in the rows' claim (``lease_until``).

        Concurrent ``publish_job`` calls are part of the transport contract's
        normal use (a manager publishes from several tasks); on RabbitMQ they
        share the publishing channel, whose confirms are matched by delivery tag.
        """
        assert self._transport is not None
        transport = self._transport
        unsent = 0
        failure: BaseException | None = None
        for start in range(0, len(records), PUBLISH_CHUNK):
            chunk = records[start : start + PUBLISH_CHUNK]
            if not self._may_publish(lease_until, len(chunk)):
                unsent += len(records) - start
                break
            began = time.monotonic()
            results = await asyncio.gather(
                *(transport.publish_job(job_message(r, r.generation)) for r in chunk),
                return_exceptions=True,
            )
            self._shares.append((time.monotonic() - began) / len(chunk))
            sent = []
            for record, result in zip(chunk, results, strict=True):
                if result is None:
                    sent.append(record.id)
                    continue
                unsent += 1
                if not isinstance(result, PublishError | BackendUnavailable):
                    failure = failure or result
            self._sent.add(sent)
            if failure is not None:
                break
        if unsent:
            log.warning(
                "%d of %d job(s) created; the manager will send the other messages",
                len(records) - unsent,
                len(records),
            )
        if failure is not None:
            raise failure

    async def mark_on_deleting(self, job_id: str) -> JobRecord:
        """Cancel a job, durably. It stops wherever it runs, is never started
        again — also if it is queued, its server is dead, or the manager restarts
        — and ends ``deleted`` once a server confirms. Cancelling a job that is
        already cancelled or completed changes nothing.

        :raises UnknownJob: no job has this id.
        """
        _check_id(job_id)
        await self.open()
        before = await self._storage.get_job(job_id)
        now = utcnow()
        lease_until = self._claim(now)
        record, changed = await self._storage.request_cancel(job_id, now, self._holder, lease_until)
        if changed and before is not None and before.status in _STOPPED_HELD:
            # Paused or quarantined: confirmed stopped, its message dropped, so no
            # server will confirm. The guard refuses if a server owns it by now.
            result = await self._storage.transition(
                job_id,
                JobEvent.CONFIRM_DELETED,
                server_id=None,
                fence=record.fence,
                now=now,
                reason=f"cancelled while {before.status.value}",
            )
            record = result.job or record
        # Unchanged but deleting: cancelled before -- maybe by this very call, whose
        # commit went through while its acknowledgement was lost (a database
        # failover) and whose retry then changed nothing. Broadcast again, or the
        # cancel would wait for the manager's relay while the job could start.
        if changed or record.status is JobStatus.DELETING:
            await self._send_stop_set(job_id, now, "cancelled")
        return record

    # -- lifecycle controls (orchestratr_core.lifecycle) ---------------------------------

    async def pause(self, job_id: str) -> JobRecord:
        """Pause a job, durably: it stops wherever it runs (``pausing``, then
        ``paused`` once a server confirms) and no server starts it — also when it
        is queued, between servers, or its server is dead — until :meth:`resume`.
        Pausing a job that is not ``pending`` or ``processing`` changes nothing.

        :raises UnknownJob: no job has this id.
        """
        _check_id(job_id)
        await self.open()
        now = utcnow()
        lease_until = self._claim(now)
        record, changed = await self._storage.request_pause(job_id, now, self._holder, lease_until)
        if changed:
            await self._send_stop_set(job_id, now, "paused")
        return record

    async def resume(self, job_id: str) -> JobRecord:
        """Resume a ``paused`` or ``quarantined`` job: it is ``pending`` again under
        a new generation and starts on a server as a new job would, with its
        latest checkpoint. A job still ``pausing`` (its server has not confirmed
        yet) or in any other status is returned unchanged: look at its status.

        :raises UnknownJob: no job has this id.
        """
        _check_id(job_id)
        await self.open()
        now = utcnow()
        lease_until = self._claim(now)
        record, changed = await self._storage.request_resume(job_id, now, self._holder, lease_until)
        if changed and self._transport is not None:
            await self._send_stop_set(job_id, now, "resumed", outbox=False)
            try:
                await self._timed_publish(record)
            except (PublishError, BackendUnavailable) as exc:
                log.warning("job %s resumed; the manager will send it (%s)", job_id, exc)
                return record
            self._sent.add([job_id])
        return record

    async def update(self, job_id: str, argument: str) -> JobRecord:
        """Replace a job's argument, durably: every later start of the job uses
        the new one, and no copy running the old one is left.

        A job that runs or waits (``pending``, ``processing``) is restarted with
        it as a clean hand-over: ``pausing`` until a server confirms its copy
        stopped (or its queued message dropped), then ``pending`` under a new
        generation — never two copies, and every message of an older generation
        is dropped by the servers; a second update before the restart only
        replaces the argument again. A ``paused`` or ``quarantined`` job stays
        so and resumes with the new argument; so does one a client is pausing
        (a pause wins over an update's restart, whichever came first). Returns
        the job after the update (``argument_version`` counts the updates).

        :raises InvalidJobInput: the argument is not a string or too large;
            nothing is changed.
        :raises JobNotUpdatable: the job is cancelled or completed; nothing is changed.
        :raises UnknownJob: no job has this id.
        """
        _check_id(job_id)
        argument = validate_argument(argument)
        await self.open()
        now = utcnow()
        lease_until = self._claim(now)
        record, changed = await self._storage.request_update(
            job_id, argument, now, self._holder, lease_until
        )
        if not changed:
            raise JobNotUpdatable(job_id, record.status.value)
        if record.status is JobStatus.PAUSING:
            await self._send_stop_set(job_id, now, "updated")
        return record

    async def pause_jobs(
        self, *, name_prefix: str | None = None, kind: str | None = None
    ) -> list[JobRecord]:
        """Pause every ``pending`` or ``processing`` job whose name starts with
        ``name_prefix`` and whose kind is ``kind`` (each given filter must match;
        at least one). Returns the jobs that changed."""
        return await self._select_and_apply(
            self.pause, frozenset({JobStatus.PENDING, JobStatus.PROCESSING}), name_prefix, kind
        )

    async def resume_jobs(
        self, *, name_prefix: str | None = None, kind: str | None = None
    ) -> list[JobRecord]:
        """Resume every ``paused`` or ``quarantined`` job of the selection (as
        :meth:`pause_jobs` selects). Returns the jobs that changed."""
        return await self._select_and_apply(
            self.resume, frozenset({JobStatus.PAUSED, JobStatus.QUARANTINED}), name_prefix, kind
        )

    async def _select_and_apply(
        self,
        action: Callable[[str], Awaitable[JobRecord]],
        statuses: frozenset[JobStatus],
        name_prefix: str | None,
        kind: str | None,
    ) -> list[JobRecord]:
        if name_prefix is None and kind is None:
            raise InvalidJobInput("select jobs by name prefix or kind (or give a job id)")
        if name_prefix is not None and not name_prefix:
            raise InvalidJobInput("the name prefix must not be empty")
        if kind is not None:
            kind = validate_kind(kind)
        await self.open()
        page = await self._storage.list_jobs(
            JobQuery(statuses=statuses, name_prefix=name_prefix, kind=kind, limit=None)
        )
        changed: list[JobRecord] = []
        for job in page.items:
            after = await action(job.id)
            if after.status is not job.status:
                changed.append(after)
        return changed

    async def _send_stop_set(
        self, job_id: str, now: datetime, what: str, *, outbox: bool = True
    ) -> None:
        """Write the servers' cancellation set now (the fast path; the manager's
        relay does it otherwise) and delete the outbox row that asked for it."""
        if self._transport is None:
            return
        try:
            await self._transport.set_cancellations(
                await stop_set(self._storage, now - self._retention)
            )
        except (PublishError, BackendUnavailable) as exc:
            log.warning("job %s %s; the manager will tell the servers (%s)", job_id, what, exc)
            return
        if outbox:
            await self._storage.complete_outbox_for_job(job_id, OutboxKind.CANCEL, self._holder)


_STOPPED_HELD = frozenset({JobStatus.PAUSED, JobStatus.QUARANTINED})


def _slowest(times: collections.deque[float]) -> float:
    """The longest of ``times`` (0 when empty)."""
    return max(times, default=0.0)


def _check_id(job_id: object) -> None:
    if not isinstance(job_id, str) or not job_id.strip():
        raise InvalidJobInput("job id must be a non-empty string")


def _spec(value: object, kind: str, expected: type) -> str:
    """``value`` if it is a plugin name or URL, else a clear :class:`TypeError`."""
    if not isinstance(value, str):
        raise TypeError(
            f"{kind} must be a {expected.__name__}, a plugin name or a URL, "
            f"not {type(value).__name__}"
        )
    return value


async def _close_all(backends: Sequence[Storage | Transport]) -> None:
    """Close each (transports first: they may still be sending); report none."""
    for backend in sorted(backends, key=lambda b: isinstance(b, Storage)):
        with contextlib.suppress(OrchestratrError, OSError):
            await backend.close()


def _placement(
    kind: object, require: Sequence[str] | None, spread: object
) -> tuple[str, tuple[str, ...], str | None]:
    """A job's kind, canonical constraints and spread group, checked."""
    return validate_kind(kind), parse_constraints(require), validate_spread(spread)


def _heartbeat_timeout(value: object) -> float | None:
    """A valid watchdog timeout as a float, or ``None``; else :class:`InvalidJobInput`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
        raise InvalidJobInput("heartbeat_timeout must be a number of seconds in (0, 86400]")
    return float(value)
