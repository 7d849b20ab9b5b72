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
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from orchestratr_core import protocol as p
from orchestratr_core._aio import cancel_and_log, keep_running, run_until_signal, spawn
from orchestratr_core.client import DEFAULT_CANCEL_RETENTION, OrchestratorClient, job_message
from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    DataRejected,
    DeadLetter,
    OrchestratrError,
    UnknownServer,
)
from orchestratr_core.job import (
    JobEvent,
    JobQuery,
    JobRecord,
    JobStatus,
    ServerQuery,
    ServerStatus,
    clean_text,
    new_id,
    utcnow,
)
from orchestratr_core.metrics import record_heartbeat_lag
from orchestratr_core.monitor import AdminOrchestratorMonitor, OrchestratorMonitor
from orchestratr_core.plugin.manager import PluginManager, get_plugin_manager
from orchestratr_core.retry import retrying
from orchestratr_core.server_views import ServerViews, Verdict
from orchestratr_core.storage import OutboxKind, Storage
from orchestratr_core.transport import Subscription, Transport

__all__ = ["ManagerOptions", "ServerManager"]

log = logging.getLogger("orchestratr.manager")

_T = TypeVar("_T")
_SEND_CHUNK = 200
"""Commands one heartbeat asks for are sent this many at a time (pipelined)."""

LEADER_LEASE = "leader"

