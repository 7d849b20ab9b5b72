"""The manager runtime (``ServerManager``): owns the storage, tracks servers and
jobs, relays the outbox, and reconciles its view with what servers report.

Several managers may run against one storage:

* server events go to one manager at a time (the transport's single active
  consumer) and every write they cause is a guarded transition;
* background duties (dead-server detection, the outbox relay, the cancellation
  set) run on the manager that holds the ``leader`` lease in the storage.

When the manager is down, servers keep running their jobs and queued jobs still
start (the broker hands them out); events wait in the broker. When it comes
back, it replays them and the next heartbeat of every server corrects anything
else, so its view is right within one heartbeat period.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from orchestratr_core import protocol as p
from orchestratr_core._aio import cancel_and_log, keep_running, run_until_signal, spawn
from orchestratr_core.client import (
    DEFAULT_CANCEL_RETENTION,
    OrchestratorClient,
    job_message,
    stop_set,
)
from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    DataRejected,
    DeadLetter,
    OrchestratrError,
    UnknownServer,
)
from orchestratr_core.frontier import EventsFrontier
from orchestratr_core.inplace import InPlaceUpdates
from orchestratr_core.job import (
    JobEvent,
    JobQuery,
    JobRecord,
    JobStatus,
    ServerQuery,
    ServerRecord,
    ServerStatus,
    TransitionResult,
    clean_text,
    new_id,
    split_fence,
    utcnow,
)
from orchestratr_core.lifecycle import count_failure
from orchestratr_core.metrics import record_heartbeat_lag
from orchestratr_core.monitor import AdminOrchestratorMonitor, OrchestratorMonitor
from orchestratr_core.placement import Pool, ServerPlacement, parse_labels, pending_reason
from orchestratr_core.plugin.manager import PluginManager, get_plugin_manager
from orchestratr_core.retry import retrying
from orchestratr_core.server_views import ServerViews, Verdict
from orchestratr_core.storage import FailureCount, OutboxItem, OutboxKind, SpreadJob, Storage
from orchestratr_core.transport import Subscription, Transport

__all__ = ["ManagerOptions", "ServerManager"]

log = logging.getLogger("orchestratr.manager")

_T = TypeVar("_T")
_SEND_CHUNK = 200
"""Commands one heartbeat asks for are sent this many at a time (pipelined)."""
_REASONS_PACE = 9.0
"""After working out the pending reasons (:meth:`ServerManager.update_pending_reasons`)
the leader waits this many times as long as that took before doing it again (and
at least a sweep): it counts the pending jobs, and every running one per server
when some are pending, so while a million jobs fill it costs the database a scan
a time -- kept to about a tenth of the leader's rounds."""
_ACKS_IN_FLIGHT = 512
"""Heartbeat acknowledgements sent and not yet confirmed by the transport, at
most: the next heartbeat waits for one to be confirmed (:meth:`ServerManager._acknowledge`)."""

LEADER_LEASE = "leader"

_PROBE_JOB_ID = "00000000-0000-0000-0000-000000000000"
"""A job id no job has: reading it proves the storage answers."""

_HELD_STOPS = frozenset({p.StopReason.HELD, p.StopReason.CANCELLED, p.StopReason.SUPERSEDED})
"""Stop reasons with which a server reports a held job's copy stopped and dropped."""

_HELD_OWNED = frozenset({JobStatus.PAUSING, JobStatus.QUARANTINED})
"""Held statuses in which a server may still hold a copy (it confirms)."""
_QUARANTINABLE = frozenset({JobStatus.PENDING, JobStatus.PROCESSING})
"""Statuses a spent restart budget quarantines (:meth:`Storage.record_failure`)."""
_HELD_CHECKED = 1000
"""Held jobs with an owner judged per check (:meth:`ServerManager._confirm_held_unlisted`)."""

_UNEXPECTED_ATTEMPTS = 3
"""An event whose handling raises an error nobody classified (a bug, a driver
error a storage does not know) is tried this many times, then dead-lettered."""

RELAY_START_SLACK = 0.5
"""Seconds a server may take from the delivery of a job's message to the first
heartbeat that lists the copy it started (:meth:`ServerManager._relay_outbox`:
a row is re-sent only once every live server's heartbeats sent this long after
the row was claimed have been applied, and the job is still ``pending``)."""


@dataclass(frozen=True)
class ManagerOptions:
    """Timings of a manager."""

    server_timeout: float = 10.0
    """A server not heard from for this long is dead; its jobs are ``pending``
    again (the broker has already handed their messages to other servers)."""
    sweep_interval: float = 1.0
    """How often the leader looks for dead servers and unsent outbox rows."""
    leader_lease: float = 10.0
    """How long the leader lease lasts without renewal."""
    outbox_lease: float = 10.0
    """How long a manager may take to send an outbox row it claimed; also the
    longest claim of its client's fast path (which claims 2 s, longer while its
    publishes are slow). A create whose fast-path publish failed (broker down)
    is sent by the leader's relay once that claim ended and the servers'
    heartbeats show no server runs it (:meth:`ServerManager._relay_outbox`)."""
    cancel_retention: float = DEFAULT_CANCEL_RETENTION
    """Seconds a deleted job stays in the servers' cancellation set."""
    cancellation_resync: float = 30.0
    """How often the leader rewrites the whole cancellation set."""
    retry_max: float = 10.0
    """Longest wait between retries while the storage or broker is down."""
    rebalance: bool = True
    """Move running jobs to servers that have joined, until every server holds its
    capacity-proportional share within one job."""
    rebalance_interval: float = 5.0
    """Seconds between rebalancing rounds (each round waits for fresh heartbeats)."""
    rebalance_max_share: float = 0.25
    """At most this share of the running jobs moves in one round (at least one job)."""
    rebalance_fresh: float = 5.0
    """Rebalance only while every live server was heard from this recently: a
    server that went quiet may be dead, and jobs must not be moved toward it."""
    rebalance_hold: float = 3.0
    """Seconds every server caps itself at its share after a round, so that the
    released jobs land on servers below their share and move only once."""
    storage_probe_after: float | None = None
    """Seconds an event may take to apply before the manager asks whether its
    storage still answers (a short read, given as long again). If it does not --
    this manager is cut off from the database -- it leaves the events queue to
    the other managers (the broker hands them the event it held) and joins again
    once the storage answers. ``None``: a third of ``server_timeout``, so that
    the others apply the servers' heartbeats before any server looks dead."""
    confirm_hold_after: float = 30.0
    """Seconds after a live server's heartbeat first leaves out a ``pausing`` or
    ``quarantined`` job it owns before the manager confirms the hold itself (the
    server's stop report was lost: the job would stay ``pausing`` for ever).
    Keep it above the servers' ``stop_grace``: a copy being stopped is no longer
    listed, yet it may still run that long."""
    update_ack_timeout: float = 10.0
    """Seconds an update applied in place (``OrchestratorClient.update`` of a job
    whose function is ``@updatable``) may wait for its owner's ``JobUpdated``
    before the leader restarts the job with the new argument instead (the fenced
    restart). Keep it a few server heartbeat intervals; the leader sends the
    ``UpdateJob`` again every third of it meanwhile."""
    seen_batch: float | None = None
    """Seconds a heartbeat that changes nothing but its server's row (a delta
    listing no job on a set the manager holds and trusts) may wait for its
    write, so that the rows of many servers are written together (one statement
    on PostgreSQL) instead of one transaction per heartbeat. Its server's
    ``last_seen`` is then up to this much older in the storage than the
    manager's own view. ``0``: every heartbeat is written on arrival. ``None``:
    a twentieth of ``server_timeout``, at most 0.5 s."""
    backlog_wait: float | None = None
    """Seconds the leader may hold back declaring servers dead while this
    manager has not applied the events waiting for it (its heartbeats of live
    servers may be among them: :mod:`orchestratr_core.frontier`). A silent
    server is declared dead once the manager has applied what was published up
    to ``server_timeout`` after its last heartbeat, and at the latest
    ``server_timeout + backlog_wait`` after it (plus a sweep). ``0``: judge by
    the wall clock alone. ``None``: six times ``server_timeout``."""

    def __post_init__(self) -> None:
        if self.server_timeout <= 0 or self.sweep_interval <= 0:
            raise ConfigurationError("server_timeout and sweep_interval must be > 0")
        if self.storage_probe_after is not None and self.storage_probe_after <= 0:
            raise ConfigurationError("storage_probe_after must be > 0")
        if self.seen_batch is not None and not 0 <= self.seen_batch < self.server_timeout / 4:
            raise ConfigurationError("seen_batch must be >= 0 and under server_timeout / 4")
        if self.leader_lease <= self.sweep_interval:
            raise ConfigurationError("leader_lease must be longer than sweep_interval")
        if not self.confirm_hold_after >= 0:
            raise ConfigurationError("confirm_hold_after must be >= 0")
        if not self.update_ack_timeout > 0:
            raise ConfigurationError("update_ack_timeout must be > 0")
        if self.backlog_wait is not None and not self.backlog_wait >= 0:
            raise ConfigurationError("backlog_wait must be >= 0")