_UNEXPECTED_ATTEMPTS = 3
"""An event whose handling raises an error nobody classified (a bug, a driver
error a storage does not know) is tried this many times, then dead-lettered."""


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
    """How long a manager may take to send an outbox row it claimed. A create
    whose fast-path publish failed (broker down) is sent by the leader's relay
    at most this long (plus a sweep) later."""
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

    def __post_init__(self) -> None:
        if self.server_timeout <= 0 or self.sweep_interval <= 0:
            raise ConfigurationError("server_timeout and sweep_interval must be > 0")
        if self.leader_lease <= self.sweep_interval:
            raise ConfigurationError("leader_lease must be longer than sweep_interval")


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
        self.monitor = OrchestratorMonitor(self._storage)
        self.admin = AdminOrchestratorMonitor(self._storage)
        self._events: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._known_servers: set[str] = set()
        self._views = ServerViews(stale_after=self.options.server_timeout / 2)
        """Each server's set of jobs as of its acknowledged heartbeat."""
        self._last_resync = 0.0
        self._last_rebalance = time.monotonic()
        self._started = False
        self._stopped = False
        self.is_leader = False

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
        """Apply one server event. While the storage is down this waits and retries,
        so the event (and those behind it) stay in the broker: no status is lost.

        One event never stops the others: an event the storage refuses
        (:class:`DataRejected`: out of range, an encoding the database cannot
        store) raises :class:`DeadLetter`, and so does one that fails with an
        unclassified error :data:`_UNEXPECTED_ATTEMPTS` times; the transport then
        dead-letters it with one warning line and delivers the next."""
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._retry(f"apply {event.TYPE} event", lambda: self._apply(event))
                return
            except DataRejected as exc:
                raise DeadLetter(f"{_about(event)} refused by the storage: {exc}") from None
            except OrchestratrError as exc:
                log.error("%s rejected: %s", _about(event), exc)
                return
            except Exception as exc:
                if attempt >= _UNEXPECTED_ATTEMPTS:
                    log.error("%s failed %d times", _about(event), attempt, exc_info=True)
                    raise DeadLetter(
                        f"{_about(event)} failed {attempt} times: {type(exc).__name__}: {exc}"
                    ) from None
                await asyncio.sleep(0.1 * attempt)

    async def _apply(self, event: p.Event) -> None:
        now = utcnow()
        if isinstance(event, p.ServerHeartbeat):
            await self._on_heartbeat(event, now)
        elif isinstance(event, p.JobStarted):
            await self._on_started(event, now)
        elif isinstance(event, p.JobStopped):
            await self._on_stopped(event, now)
        elif isinstance(event, p.JobFailed):
            await self._storage.transition(
                event.job_id,
                JobEvent.FAIL,
                server_id=event.server_id,
                fence=event.fence,
                now=now,
                error=clean_text(event.error),
                restarts=event.restarts,
            )
        elif isinstance(event, p.JobDiscarded):
            await self._storage.transition(
                event.job_id,
                JobEvent.CONFIRM_DELETED,
                server_id=event.server_id,
                fence=event.fence,
                now=now,
                reason="queued message dropped",
            )
        elif isinstance(event, p.ServerLeft):
            await self._storage.server_left(event.server_id, now)
            self._known_servers.discard(event.server_id)
            self._views.forget(event.server_id)
            self._plugins.notify("server_left", server_id=event.server_id, name="", reason="left")

    async def _on_heartbeat(self, hb: p.ServerHeartbeat, now: datetime) -> None:
        # The jobs whose start reports this heartbeat replaces, as they were before
        # it (one query): what a JobStarted of each would have told (_after_start).
        before = (
            {job.id: job for job in await self._storage.get_jobs(hb.started)} if hb.started else {}
        )
        conflicts = await self._storage.apply_heartbeat(hb, now)
        record_heartbeat_lag(now.timestamp() - hb.sent_at)
        if hb.server_id not in self._known_servers:
            self._known_servers.add(hb.server_id)
            self._plugins.notify(
                "server_joined", server_id=hb.server_id, name=hb.name, max_workers=hb.max_workers
            )
        fences = {job.job_id: job.fence for job in hb.jobs}
        sends = [
            self._stop_copy(job, hb.server_id, fences.get(job.id, job.fence)) for job in conflicts
        ]
        if hb.started:
            refused = {job.id for job in conflicts}
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
        if verdict is not Verdict.NOTHING:
            # After the stops above: what the server hears next is on a set that
            # already excludes the copies it was told to stop.
            await self._send(p.HeartbeatAck(seq=hb.seq, full=verdict is Verdict.FULL), hb.server_id)

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
        if result.applied and event is JobEvent.COMPLETE:
            # Its ack may be lost: servers must drop a redelivered message of it.
            await self._sync_cancellations(now)

    async def _stop_copy(self, job: JobRecord, server_id: str, fence: int) -> None:
        """A server runs a copy the storage did not accept: tell it to stop."""
        if job.status in (JobStatus.DELETING, JobStatus.DELETED):
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
            except OrchestratrError as exc:
                log.warning("sweep failed: %s", exc)
            except Exception:
                log.exception("sweep failed unexpectedly")
            await asyncio.sleep(self.options.sweep_interval)

    async def _sweep(self) -> None:
        """One round of the leader's duties."""
        now = utcnow()
        until = now + timedelta(seconds=self.options.leader_lease)
        self.is_leader = await self._storage.acquire_lease(LEADER_LEASE, self.id, now, until)
        if not self.is_leader:
            return
        expired = await self._storage.expire_servers(
            now - timedelta(seconds=self.options.server_timeout), now
        )
        for server in expired:
            log.warning("server %s (%s) is dead: its jobs are pending", server.id, server.name)
            self._known_servers.discard(server.id)
            self._views.forget(server.id)
            self._plugins.notify(
                "server_left", server_id=server.id, name=server.name, reason="dead"
            )
        await self._relay_outbox(now)
        if time.monotonic() - self._last_resync >= self.options.cancellation_resync:
            await self._sync_cancellations(now)
        if (
            self.options.rebalance
            and time.monotonic() - self._last_rebalance >= self.options.rebalance_interval
        ):
            self._last_rebalance = time.monotonic()
            await self.rebalance()

    async def rebalance(self) -> int:
        """One rebalancing round: tell servers above their capacity-proportional
        share (by more than one job) to hand the surplus back, while every server
        caps itself at its share for ``rebalance_hold`` seconds. Does nothing while
        jobs wait in the queue (free servers take those first). Returns how many
        jobs were asked to move."""
        servers = await self._storage.list_servers(
            ServerQuery(statuses=frozenset({ServerStatus.ALIVE}), with_jobs=False)
        )
        if len(servers) < 2:
            return 0
        fresh = utcnow() - timedelta(seconds=self.options.rebalance_fresh)
        if any(s.last_seen < fresh for s in servers):
            return 0  # a server went quiet: wait until it is back or declared dead
        waiting = await self._storage.list_jobs(
            JobQuery(statuses=frozenset({JobStatus.PENDING}), limit=1)
        )
        if waiting.items:
            return 0
        # Counted by the storage, not read (docs/benchmarks.md, "What changed", item 4).
        counts = await self._storage.count_running_by_server()
        running = {s.id: counts.get(s.id, 0) for s in servers}
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
            )
            await self._send(command, server.id)
        moved = sum(moves.values())
        log.info(
            "rebalance: moving %d of %d running job(s) over %d servers", moved, total, len(servers)
        )
        return moved

    async def _relay_outbox(self, now: datetime) -> None:
        lease_until = now + timedelta(seconds=self.options.outbox_lease)
        items = await self._storage.claim_outbox(self.id, now, lease_until, 500)
        if not items:
            return
        jobs = {j.id: j for j in await self._storage.get_jobs([i.job_id for i in items])}
        done: list[int] = []
        cancels = False
        for item in items:
            job = jobs.get(item.job_id)
            if item.kind is OutboxKind.CANCEL:
                cancels = True
                done.append(item.id)
                continue
            if job is None or job.status.final:
                done.append(item.id)
                continue
            if job.status is JobStatus.DELETING:
                # Cancelled before its message was ever sent: nothing can run it.
                await self._storage.transition(
                    job.id,
                    JobEvent.CONFIRM_DELETED,
                    server_id=None,
                    fence=job.fence,
                    now=now,
                    reason="cancelled before it was sent",
                )
                done.append(item.id)
                continue
            await self._transport.publish_job(job_message(job, item.generation))
            done.append(item.id)
        if cancels:
            await self._sync_cancellations(now)
        await self._storage.complete_outbox(done)
        log.info("outbox relay sent %d item(s)", len(done))

    async def _sync_cancellations(self, now: datetime) -> None:
        since = now - timedelta(seconds=self.options.cancel_retention)
        await self._transport.set_cancellations(await self._storage.cancelled_job_ids(since))
        self._last_resync = time.monotonic()


def _about(event: p.Event) -> str:
    """``"started event of server S, job J"``: how a log line names an event."""
    job_id = getattr(event, "job_id", None)
    job = f", job {job_id}" if isinstance(job_id, str) else ""
    return f"{event.TYPE} event of server {event.server_id}{job}"