class ServerManager:
    """Manages jobs and watches servers. See the module docstring.

    :param storage: a :class:`Storage` or a plugin name / URL (``"sqlite:///x.db"``).
    :param transport: a :class:`Transport` or a plugin name / URL.
    """

    def __init__(
        self,
        *,
        storage: Storage | str,
        transport: Transport | str,
        options: ManagerOptions | None = None,
        plugins: PluginManager | None = None,
    ) -> None:
        self.id = new_id()
        self.options = options or ManagerOptions()
        self._plugins = plugins or get_plugin_manager()
        self._storage = self._plugins.make_storage(storage) if isinstance(storage, str) else storage
        self._transport = (
            self._plugins.make_transport(transport) if isinstance(transport, str) else transport
        )
        self.client = OrchestratorClient(
            self._storage,
            self._transport,
            holder=self.id,
            outbox_lease=self.options.outbox_lease,
            cancel_retention=self.options.cancel_retention,
        )
        self._inplace = InPlaceUpdates(
            self._storage,
            self._transport,
            holder=self.id,
            ack_timeout=self.options.update_ack_timeout,
            retention=self.options.cancel_retention,
            lease=self.options.outbox_lease,
        )
        """The follow-up of updates applied in place (acknowledgements, fallback)."""
        self.monitor = OrchestratorMonitor(self._storage)
        self.admin = AdminOrchestratorMonitor(self._storage)
        self._events: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._known_servers: set[str] = set()
        self._moved_from: dict[str, dict[str, float]] = {}
        """Server id -> jobs that moved away from it while it was their recorded
        owner (-> when noted): owner deaths, if it is declared dead before a
        heartbeat it sent after the note arrives."""
        self._held_unlisted: dict[str, tuple[float, str, int]] = {}
        """Held jobs (``pausing``, ``quarantined``) that their owner's set of running
        jobs leaves out -> (monotonic time first noted, that owner, its fence):
        confirmed held :attr:`ManagerOptions.confirm_hold_after` later
        (:meth:`_confirm_held_unlisted`)."""
        self._held_checked = 0.0
        wait = self.options.backlog_wait
        self._frontier = EventsFrontier(
            max_lag=6 * self.options.server_timeout if wait is None else wait,
            idle_after=max(2.0, 2 * self.options.sweep_interval),
        )
        """How far the events queue is applied (:mod:`orchestratr_core.frontier`)."""
        self._heard: dict[str, float] = {}
        """Server id -> ``sent_at`` of its latest heartbeat this manager applied
        (or noted): what the outbox relay asks before it re-sends a job."""
        self._unsent: dict[int, tuple[float, OutboxItem]] = {}
        """Outbox rows the relay claimed and has not judged yet -> (when it first
        claimed them, wall clock; the row): see :meth:`_relay_outbox`."""
        self._claimed: dict[int, float] = {}
        """Those rows -> when this manager last claimed them (wall clock)."""
        self._views = ServerViews(
            stale_after=self.options.server_timeout / 2,
            behind=self._frontier.behind,
        )
        """Each server's set of jobs as of its acknowledged heartbeat."""
        self._last_resync = 0.0
        self._last_rebalance = time.monotonic()
        self._reasons_due = 0.0
        """monotonic time the pending reasons are worked out again (:data:`_REASONS_PACE`)"""
        self._started = False
        self._stopped = False
        self._reasons_stored = True
        self.is_leader = False
        self._lease_valid_until = 0.0
        self._leader_since: float | None = None
        """monotonic time this manager's current run of leader leases began"""
        self._touches: dict[str, tuple[p.ServerHeartbeat, datetime]] = {}
        """Server id -> its latest heartbeat that changes nothing but its server
        row, not yet written (:meth:`_flush_touches`), with when it arrived."""
        self._touches_since = 0.0
        """monotonic time the oldest of ``_touches`` arrived"""
        self._touch_lock = asyncio.Lock()
        self._stepped_back = False
        """True while this manager has left the events queue (storage unreachable)."""
        self._probe: asyncio.Future[Any] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._acks: set[asyncio.Task[None]] = set()
        """Heartbeat acknowledgements on their way (:meth:`_acknowledge`)."""

    @property
    def storage(self) -> Storage:
        """The storage this manager owns."""
        return self._storage

    @property
    def transport(self) -> Transport:
        """The transport this manager uses."""
        return self._transport

    async def start(self) -> None:
        """Open the storage and the transport (retrying while either is
        unreachable; failing at once on wrong credentials), then consume events
        and run the background duties."""
        if self._started:
            return
        self._started = True
        await self._retry("open storage", self._storage.open)
        await self._retry("connect to broker", self._transport.connect)
        self._events = await self._transport.consume_events(self._on_event)
        self._tasks.append(spawn(self._leader_duties(), name="orchestratr-leader", logger=log))
        if self._seen_batch > 0:
            self._tasks.append(
                spawn(self._touch_flusher(), name="orchestratr-seen-batch", logger=log)
            )
        log.info("manager started id=%s", self.id)

    async def stop(self) -> None:
        """Stop consuming and close the transport and storage. Jobs keep running."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        if self._events is not None:
            with contextlib.suppress(OrchestratrError, OSError):
                await self._events.close()
        await cancel_and_log(self._tasks, logger=log)
        if self._acks:  # sent already: let their confirms arrive, briefly
            await asyncio.wait(self._acks, timeout=1.0)
            await cancel_and_log(list(self._acks), logger=log)
        with contextlib.suppress(OrchestratrError, OSError):
            await asyncio.wait_for(self._flush_touches(), self.options.server_timeout / 4)
        # Delete the outbox rows of the messages the client sent (batched).
        with contextlib.suppress(OrchestratrError, OSError):
            await self.client.close()
        with contextlib.suppress(OrchestratrError, OSError):
            await self._transport.close()
        with contextlib.suppress(OrchestratrError, OSError):
            await self._storage.close()
        log.info("manager stopped id=%s", self.id)

    async def run_forever(self, *, install_signal_handlers: bool = True) -> None:
        """Start and run until SIGTERM/SIGINT, then stop."""
        await run_until_signal(
            self.start, self.stop, install_signal_handlers=install_signal_handlers
        )

    async def drain_server(self, server_id: str) -> None:
        """Ask a server to hand all its jobs to the others and exit.

        :raises UnknownServer: no live server has this id.
        """
        now = utcnow()
        if not await self._storage.set_server_status(server_id, ServerStatus.DRAINING, now):
            raise UnknownServer(server_id)
        await self._transport.send_command(p.DrainServer(), server_id)

    # -- retries ----------------------------------------------------------------------

    async def _retry(self, what: str, action: Callable[[], Awaitable[_T]]) -> _T:
        async for attempt in retrying(what, maximum=self.options.retry_max, logger=log):
            with attempt:
                result = await action()
        return result

    # -- events -----------------------------------------------------------------------

    async def _on_event(self, event: p.Event) -> None:
        """Apply one server event (:meth:`_handle_event`), counted for the
        events frontier (:mod:`orchestratr_core.frontier`): an event applied or
        refused is done; one left for a retry is not."""
        self._frontier.begin()
        try:
            await self._handle_event(event)
        except DeadLetter:
            self._frontier.end()
            raise
        except BaseException:
            self._frontier.handling = False
            raise
        self._frontier.end()

    async def _handle_event(self, event: p.Event) -> None:
        """Apply one server event. While the storage is down this waits and retries,
        so the event (and those behind it) stay in the broker: no status is lost.

        One event never stops the others: an event the storage refuses
        (:class:`DataRejected`: out of range, an encoding the database cannot
        store) raises :class:`DeadLetter`, and so does one that fails with an
        unclassified error :data:`_UNEXPECTED_ATTEMPTS` times; the transport then
        dead-letters it with one warning line and delivers the next.

        A heartbeat that changes nothing but its server's row is noted, not
        written at once (:attr:`ManagerOptions.seen_batch`): the rows noted are
        written together once the oldest has waited that long, and before any
        other event is applied, so the storage sees the events in their order."""
        if isinstance(event, p.ServerHeartbeat) and self._note_idle(event):
            if time.monotonic() - self._touches_since >= self._seen_batch:
                await self._flush_or_dead_letter("write the noted heartbeats", self._flush_touches)
            # An idle heartbeat still moves the check of held jobs its owner no
            # longer lists: else an idle fleet never runs it. Throttled here, so
            # the idle path makes no coroutine between two checks.
            if self._held_check_due():
                await self._flush_or_dead_letter(
                    "confirm held jobs their owners no longer run",
                    lambda: self._confirm_held_unlisted(utcnow()),
                )
            return
        if self._touches:
            await self._flush_or_dead_letter("write the noted heartbeats", self._flush_touches)
        await self._flush_or_dead_letter(
            f"apply {event.TYPE} event", lambda: self._apply(event), event
        )

    async def _flush_or_dead_letter(
        self,
        what: str,
        action: Callable[[], Awaitable[None]],
        event: p.Event | None = None,
    ) -> None:
        """Run ``action`` for :meth:`_on_event` (see there: retried while the
        storage is down, dead-lettered when refused or failing again and again)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._apply_unless_cut_off(what, action)
                return
            except BackendUnavailable:
                # Cut off from the storage (it left the events queue): the event
                # goes back to the broker for another manager, or for this one
                # once it rejoins -- never acknowledged unapplied (a lost stop
                # report left a cancelled job `deleting` for ever).
                raise
            except DataRejected as exc:
                raise DeadLetter(f"{_about(event, what)} refused by the storage: {exc}") from None
            except OrchestratrError as exc:
                log.error("%s rejected: %s", _about(event, what), exc)
                return
            except Exception as exc:
                if attempt >= _UNEXPECTED_ATTEMPTS:
                    log.error("%s failed %d times", _about(event, what), attempt, exc_info=True)
                    raise DeadLetter(
                        f"{_about(event, what)} failed {attempt} times: {type(exc).__name__}: {exc}"
                    ) from None
                await asyncio.sleep(0.1 * attempt)

    @property
    def _seen_batch(self) -> float:
        batch = self.options.seen_batch
        return min(0.5, self.options.server_timeout / 20) if batch is None else batch

    def _note_idle(self, hb: p.ServerHeartbeat) -> bool:
        """Note ``hb`` for a later write if it changes nothing but its server row
        (:meth:`ServerViews.idle`, :meth:`ServerViews.known_delta`); False: apply
        it as usual."""
        if (
            self._seen_batch <= 0
            or self._stepped_back
            or hb.server_id not in self._known_servers
            or not (self._views.idle(hb) or self._views.known_delta(hb))
        ):
            return False
        now = utcnow()
        record_heartbeat_lag(now.timestamp() - hb.sent_at)
        self._note_heard(hb)
        self._clear_moved_notes(hb)
        if not self._touches:
            self._touches_since = time.monotonic()
        self._touches.pop(hb.server_id, None)
        # A known delta re-lists jobs already applied: only its row is written.
        self._touches[hb.server_id] = (dataclasses.replace(hb, jobs=()) if hb.jobs else hb, now)
        return True

    async def _flush_touches(self) -> None:
        """Write the noted heartbeats' server rows (:meth:`Storage.touch_servers`,
        one statement on PostgreSQL). On failure they stay noted (a newer note
        of the same server wins) and the error is raised -- unless the storage
        refused them (:class:`DataRejected`): then they are dropped, as a
        heartbeat it refuses is dead-lettered."""
        async with self._touch_lock:
            batch, self._touches = self._touches, {}
            if not batch:
                return
            try:
                await self._storage.touch_servers(list(batch.values()))
            except DataRejected:
                log.error("the storage refused %d noted heartbeat(s): dropped", len(batch))
                raise
            except BaseException:
                for server_id, noted in batch.items():
                    self._touches.setdefault(server_id, noted)
                self._touches_since = time.monotonic()
                raise

    async def _touch_flusher(self) -> None:
        """Write the noted heartbeats when no event came to do it (few servers)."""
        while True:
            await asyncio.sleep(self._seen_batch)
            if self._touches and time.monotonic() - self._touches_since >= self._seen_batch:
                try:
                    await self._flush_touches()
                except Exception as exc:  # kept noted: the next round or event writes them
                    log.warning("could not write the noted heartbeats (retried): %s", exc)

    @property
    def _probe_after(self) -> float:
        after = self.options.storage_probe_after
        return self.options.server_timeout / 3 if after is None else after

    async def _apply_unless_cut_off(self, what: str, action: Callable[[], Awaitable[None]]) -> None:
        """Run ``action`` (retrying while the storage is down) -- unless, while it
        takes long, the storage does not answer a probe either: then leave the
        events queue (:meth:`_step_back`) and raise :class:`BackendUnavailable`,
        so that the broker hands the event to another manager. Slow but
        answering is waited for."""
        if self._stepped_back:
            raise BackendUnavailable("the storage does not answer: events are left to others")
        applying = asyncio.ensure_future(self._retry(what, action))
        try:
            while not (await asyncio.wait({applying}, timeout=self._probe_after))[0]:
                if not await self.storage_answers():
                    self._step_back()
                    raise BackendUnavailable(f"the storage did not answer (to {what})")
            applying.result()
        finally:
            if not applying.done():
                # Not awaited: a driver may turn the cancellation into an error of
                # its own and retry on (asyncpg in a connect), and this handler
                # must return now so that the broker hands the event on.
                applying.cancel()
                self._let_finish(applying)

    async def readiness(self) -> str | None:
        """``None`` when this manager can do its work now, else one line saying why
        not: not started, no live broker session, or a storage that does not answer
        (it has then left the events queue to the other managers). ``/readyz``
        answers with it (:mod:`orchestratr_core.health`)."""
        if not self._started or self._stopped:
            return "not started" if not self._started else "stopped"
        if not self._transport.connected:
            return "no live broker session (reconnecting)"
        if self._stepped_back or not await self.storage_answers():
            return "the storage does not answer"
        return None

    async def storage_answers(self) -> bool:
        """Whether the storage answers a short read within ``storage_probe_after``
        seconds. Readiness probes (``/readyz``) ask it too. One read at a time:
        a read still under way (the storage's own retries) is waited on again,
        never cancelled (a driver may not honour that) nor doubled."""
        probe = self._probe
        if probe is None or probe.done():
            probe = self._probe = asyncio.ensure_future(self._storage.get_job(_PROBE_JOB_ID))
            self._let_finish(probe)
        done, _ = await asyncio.wait({probe}, timeout=self._probe_after)
        return bool(done) and not probe.cancelled() and probe.exception() is None

    def _let_finish(self, task: asyncio.Future[Any]) -> None:
        """Keep ``task`` referenced until it ends, then read (and drop) its
        outcome: the storage is known to be failing when nobody waits for it."""
        self._background.add(task)

        def done(finished: asyncio.Future[Any]) -> None:
            self._background.discard(finished)
            if not finished.cancelled() and (exc := finished.exception()) is not None:
                log.debug("an abandoned storage call ended: %s", exc)

        task.add_done_callback(done)

    def _step_back(self) -> None:
        """Leave the events queue until the storage answers again (in a task: the
        subscription is closed from outside the handler that noticed)."""
        if self._stepped_back or self._stopped:
            return
        self._stepped_back = True
        self._tasks.append(
            spawn(self._rejoin_events(), name="orchestratr-rejoin-events", logger=log)
        )

    async def _rejoin_events(self) -> None:
        log.warning(
            "the storage does not answer: leaving the events queue to the other managers "
            "until it does"
        )
        events, self._events = self._events, None
        if events is not None:
            with contextlib.suppress(OrchestratrError, OSError):
                await events.close()

        async def probe() -> None:
            if not await self.storage_answers():
                raise BackendUnavailable("the storage does not answer")

        # Probed every storage_probe_after at most: the events wait meanwhile.
        async for attempt in retrying("reach the storage", maximum=self._probe_after, logger=log):
            with attempt:
                await probe()
        self._events = await self._retry(
            "consume events", lambda: self._transport.consume_events(self._on_event)
        )
        self._stepped_back = False
        self._leader_since = None  # the heartbeats that waited meanwhile come first
        log.info("the storage answers again: consuming events")

    async def _apply(self, event: p.Event) -> None:
        now = utcnow()
        if isinstance(event, p.ServerHeartbeat):
            await self._on_heartbeat(event, now)
        elif isinstance(event, p.JobStarted):
            await self._on_started(event, now)
        elif isinstance(event, p.JobStopped):
            await self._on_stopped(event, now)
        elif isinstance(event, p.JobFailed):
            failed = await self._storage.transition(
                event.job_id,
                JobEvent.FAIL,
                server_id=event.server_id,
                fence=event.fence,
                now=now,
                error=clean_text(event.error),
                restarts=event.restarts,
            )
            if failed.applied:
                await self._count_failure(
                    event.job_id,
                    event.at,
                    clean_text(event.error),
                    now,
                    generation=split_fence(event.fence)[0],
                )
        elif isinstance(event, p.JobDiscarded):
            result = await self._storage.transition(
                event.job_id,
                JobEvent.CONFIRM_DELETED,
                server_id=event.server_id,
                fence=event.fence,
                now=now,
                reason="queued message dropped",
            )
            await self._confirm_held(result, event.server_id, event.fence, now, "message dropped")
            if not result.applied:
                await self._inplace.discarded(event, now)
        elif isinstance(event, p.JobUpdated):
            await self._inplace.applied(event)
        elif isinstance(event, p.ServerDeclaredDead):
            # The leader declared it dead (perhaps another manager, judging by
            # what this one wrote): its jobs were released in the storage. If it
            # is alive, its next heartbeat -- on a copy this manager no longer
            # holds -- is answered with a request for a complete listing.
            self._known_servers.discard(event.server_id)
            self._views.forget(event.server_id)
            self._heard.pop(event.server_id, None)
            log.info(
                "server %s was declared dead by the leader: its set is asked for again "
                "should it be alive",
                event.server_id,
            )
        elif isinstance(event, p.ServerLeft):
            await self._storage.server_left(event.server_id, now)
            self._known_servers.discard(event.server_id)
            self._moved_from.pop(event.server_id, None)
            self._views.forget(event.server_id)
            self._heard.pop(event.server_id, None)
            self._plugins.notify("server_left", server_id=event.server_id, name="", reason="left")

    async def _on_heartbeat(self, hb: p.ServerHeartbeat, now: datetime) -> None:
        # The jobs whose start reports this heartbeat replaces, as they were before
        # it (read with it: one round trip where the storage can): what a
        # JobStarted of each would have told (_after_start).
        unapplied = self._views.unapplied(hb)
        read, conflicts = await self._storage.read_and_apply_heartbeat(
            hb
            if unapplied is None or len(unapplied) == len(hb.jobs)
            else dataclasses.replace(hb, jobs=unapplied),
            now,
            hb.started,
        )
        before = {job.id: job for job in read}
        record_heartbeat_lag(now.timestamp() - hb.sent_at)
        self._note_heard(hb)
        self._clear_moved_notes(hb)
        checkpoints = [
            (j.job_id, j.fence, j.checkpoint) for j in hb.jobs if j.checkpoint is not None
        ]
        if checkpoints:
            await self._save_checkpoints(hb.server_id, checkpoints, now)
        if hb.server_id not in self._known_servers:
            self._known_servers.add(hb.server_id)
            self._plugins.notify(
                "server_joined", server_id=hb.server_id, name=hb.name, max_workers=hb.max_workers
            )
        fences = {job.job_id: job.fence for job in hb.jobs}
        sends = [
            self._stop_copy(job, hb.server_id, fences.get(job.id, job.fence), older=not hb.seq)
            for job in conflicts
        ]
        if hb.started:
            refused = {job.id for job in conflicts}
            moved = [
                job_id
                for job_id in dict.fromkeys(hb.started)
                if job_id not in refused and split_fence(fences.get(job_id, 0))[1] > 0
            ]
            after = {job.id: job for job in await self._storage.get_jobs(moved)} if moved else {}
            for job_id in moved:
                job = after.get(job_id)
                if job is not None:
                    sends.append(self._send_checkpoint(job, hb.server_id, fences[job_id]))
            for job_id in dict.fromkeys(hb.started):
                fence = fences.get(job_id)
                if fence is None or job_id in refused:
                    continue  # not reported running, or stopped as a conflict above
                previous = before.get(job_id)
                sends.append(
                    self._after_start(
                        job_id, hb.server_id, fence, previous, known=previous is not None
                    )
                )
        # A burst after a failover asks one command per moved job of the old owner:
        # pipelined on the channel, not one confirm round trip after another.
        for i in range(0, len(sends), _SEND_CHUNK):
            await asyncio.gather(*sends[i : i + _SEND_CHUNK])
        verdict = self._views.receive(hb, refused=bool(conflicts))
        await self._confirm_held_unlisted(now)
        if verdict is not Verdict.NOTHING:
            # After the stops above: what the server hears next is on a set that
            # already excludes the copies it was told to stop.
            await self._acknowledge(
                p.HeartbeatAck(seq=hb.seq, full=verdict is Verdict.FULL, chain=True), hb.server_id
            )

    async def _acknowledge(self, ack: p.HeartbeatAck, server_id: str) -> None:
        """Send ``ack`` without waiting for the transport to confirm it (a
        publisher confirm is a broker round trip, and a manager applies one
        heartbeat after another: while a fleet fills, every heartbeat carries
        starts and is answered). Their sends start in the order the heartbeats
        were applied (one step of each before the next event); nothing rests on
        that order or on their arrival: the server keeps listing its changes
        until an acknowledgement comes, and falls back to a complete listing
        when none does (:mod:`orchestratr_core.server.beats`); a failed send is
        logged as :meth:`_send` does. At most :data:`_ACKS_IN_FLIGHT` wait for
        their confirm."""
        while len(self._acks) >= _ACKS_IN_FLIGHT:
            await asyncio.wait(self._acks, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(self._send(ack, server_id), name="orchestratr-ack")
        self._acks.add(task)
        task.add_done_callback(self._ack_done)
        await asyncio.sleep(0)  # its publish starts before the next event is applied

    def _ack_done(self, task: asyncio.Task[None]) -> None:
        self._acks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("could not send an acknowledgement: %s", exc)

    def _note_heard(self, hb: p.ServerHeartbeat) -> None:
        """Remember when the server sent its latest applied heartbeat (the relay's
        evidence that a copy it started is known: :meth:`_relay_outbox`)."""
        if hb.sent_at > self._heard.get(hb.server_id, 0.0):
            self._heard[hb.server_id] = hb.sent_at

    def _clear_moved_notes(self, hb: p.ServerHeartbeat) -> None:
        notes = self._moved_from.get(hb.server_id)
        if notes:  # alive after the move: those jobs were released, not lost
            for job_id in [j for j, noted in notes.items() if noted < hb.sent_at]:
                del notes[job_id]

    async def _on_started(self, ev: p.JobStarted, now: datetime) -> None:
        before = await self._storage.get_job(ev.job_id)
        result = await self._storage.transition(
            ev.job_id,
            JobEvent.START,
            server_id=ev.server_id,
            fence=ev.fence,
            now=now,
            restarts=ev.restarts,
        )
        if result.job is not None and not result.applied:
            await self._stop_copy(result.job, ev.server_id, ev.fence)
            return
        if result.job is not None and split_fence(ev.fence)[1] > 0:
            await self._send_checkpoint(result.job, ev.server_id, ev.fence)
        await self._after_start(
            ev.job_id, ev.server_id, ev.fence, before, known=result.job is not None
        )

    async def _after_start(
        self, job_id: str, server_id: str, fence: int, before: JobRecord | None, *, known: bool
    ) -> None:
        """What a start that the storage did not refuse asks of servers: ``server_id``
        reported it runs ``job_id`` under ``fence``, and the job was ``before``
        (read before the start was applied). Shared by :class:`~protocol.JobStarted`
        and the starts a heartbeat replaces (``ServerHeartbeat.started``).

        * An unknown job (``known`` false: a foreign or stale message) must never
          run: tell the server to stop it and drop its message.
        * A job that moved (``before`` owned by another server, under a lower
          fence): if the old owner still runs a copy, it is stale; tell it now,
          not at its next heartbeat."""
        if not known:
            await self._send(
                p.StopJob(
                    job_id=job_id, reason=p.StopReason.SUPERSEDED, drop=True, max_fence=fence
                ),
                server_id,
            )
            return
        if (
            before is not None
            and before.server_id is not None
            and before.server_id != server_id
            and before.fence < fence
        ):
            await self._send(
                p.StopJob(
                    job_id=job_id,
                    reason=p.StopReason.SUPERSEDED,
                    drop=True,
                    max_fence=before.fence,
                ),
                before.server_id,
            )
            # It moved while the old owner is still recorded: that owner died, was
            # cut off, or its release is still on the way (events of two servers
            # are not ordered). Counted as a death only if the old owner is then
            # declared dead; a heartbeat of it clears the note.
            self._moved_from.setdefault(before.server_id, {})[job_id] = time.time()

    async def _on_stopped(self, ev: p.JobStopped, now: datetime) -> None:
        if ev.reason is p.StopReason.COMPLETED:
            event = JobEvent.COMPLETE
        elif ev.reason is p.StopReason.CANCELLED:
            event = JobEvent.CONFIRM_DELETED
        else:
            event = JobEvent.RELEASE
        reason = f"stopped on {ev.server_id}: {ev.reason.value}" + (
            " (forced)" if ev.forced else ""
        )
        result = await self._storage.transition(
            ev.job_id, event, server_id=ev.server_id, fence=ev.fence, now=now, reason=reason
        )
        if ev.reason in _HELD_STOPS:
            await self._confirm_held(result, ev.server_id, ev.fence, now, reason)
        if result.applied and event is JobEvent.COMPLETE:
            # Its ack may be lost: servers must drop a redelivered message of it.
            await self._sync_cancellations(now)

    async def _confirm_held(
        self, result: TransitionResult, server_id: str, fence: int, now: datetime, reason: str
    ) -> None:
        """A server stopped a copy of a held job, or dropped its message: the job is
        ``paused`` now (a quarantine stays), unless a newer owner holds it."""
        if result.applied or result.job is None or not result.job.status.held:
            return
        await self._storage.transition(
            result.job.id,
            JobEvent.CONFIRM_HELD,
            server_id=server_id,
            fence=fence,
            now=now,
            reason=reason,
        )

    async def _holdings_of_silent_servers(self, cutoff: datetime) -> dict[str, list[JobRecord]]:
        """The running jobs of every live server not heard from since ``cutoff``
        (about to be declared dead): each ``processing`` one counts a failure (an
        owner death) against its restart budget; its ``pausing`` ones are listed
        too (:meth:`_confirm_held_of_dead`). One cheap query when none is silent."""
        servers = await self._storage.list_servers(
            ServerQuery(
                statuses=frozenset({ServerStatus.ALIVE, ServerStatus.DRAINING}), with_jobs=False
            )
        )
        holdings: dict[str, list[JobRecord]] = {}
        for server in servers:
            if server.last_seen < cutoff:
                full = await self._storage.get_server(server.id)
                if full is not None:
                    holdings[server.id] = [
                        job for job in full.running if job.status is JobStatus.PROCESSING
                    ]
                pausing = await self._storage.list_jobs(
                    JobQuery(
                        statuses=frozenset({JobStatus.PAUSING}), server_id=server.id, limit=None
                    )
                )
                holdings.setdefault(server.id, []).extend(pausing.items)
        return holdings

    async def _confirm_held_of_dead(self, jobs: list[JobRecord], now: datetime) -> None:
        """Confirm the pause of every ``pausing`` job of a server just declared
        dead: it may have stopped the copy (and dropped the message) but died
        before its ``JobStopped`` reached us, and the job would stay ``pausing``
        (``resume`` refuses it) for ever. Safe either way: if it died before
        stopping the copy, its message went back to the queue and the job's hold
        mark makes every live server drop it (a ``JobDiscarded``, a no-op on a
        ``paused`` job). The guard (``NOT_OLDER``, the owner cleared by
        ``SERVER_LOST``) keeps it from touching a job a newer owner confirmed."""
        for job in jobs:
            if job.status is not JobStatus.PAUSING:
                continue
            result = await self._storage.transition(
                job.id,
                JobEvent.CONFIRM_HELD,
                server_id=None,
                fence=job.fence,
                now=now,
                reason="paused (its server died while stopping it)",
            )
            if result.applied:
                log.info("confirmed the pause of job %s: its server is dead", job.id)

    def _held_check_due(self) -> bool:
        """Whether :meth:`_confirm_held_unlisted` would check now (every quarter of
        ``confirm_hold_after``, at most once per ``sweep_interval``)."""
        every = max(self.options.confirm_hold_after / 4, self.options.sweep_interval)
        return time.monotonic() - self._held_checked >= every

    async def _confirm_held_unlisted(self, now: datetime) -> None:
        """Confirm the hold of the ``pausing`` and ``quarantined`` jobs that their
        *live* owner no longer runs, when its stop report never arrived (lost on
        the way, or sent to a manager that then restarted): else such a job stays
        ``pausing`` (``resume`` refuses it) for as long as its server lives.

        Checked every quarter of :attr:`ManagerOptions.confirm_hold_after` (one
        query for every held job that has an owner: few) against each owner's
        set of running jobs as this manager's copy has it (:meth:`ServerViews.running`:
        the manager that applies a server's heartbeats). A job its owner's set
        leaves out is noted; one still left out, under the same owner and fence,
        ``confirm_hold_after`` seconds later is confirmed (``CONFIRM_HELD``,
        guarded as a stop report): a copy being stopped is left out of the
        heartbeats already, while it may still run for the server's
        ``stop_grace``. A job listed again loses its note. A server that dies
        meanwhile is handled by :meth:`_confirm_held_of_dead`."""
        if not self._held_check_due():
            return
        clock = time.monotonic()
        bound = self.options.confirm_hold_after
        self._held_checked = clock
        page = await self._storage.list_jobs(JobQuery(statuses=_HELD_OWNED, limit=_HELD_CHECKED))
        notes = self._held_unlisted
        seen: set[str] = set()
        for job in page.items:
            if job.server_id is None:
                continue
            running = self._views.running(job.server_id)
            if running is None:
                continue  # no fresh copy of that server's set here
            seen.add(job.id)
            if job.id in running:
                notes.pop(job.id, None)
                continue
            noted = notes.setdefault(job.id, (clock, job.server_id, job.fence))
            if noted[1:] != (job.server_id, job.fence):
                notes[job.id] = (clock, job.server_id, job.fence)
                continue
            if clock - noted[0] < bound:
                continue
            del notes[job.id]
            result = await self._storage.transition(
                job.id,
                JobEvent.CONFIRM_HELD,
                server_id=job.server_id,
                fence=job.fence,
                now=now,
                reason=(
                    job.reason
                    if job.status is JobStatus.QUARANTINED
                    else "paused (its server no longer runs it; its stop report was lost)"
                ),
            )
            if result.applied:
                log.info(
                    "confirmed the hold of job %s: server %s no longer runs it",
                    job.id,
                    job.server_id,
                )
        for job_id in [j for j in notes if j not in seen]:
            del notes[job_id]  # no longer held with an owner, or not judged here

    async def _count_failure(
        self, job_id: str, at: float, error: str, now: datetime, *, generation: int | None = None
    ) -> None:
        """Count a failure against the job's restart budget (compare-and-set,
        retried on a concurrent count); quarantine it when the budget is spent.
        ``generation``: that of the copy that failed; a failure of a generation
        older than the job's (it was resumed meanwhile: a fresh budget) is not
        counted."""
        for _ in range(5):
            job = await self._storage.get_job(job_id)
            if job is None or job.status.final:
                return
            if generation is not None and job.generation > generation:
                return
            failure_log, quarantine = count_failure(job, at, error)
            try:
                result = await self._storage.record_failure(
                    job_id,
                    seq=job.failure_seq,
                    failure_log=failure_log,
                    now=now,
                    quarantine=quarantine,
                )
            except NotImplementedError:
                return
            if not result.applied:
                continue
            if (
                quarantine is not None
                and result.job is not None
                and result.job.status is JobStatus.QUARANTINED
                and job.status is not JobStatus.QUARANTINED
            ):
                log.warning("job quarantined job_id=%s: %s", job_id, quarantine)
                await self._sync_cancellations(now)
            return
        log.warning("could not count a failure of job %s: its count kept changing", job_id)

    async def _save_checkpoints(
        self, server_id: str, checkpoints: list[tuple[str, int, str]], now: datetime
    ) -> None:
        try:
            await self._storage.save_checkpoints(server_id, checkpoints, now)
        except NotImplementedError:
            log.warning("the storage keeps no checkpoints: %d dropped", len(checkpoints))

    async def _send_checkpoint(self, job: JobRecord, server_id: str, fence: int) -> None:
        """The latest checkpoint to a server that took a redelivered message (its
        copy waits for it before the job function starts)."""
        await self._send(
            p.JobCheckpoint(job_id=job.id, fence=fence, checkpoint=job.checkpoint), server_id
        )

    async def _stop_copy(
        self, job: JobRecord, server_id: str, fence: int, *, older: bool = False
    ) -> None:
        """A server runs a copy the storage did not accept: tell it to stop.
        ``older``: the server is of a version before the lifecycle controls (its
        heartbeats are not numbered), which cannot read the reason ``held``."""
        if job.status.held:
            # Never CANCELLED: a server would refuse the job for good, also after a
            # resume. An older server is told SUPERSEDED: it drops the message up to
            # this fence (the resumed job's new generation is above it) and reports
            # a stop that confirms the hold (_HELD_STOPS).
            reason = p.StopReason.SUPERSEDED if older else p.StopReason.HELD
        elif job.status in (JobStatus.DELETING, JobStatus.DELETED):
            reason = p.StopReason.CANCELLED
        elif job.server_id == server_id and job.fence == fence:
            return  # it is the recorded owner after all
        else:
            reason = p.StopReason.SUPERSEDED
        log.warning(
            "stopping a copy job_id=%s server=%s fence=%d (status=%s owner=%s fence=%d)",
            job.id,
            server_id,
            fence,
            job.status.value,
            job.server_id,
            job.fence,
        )
        await self._send(
            p.StopJob(job_id=job.id, reason=reason, drop=True, max_fence=fence), server_id
        )

    async def _send(self, command: p.Command, server_id: str | None) -> None:
        try:
            await self._transport.send_command(command, server_id)
        except (OrchestratrError, OSError) as exc:
            # The next heartbeat of that server raises the conflict again.
            log.warning("could not send %s to %s: %s", command.TYPE, server_id, exc)

    # -- leader duties ------------------------------------------------------------------

    async def _leader_duties(self) -> None:
        """The leader loop for as long as the manager runs: a failure that escapes
        it is logged and the loop starts again (:func:`keep_running`)."""
        await keep_running(self._leader_loop, name="the leader loop", logger=log)

    async def _leader_loop(self) -> None:
        while True:
            try:
                await self._sweep()
            except BackendUnavailable as exc:
                log.warning("storage unavailable during sweep: %s", exc)
                # The servers' heartbeats of the outage wait in the broker: their
                # rows are as old as it. Judge them dead only a server timeout
                # after the storage answers again, as a new leader would.
                self._leader_since = None
            except OrchestratrError as exc:
                log.warning("sweep failed: %s", exc)
            except Exception:
                log.exception("sweep failed unexpectedly")
            await asyncio.sleep(self.options.sweep_interval)

    def _lease_held(self) -> bool:
        """Whether the lease this manager last won is surely still its own, by its
        own clock from *before* it asked: a round slowed by the database (a
        partition, a failover) stops at the next step once another manager may
        have taken the lease over, instead of acting on what it read before."""
        if time.monotonic() < self._lease_valid_until:
            return True
        if self.is_leader:
            log.warning("leader lease may have expired during this round: stopping it")
        self.is_leader = False
        return False

    async def _sweep(self) -> None:
        """One round of the leader's duties; each step first checks the lease
        (:meth:`_lease_held`)."""
        asked = time.monotonic()
        now = utcnow()
        until = now + timedelta(seconds=self.options.leader_lease)
        self.is_leader = False
        won = await self._storage.acquire_lease(LEADER_LEASE, self.id, now, until)
        self._lease_valid_until = asked + self.options.leader_lease if won else 0.0
        self.is_leader = won
        if not won:
            self._leader_since = None
            self._unsent.clear()  # rows claimed while leading: judged by the next leader
            self._claimed.clear()
        elif self._leader_since is None:
            self._leader_since = asked
        if not self._lease_held():
            return
        await self._expire_servers(now)
        if not self._lease_held():
            return
        # A fresh clock: a row the step above wrote (the restart of an update whose
        # owner was declared dead) is claimable in this round, not the next.
        await self._relay_outbox(utcnow())
        if not self._lease_held():
            return
        await self._follow_up_updates(now)
        if not self._lease_held():
            return
        if time.monotonic() >= self._reasons_due:
            began = time.monotonic()
            await self.update_pending_reasons()
            ended = time.monotonic()
            self._reasons_due = ended + _REASONS_PACE * (ended - began)
        if time.monotonic() - self._last_resync >= self.options.cancellation_resync:
            await self._sync_cancellations(now)
        if (
            self._lease_held()
            and self.options.rebalance
            and time.monotonic() - self._last_rebalance >= self.options.rebalance_interval
        ):
            self._last_rebalance = time.monotonic()
            await self.rebalance()

    async def _follow_up_updates(self, now: datetime) -> None:
        """Updates applied in place and not yet acknowledged: sent again, or
        restarted once ``update_ack_timeout`` has passed (:mod:`orchestratr_core.inplace`)."""
        restarted = await self._inplace.follow_up(now)
        if restarted:
            await self._sync_cancellations(now)  # their hold marks stop the old copies
            await self._inplace.forget_stop_rows(restarted)

    async def _expire_servers(self, now: datetime) -> list[ServerRecord]:
        """Declare dead every server not heard from for ``server_timeout``
        (:meth:`Storage.expire_servers`), count the owner deaths, forget them.

        Not in a new leader's first ``server_timeout``: a manager that has just
        started (or taken over) may not have applied the heartbeats waiting for
        it in the broker yet -- after a restart the servers' rows are as old as
        the outage -- and would declare live servers dead. Likewise after a sweep
        that found the storage unreachable (a failover), and after this manager
        left the events queue and joined it again: the servers' rows are as old
        as the outage, their heartbeats wait in the broker. Heartbeats noted for
        a later write (:attr:`ManagerOptions.seen_batch`) are written first."""
        since = self._leader_since
        if since is None or time.monotonic() - since < self.options.server_timeout:
            return []
        if self._stepped_back:
            return []  # not applying the heartbeats (storage unreachable): no verdict
        applied_up_to = await self._events_frontier()
        if self._touches:
            await self._flush_touches()
        cutoff = min(now, applied_up_to) - timedelta(seconds=self.options.server_timeout)
        dying = await self._holdings_of_silent_servers(cutoff)
        expired = await self._storage.expire_servers(cutoff, now)
        deaths: dict[str, str] = {}
        for server in expired:
            lost = {
                job.id for job in dying.get(server.id, ()) if job.status is JobStatus.PROCESSING
            }
            lost |= set(self._moved_from.pop(server.id, {}))
            for job_id in lost:
                deaths[job_id] = f"owner died: server {server.name} ({server.id})"
        if deaths:
            await self._count_owner_deaths(deaths, now)
        for server in expired:
            await self._confirm_held_of_dead(dying.get(server.id, []), now)
            log.warning("server %s (%s) is dead: its jobs are pending", server.id, server.name)
            self._known_servers.discard(server.id)
            self._views.forget(server.id)
            self._heard.pop(server.id, None)
            self._plugins.notify(
                "server_left", server_id=server.id, name=server.name, reason="dead"
            )
        return expired

    async def _events_frontier(self) -> datetime:
        """The time up to which this manager has applied every event published
        (:class:`EventsFrontier`; the wall clock when that cannot be told)."""
        at = utcnow()
        if self._frontier.max_lag <= 0:
            return at
        try:
            backlog = await self._transport.events_backlog()
        except (OrchestratrError, OSError) as exc:
            log.debug("could not count the events waiting: %s", exc)
            backlog = None
        elsewhere = None
        if backlog is not None and self._frontier.idle():
            elsewhere = await self._applied_elsewhere()
        applied_up_to = self._frontier.probe(backlog, at, elsewhere=elsewhere)
        if applied_up_to < at - timedelta(seconds=self.options.sweep_interval * 2):
            log.info(
                "%d event(s) wait: silence is judged up to %s (%.1f s ago)",
                backlog or 0,
                applied_up_to.isoformat(),
                (at - applied_up_to).total_seconds(),
            )
        return applied_up_to

    async def _applied_elsewhere(self) -> datetime | None:
        """The freshest ``last_seen`` of the live servers: when the manager that
        consumes the events (not this one) last applied a heartbeat (``None``: no
        live server). See :mod:`orchestratr_core.frontier`."""
        servers = await self._storage.list_servers(
            ServerQuery(
                statuses=frozenset({ServerStatus.ALIVE, ServerStatus.DRAINING}), with_jobs=False
            )
        )
        return max((s.last_seen for s in servers), default=None)

    async def _count_owner_deaths(self, deaths: dict[str, str], now: datetime) -> None:
        """Count one failure (``job id -> what happened``) against each job's
        restart budget, as :meth:`_count_failure` does one by one, in a few
        statements whatever the number of jobs (:meth:`Storage.record_failures`:
        one read of the jobs and one compare-and-set write per round; a job whose
        count changed meanwhile is read and counted again, at most 5 rounds)."""
        at = now.timestamp()
        todo = sorted(deaths)
        for _ in range(5):
            if not todo:
                return
            jobs = await self._storage.get_jobs(todo)
            counts: list[FailureCount] = []
            newly: set[str] = set()
            for job in jobs:
                if job.status.final:
                    continue
                failure_log, quarantine = count_failure(job, at, deaths[job.id])
                counts.append(FailureCount(job.id, job.failure_seq, failure_log, quarantine))
                if quarantine is not None and job.status in _QUARANTINABLE:
                    newly.add(job.id)
            try:
                applied = set(await self._storage.record_failures(counts, now))
            except NotImplementedError:
                return
            for job_id in sorted(newly & applied):
                log.warning("job quarantined job_id=%s: its restart budget is spent", job_id)
            if newly & applied:
                await self._sync_cancellations(now)
            todo = [c.job_id for c in counts if c.job_id not in applied]
        if todo:
            log.warning(
                "could not count an owner death of %d job(s): counts kept changing", len(todo)
            )

    async def update_pending_reasons(self) -> int:
        """Work out why the jobs of each pool with pending jobs wait, from the live
        servers' kinds, labels and free room, and store it on those jobs
        (:meth:`Storage.set_pending_reason`). Returns how many rows changed. Done
        by the leader every sweep; a storage without reasons is skipped."""
        if not self._reasons_stored:
            return 0
        pending = await self._storage.pending_pools()
        if not pending:
            return 0
        servers = await self._storage.list_servers(
            ServerQuery(statuses=frozenset({ServerStatus.ALIVE}), with_jobs=False)
        )
        counts = await self._storage.count_running_by_server() if servers else {}
        placements = [
            ServerPlacement(
                frozenset(s.kinds), parse_labels(s.labels), s.max_workers - counts.get(s.id, 0)
            )
            for s in servers
        ]
        changed = 0
        try:
            for pool in pending:
                changed += await self._storage.set_pending_reason(
                    pool, pending_reason(pool, placements)
                )
        except NotImplementedError as exc:
            log.info("pending reasons are not shown: %s", exc)
            self._reasons_stored = False
        return changed

    async def rebalance(self) -> int:
        """One rebalancing round, pool by pool (a kind with its constraints): tell
        the servers that may run a pool and hold more than their
        capacity-proportional share of its jobs (by more than one job) to hand the
        surplus back, while every such server caps its deliveries of that pool at
        its share for ``rebalance_hold`` seconds. A job only ever moves to a server
        that may run it. A pool whose jobs wait is left alone (free servers take
        those first); so is everything while any server went quiet. Returns how
        many jobs were asked to move."""
        servers = await self._storage.list_servers(
            ServerQuery(statuses=frozenset({ServerStatus.ALIVE}), with_jobs=False)
        )
        if len(servers) < 2:
            return 0
        fresh = utcnow() - timedelta(seconds=self.options.rebalance_fresh)
        if any(s.last_seen < fresh for s in servers):
            return 0  # a server went quiet: wait until it is back or declared dead
        if self._lost_jobs_lately({s.id for s in servers}):
            return 0  # a server may have died a moment ago: see _lost_jobs_lately
        waiting = await self._storage.list_jobs(
            JobQuery(statuses=frozenset({JobStatus.PENDING}), limit=1)
        )
        pending = await self._storage.pending_pools() if waiting.items else {}
        # Counted by the storage, not read (docs/benchmarks.md, "What changed", item 4).
        by_pool = await self._storage.count_running_by_pool()
        pools = sorted({pool for _, pool in by_pool} - set(pending), key=lambda p: p.key)
        labels = {s.id: parse_labels(s.labels) for s in servers}
        moved = 0
        for pool in pools:
            eligible = [s for s in servers if pool.accepts(s.kinds, labels[s.id])]
            whole = pool.is_default and len(eligible) == len(servers) and len(pools) == 1
            moved += await self._rebalance_pool(
                None if whole else pool,
                eligible,
                {s.id: by_pool.get((s.id, pool), 0) for s in eligible},
            )
        if moved == 0:
            # Counts first; groups apart only in a round that moved nothing, so
            # that the two kinds of move never cap the same pool at once.
            moved = await self._separate_spread(servers, labels, by_pool, set(pending))
        return moved

    def _lost_jobs_lately(self, live: set[str]) -> bool:
        """Whether jobs moved away from one of the ``live`` servers without its
        release and it has not been heard from since (:meth:`_after_start`'s
        notes): it was probably killed a moment ago, its messages went to the
        others, and it is not yet declared dead. A round now would count it as an
        empty live server, move jobs off the survivors toward it and cap every
        server at its share for ``rebalance_hold`` -- the moved jobs would wait
        for the caps to end. Notes older than twice ``server_timeout`` do not
        count (their server is dead by then, declared so by some manager)."""
        horizon = time.time() - 2 * self.options.server_timeout
        return any(
            server in live and any(at > horizon for at in notes.values())
            for server, notes in self._moved_from.items()
        )

    async def _separate_spread(
        self,
        servers: list[ServerRecord],
        labels: dict[str, dict[str, str]],
        by_pool: dict[tuple[str, Pool], int],
        pending: set[Pool],
    ) -> int:
        """Anti-affinity: move each job that shares a server with another job of
        its spread group to a server that may run its pool, has a free slot and runs
        no job of that group (each free slot and each group-free server taken once
        per round). The source server stops the job (``RELEASED``: its message goes
        back to the pool's queue) and caps that pool's deliveries one below what it
        held for ``rebalance_hold`` seconds, so the message goes to another server;
        a server that runs a job of the group hands it back (the spread bounces),
        so the group-free one takes it. Pools with waiting jobs are left alone.
        Returns how many jobs were asked to move."""
        doubles: dict[tuple[str, str], list[SpreadJob]] = {}
        holders: dict[str, set[str]] = {}
        for job in await self._storage.running_spread_jobs():
            doubles.setdefault((job.server_id, job.spread), []).append(job)
            holders.setdefault(job.spread, set()).add(job.server_id)
        if all(len(jobs) < 2 for jobs in doubles.values()):
            return 0
        running: dict[str, int] = {}
        for (sid, _), count in by_pool.items():
            running[sid] = running.get(sid, 0) + count
        free = {s.id: s.max_workers - running.get(s.id, 0) for s in servers}
        by_id = {s.id: s for s in servers}
        held: dict[tuple[str, Pool], int] = {}
        moves: list[SpreadJob] = []
        for (sid, group), jobs in sorted(doubles.items()):
            if sid not in by_id:
                continue  # its owner is not (or no longer) a live server
            for job in jobs[1:]:
                if job.pool in pending:
                    continue
                target = next(
                    (
                        s
                        for s in servers
                        if s.id != sid
                        and free[s.id] > 0
                        and s.id not in holders[group]
                        and job.pool.accepts(s.kinds, labels[s.id])
                    ),
                    None,
                )
                if target is None:
                    continue
                free[target.id] -= 1
                holders[group].add(target.id)
                key = (sid, job.pool)
                held[key] = held.get(key, by_pool.get(key, 0)) - 1
                moves.append(job)
        for (sid, pool), hold in sorted(held.items(), key=lambda kv: (kv[0][0], kv[0][1].key)):
            command = p.ReleaseJobs(
                count=0, hold=max(0, hold), hold_for=self.options.rebalance_hold, pool=pool.key
            )
            await self._send(command, sid)
        for job in moves:
            stop = p.StopJob(
                job_id=job.job_id, reason=p.StopReason.RELEASED, drop=False, max_fence=job.fence
            )
            await self._send(stop, job.server_id)
        if moves:
            log.info(
                "rebalance: moving %d job(s) off servers that run two of their spread group",
                len(moves),
            )
        return len(moves)

    async def _rebalance_pool(
        self, pool: Pool | None, servers: list[ServerRecord], running: dict[str, int]
    ) -> int:
        """Rebalance one pool over the servers that may run it (``pool=None``: the
        whole server, as a fleet of one kind without constraints always did)."""
        if len(servers) < 2:
            return 0
        total = sum(running.values())
        capacity = sum(s.max_workers for s in servers)
        if total == 0 or capacity == 0:
            return 0
        share = {s.id: total * s.max_workers / capacity for s in servers}
        surplus = {
            sid: running[sid] - math.ceil(share[sid])
            for sid in running
            if running[sid] - share[sid] > 1
        }
        if not surplus:
            return 0
        budget = max(1, int(total * self.options.rebalance_max_share))
        moves: dict[str, int] = {}
        for sid, extra in sorted(surplus.items(), key=lambda kv: -kv[1]):
            take = min(extra, budget)
            if take > 0:
                moves[sid] = take
                budget -= take
        for server in servers:
            command = p.ReleaseJobs(
                count=moves.get(server.id, 0),
                hold=max(1, math.ceil(share[server.id])),
                hold_for=self.options.rebalance_hold,
                pool=None if pool is None else pool.key,
            )
            await self._send(command, server.id)
        moved = sum(moves.values())
        log.info(
            "rebalance: moving %d of %d running job(s) of pool %s over %d servers",
            moved,
            total,
            "(all)" if pool is None else pool.key,
            len(servers),
        )
        return moved

    async def _relay_outbox(self, now: datetime) -> None:
        """Send what the outbox rows whose sender's claim ended ask for.

        A ``publish`` row of a job that is still ``pending`` is the hard case: its
        sender (a client's fast path) may have sent the message and only failed to
        delete the row (a database failover, a batch delete late under load), and
        a server may already run the copy without the manager having applied its
        start yet (its events wait behind a failover's retries). Sent again at
        once, two copies of the job would run until the manager applies the
        newer start. So the relay first waits for evidence: every live server's
        heartbeats sent :data:`RELAY_START_SLACK` after the row was first claimed
        here have been applied (:meth:`_may_resend`). A server that took the first
        message before then lists the copy in such a heartbeat, the job is then
        ``processing``, and the row is dropped without a send; still ``pending``,
        no server runs it, and the message is sent again under a new generation
        (:meth:`_resend_generation`). Rows waiting for that evidence stay claimed
        by this manager and are judged again every sweep. The row of an update's
        restart, which no client sends, is sent at once (:func:`_nobody_sent`)."""
        lease_until = now + timedelta(seconds=self.options.outbox_lease)
        claimed = await self._storage.claim_outbox(self.id, now, lease_until, 500)
        clock = now.timestamp()
        for item in claimed:
            first = self._unsent.get(item.id, (clock, item))[0]
            self._unsent[item.id] = (first, item)
            self._claimed[item.id] = clock
        # A row whose claim here ended without a new one is another manager's now.
        for row in [
            r for r, at in self._claimed.items() if at + self.options.outbox_lease <= clock
        ]:
            self._claimed.pop(row, None)
            self._unsent.pop(row, None)
        if not self._unsent:
            return
        items = [item for _, item in self._unsent.values()]
        jobs = {j.id: j for j in await self._storage.get_jobs([i.job_id for i in items])}
        live: list[ServerRecord] | None = None
        done: list[int] = []
        cancels = False
        for item in items:
            job = jobs.get(item.job_id)
            if item.kind is OutboxKind.CANCEL:
                cancels = True
                done.append(item.id)
                continue
            if job is None or job.status.final or job.status is JobStatus.PAUSED:
                done.append(item.id)
                continue
            if job.status.held:
                # Held before this generation's message was sent: nothing can run it
                # (unless an owner still runs an older one: that owner confirms).
                if job.server_id is None:
                    await self._confirm_unsent(job, JobEvent.CONFIRM_HELD, now, "held")
                done.append(item.id)
                continue
            if job.status is JobStatus.PROCESSING:
                # Started: a server holds a message of it, so one was sent (its
                # sender could not delete the row: a database failover) and the
                # broker gives it to another server if that one dies.
                done.append(item.id)
                continue
            if job.status is JobStatus.DELETING:
                # Cancelled before its message was ever sent: nothing can run it.
                await self._confirm_unsent(job, JobEvent.CONFIRM_DELETED, now, "cancelled")
                done.append(item.id)
                continue
            if live is None and not _nobody_sent(item, job):
                live = await self._storage.list_servers(
                    ServerQuery(
                        statuses=frozenset({ServerStatus.ALIVE, ServerStatus.DRAINING}),
                        with_jobs=False,
                    )
                )
            if live is not None and not self._may_resend(self._unsent[item.id][0], live, clock):
                continue  # a start may still be on its way: judged again next sweep
            generation = await self._resend_generation(job)
            if generation is None:
                continue  # it changed meanwhile: judged again next sweep
            log.info("outbox relay re-sends job %s under generation %d", job.id, generation)
            await self._transport.publish_job(job_message(job, generation))
            done.append(item.id)
        if cancels:
            await self._sync_cancellations(now)
        await self._storage.complete_outbox(done)
        for row in done:
            self._unsent.pop(row, None)
            self._claimed.pop(row, None)
        if done:
            log.info("outbox relay sent %d item(s)", len(done))
        if self._unsent:
            log.debug("outbox relay: %d row(s) wait for the servers' heartbeats", len(self._unsent))

    def _may_resend(self, claimed: float, live: list[ServerRecord], clock: float) -> bool:
        """Whether a ``pending`` job whose row this manager first claimed at
        ``claimed`` (epoch seconds) may be sent again: every live server has sent
        a heartbeat at least :data:`RELAY_START_SLACK` later that this manager
        applied (a copy started from its first message would be in it, and the
        job ``processing``). A live server this manager has no such heartbeat of
        -- another manager consumes the events, or it has not been heard from
        since -- holds the row back for at most ``server_timeout`` after the
        claim: by then it has reported the start to whichever manager applies
        its events, or it is declared dead."""
        horizon = claimed + RELAY_START_SLACK
        if clock - claimed >= self.options.server_timeout:
            return True
        return all(self._heard.get(server.id, 0.0) >= horizon for server in live)

    async def _resend_generation(self, job: JobRecord) -> int | None:
        """The generation to send a pending job's message under again, or ``None``
        if the job is no longer pending and unowned at ``job.generation``.

        Its sender may have sent the message already (it could not delete its
        outbox row: a failover, or a lease that ran out under load), and that
        message may be queued or just started and not yet reported. Sent again
        under the same generation, both copies would carry the same fencing token;
        so the generation is raised first (:meth:`Storage.raise_pending_generation`)
        and the older message's copy is superseded by the new one's."""
        try:
            raised = await self._storage.raise_pending_generation(job.id, job.generation)
        except NotImplementedError:
            return job.generation  # a backend without it: the old behaviour
        return job.generation + 1 if raised else None

    async def _confirm_unsent(
        self, job: JobRecord, event: JobEvent, now: datetime, what: str
    ) -> None:
        """Confirm a job stopped whose message was never sent (``event``)."""
        await self._storage.transition(
            job.id,
            event,
            server_id=None,
            fence=job.fence,
            now=now,
            reason=f"{what} before it was sent",
        )

    async def _sync_cancellations(self, now: datetime) -> None:
        since = now - timedelta(seconds=self.options.cancel_retention)
        await self._transport.set_cancellations(await stop_set(self._storage, since))
        self._last_resync = time.monotonic()


def _nobody_sent(item: OutboxItem, job: JobRecord) -> bool:
    """Whether no message of ``job``'s generation can have been sent: the row is
    one the storage wrote for the relay alone -- the restart of an argument update
    (``CONFIRM_HELD`` of an update: ``pending`` under generation
    ``update_floor + 1``) or the release of a job updated in place (``pending``
    under generation ``inplace_floor + 1``), the fence raised to that generation's
    floor, the row unclaimed: no client sends it -- and the job is still at that
    generation, of that row. Only a relay sends that message, and a relay raises
    the generation first. (A resumed job -- whose row a client sends -- keeps the
    fence of an older generation; a created one has no floor.) So the relay sends
    it without waiting for heartbeats (:meth:`ServerManager._relay_outbox`)."""
    generation = job.generation
    return (
        generation - 1 in (job.update_floor, job.inplace_floor)
        and item.generation == generation
        and split_fence(job.fence) == (generation, 0)
    )


def _about(event: p.Event | None, what: str = "") -> str:
    """``"started event of server S, job J"``: how a log line names an event
    (``what`` when there is none)."""
    if event is None:
        return what
    job_id = getattr(event, "job_id", None)
    job = f", job {job_id}" if isinstance(job_id, str) else ""
    return f"{event.TYPE} event of server {event.server_id}{job}"
