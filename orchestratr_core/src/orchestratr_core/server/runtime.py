"""The server runtime: a process that runs up to ``max_workers`` jobs at once.

A server needs only a transport. It holds one job message (a
:class:`~orchestratr_core.transport.Delivery`) per running job for as long as
the job runs, and:

* starts the job function as soon as the delivery arrives, unless the job is in
  the cancellation set (then it drops the message and says so);
* restarts a job function that raised, with exponential backoff, reporting the
  error and the restart count; a job function that *returns* has completed: its
  message is dropped and it never runs again;
* stops a job at once — hard, without grace — when its delivery is lost (the
  broker may already have given it to another server: self-fencing);
* stops a job cooperatively (token, then a hard cancel after ``stop_grace``) when
  told to: cancel (message dropped), superseded by a newer copy (dropped),
  hand-over on shutdown or drain (released to the queue);
* never runs two copies of one job in one process: a second delivery of the same
  job waits for the first copy to end, and the lower fencing token is dropped;
* publishes a heartbeat every ``heartbeat_interval`` with every running job and
  its fencing token, so that the manager can reconcile after anything -- once the
  manager acknowledged one, only what changed since (starts, stops, fences, new
  checkpoints, watchdog beats that matter), with a digest of the whole
  (:mod:`orchestratr_core.server.beats`); when many jobs start at once, one
  heartbeat replaces their start reports;
* runs one function per job **kind** and consumes exactly the pools (kind and
  constraints, :mod:`orchestratr_core.placement`) whose kind it runs and whose
  constraints its labels satisfy, learning of new pools from the transport
  (:meth:`Transport.watch_pools`); it never runs more than ``max_workers`` jobs
  in all, nor more than a kind's limit of that kind.

A running job costs one asyncio task (the job function) and a few small
objects, so that one process can hold tens of thousands of idle jobs and take
over a failed server's jobs quickly: its supervisor is a task only while it has
something to do (:meth:`Run.park`) -- a stop request, the end of the job
function, the watchdog's timer and the loss of the delivery make it -- and
then sleeps on one plain future (:attr:`Run.wake`) that the same events resolve.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from orchestratr_core import protocol as p
from orchestratr_core._aio import cancel_and_log, keep_running, run_until_signal, spawn
from orchestratr_core.errors import ConfigurationError, DeliveryLost, OrchestratrError
from orchestratr_core.job import (
    MAX_COUNT,
    MAX_ERROR_LENGTH,
    JobArgument,
    make_fence,
    new_id,
    split_fence,
)
from orchestratr_core.lifecycle import is_checkpointed, is_updatable, parse_drop, parse_hold
from orchestratr_core.placement import (
    DEFAULT_KIND,
    DEFAULT_POOL,
    Pool,
    format_labels,
    parse_labels,
    validate_kind,
)
from orchestratr_core.plugin.manager import PluginManager, get_plugin_manager
from orchestratr_core.retry import backoff_delay, retrying
from orchestratr_core.runner import Heartbeat, JobRunner, StopToken
from orchestratr_core.server.beats import HeartbeatSeries
from orchestratr_core.server.options import ServerOptions, check_server_name
from orchestratr_core.server.outbox import EventOutbox
from orchestratr_core.server.run import GcFreezer, Outcome, Run, UpdateFeed
from orchestratr_core.transport import Delivery, JobConsumer, Subscription, Transport

SPREAD_BOUNCES = 3
"""A job of a spread group that this server already runs is handed back this
many times (so that a server without one takes it) before it runs here anyway."""
SPREAD_PAUSE = 0.2
"""Seconds a spread job is held before it is handed back, times its delivery count + 1."""

AVOID_BOUNCES = 3
"""How many times a server hands back the message of a job it moved away after
failures (:attr:`ServerOptions.move_after_failures`) before it runs it after all:
with no other server able to take it, the job must still run."""

AVOID_PAUSE = 0.2
"""Seconds (times the bounce) a server holds such a message before handing it
back, so that other servers get their turn."""

__all__ = ["JobFunction", "OrchestratedServer"]

log = logging.getLogger("orchestratr.server")

JobFunction = Callable[[JobArgument, StopToken, Heartbeat], Any]
"""``async def job(arg, token, heartbeat)`` — or a plain blocking function."""


class OrchestratedServer:
    """Runs jobs delivered by the transport. See the module docstring.

    :param job: ``async def job(arg, token, heartbeat)`` or a blocking function of
        the same parameters (run in a thread pool of ``max_workers`` threads); or
        a mapping of job kind to such a function, one per kind this server runs
        (a single function runs the default kind).
    :param transport: a :class:`Transport`, or a plugin name / URL
        (``"memory"``, ``"amqp://guest:guest@localhost/"``).
    :param name: a label for people; need not be unique.
    :param max_workers: how many jobs this server runs at once (>= 1), all kinds together.
    :param labels: the server's labels (``{"region": "eu"}`` or ``["region=eu"]``),
        which jobs' placement constraints are matched against.
    :param max_workers_per_kind: at most this many jobs of a kind at once
        (``{"feed": 20}``); kinds not named are limited by ``max_workers`` alone.
    """

    def __init__(
        self,
        job: JobFunction | Mapping[str, JobFunction],
        *,
        transport: Transport | str,
        name: str = "server",
        max_workers: int = 10,
        options: ServerOptions | None = None,
        plugins: PluginManager | None = None,
        labels: Mapping[str, str] | Iterable[str] | None = None,
        max_workers_per_kind: Mapping[str, int] | None = None,
    ) -> None:
        jobs = _job_functions(job)
        if (
            isinstance(max_workers, bool)
            or not isinstance(max_workers, int)
            or not 1 <= max_workers <= MAX_COUNT
        ):
            raise ConfigurationError(
                f"max_workers must be a whole number within 1..{MAX_COUNT}, not {max_workers!r} "
                "(there is no 'unlimited': size it to what the host can run)"
            )
        check_server_name(name)
        self.id = new_id()
        self.name = name
        self.max_workers = max_workers
        self.options = options or ServerOptions()
        self._plugins = plugins or get_plugin_manager()
        self._transport = (
            self._plugins.make_transport(transport) if isinstance(transport, str) else transport
        )
        self._jobs = jobs
        self._checkpointed = frozenset(kind for kind, fn in jobs.items() if is_checkpointed(fn))
        """The kinds whose function waits for a moved job's latest checkpoint."""
        self._updatable = frozenset(kind for kind, fn in jobs.items() if is_updatable(fn))
        """The kinds whose function takes a new argument without a restart."""
        self.kinds = frozenset(jobs)
        """The job kinds this server runs."""
        self.labels = parse_labels(labels)
        """The server's labels."""
        self.kind_limits = _kind_limits(max_workers_per_kind, self.kinds, max_workers)
        """Per-kind limits (kinds not named: ``max_workers``)."""
        self._runners: dict[str, JobRunner] = {}
        for kind, function in jobs.items():
            self._runners[kind] = self._plugins.make_runner(function)
            self._runners[kind].resize(min(max_workers, self.kind_limits.get(kind, max_workers)))
        self._runs: dict[str, Run] = {}
        self._cancelled: set[str] = set()
        self._held: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        """Drop marks: job id -> the newest generation whose messages are dropped
        while a copy of it may keep running (an update in place)."""
        self._avoid: dict[str, tuple[float, int]] = {}
        """Jobs moved away after failures: job id -> (monotonic until, bounces)."""
        """Hold marks: job id -> the largest generation no copy may run."""
        self._consumer: JobConsumer | None = None
        """The first job consumer opened (it says the server got as far as taking jobs)."""
        self._consumers: dict[Pool, JobConsumer] = {}
        self._capacities: dict[Pool, int] = {}
        self._pool_holds: dict[Pool, int] = {}
        self._pools: Subscription | None = None
        self._pool_runs: collections.Counter[Pool] = collections.Counter()
        self._kind_runs: collections.Counter[str] = collections.Counter()
        self._commands: Subscription | None = None
        self._beats = HeartbeatSeries()
        self._outbox = EventOutbox(
            self._transport.publish_event,
            self._heartbeat_event,
            self._runs.__len__,
            self.options.heartbeat_interval,
            self._beats.sent,
        )
        self._gc = GcFreezer()
        self._resume = self._supervise_parked
        """One bound method for every parked job (nothing allocated per job)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._started_at = time.time()
        self._started = False
        self._stopped = asyncio.Event()
        self._draining = False
        self._shutdown_requested: asyncio.Event | None = None
        self._capacity = max_workers
        self._hold: int | None = None
        self._hold_until = 0.0

    # -- public API -----------------------------------------------------------------

    def running(self) -> dict[str, JobArgument]:
        """Jobs running now (not being stopped, nor waiting for their checkpoint):
        job id -> argument."""
        return {
            jid: run.arg
            for jid, run in self._runs.items()
            if run.stop_reason is None and run.handover is None
        }

    @property
    def transport(self) -> Transport:
        """The transport this server uses."""
        return self._transport

    async def start(self) -> None:
        """Connect (retrying while the broker is unreachable), subscribe to
        commands, read the cancellation set, then start taking jobs."""
        if self._started:
            return
        self._started = True
        await self._connect()
        self._commands, cancelled = await self._transport.consume_commands(
            self.id, self._on_command
        )
        for entry in cancelled:
            self._note_cancellation(entry)
        self._tasks.append(spawn(self._outbox.pump(), name="orchestratr-events", logger=log))
        self._outbox.publish_heartbeat()
        if self.kinds == {DEFAULT_KIND} and not self.labels:
            # Today's single-function server: the jobs queue only (no pool watching).
            await self._on_pool(DEFAULT_POOL)
        else:
            if type(self._transport).consume_pool is Transport.consume_pool:
                raise ConfigurationError(
                    f"{type(self._transport).__name__} does not route job kinds or labels; "
                    "run a single job function without labels on it"
                )
            self._pools = await self._transport.watch_pools(self._on_pool)
        self._tasks.append(spawn(self._heartbeats(), name="orchestratr-hb", logger=log))
        self._plugins.notify(
            "server_joined", server_id=self.id, name=self.name, max_workers=self.max_workers
        )
        log.info(
            "server started id=%s name=%s max_workers=%d kinds=%s labels=%s",
            self.id,
            self.name,
            self.max_workers,
            ",".join(sorted(self.kinds)),
            ",".join(format_labels(self.labels)) or "-",
        )

    async def readiness(self) -> str | None:
        """``None`` when this server can take and hold jobs now, else one line
        saying why not: not started, stopping (draining), or no live broker
        session (cut off: its fence gave the session up, or it is reconnecting).
        ``/readyz`` answers with it (:mod:`orchestratr_core.health`)."""
        if self._consumer is None:
            return "not started"
        if self._draining or self._stopped.is_set():
            return "stopping: handing its jobs over"
        if not self._transport.connected:
            return "no live broker session (reconnecting)"
        return None

    async def stop(self, *, handover: bool = True) -> None:
        """Stop gracefully: take no more jobs, stop every job cooperatively (hard
        after ``stop_grace``), hand their messages back to the queue so other
        servers take them at once, say goodbye, close the transport."""
        if self._stopped.is_set():
            return
        self._draining = True
        await self._close_consumers()
        reason = p.StopReason.RELEASED if handover else p.StopReason.LOST
        runs = list(self._runs.values())
        for run in runs:
            run.request_stop(reason)
        await self._wait_runs(runs)
        if self._consumer is not None:  # it got as far as taking jobs: say goodbye
            self._outbox.publish(p.ServerLeft(server_id=self.id, at=time.time()))
            await self._outbox.flush(5.0)
        await self._shutdown()
        self._plugins.notify("server_left", server_id=self.id, name=self.name, reason="stopped")
        log.info("server stopped id=%s", self.id)

    async def kill(self) -> None:
        """Die abruptly, as ``kill -9`` would: no hand-over, no goodbye. The broker
        gives the held messages to other servers (:meth:`Transport.crash`). For
        tests and the demo."""
        if self._stopped.is_set():
            return
        self._draining = True
        self._outbox.closed = True  # a killed server says nothing more
        for run in self._runs.values():
            run.request_stop(p.StopReason.LOST, hard=True)
        crashing = self._transport.crash()
        if crashing is not None:
            await crashing
        await self._wait_runs(list(self._runs.values()))
        await self._shutdown()

    async def run_forever(self, *, install_signal_handlers: bool = True) -> None:
        """Start, run until SIGTERM/SIGINT (or a drain command), then stop gracefully."""
        self._shutdown_requested = asyncio.Event()
        await run_until_signal(
            self.start,
            self.stop,
            stopped=self._stopped,
            requested=self._shutdown_requested,
            install_signal_handlers=install_signal_handlers,
        )

    # -- start-up and shutdown ----------------------------------------------------------

    async def _connect(self) -> None:
        async for attempt in retrying(
            "reach the broker", maximum=self.options.connect_retry_max, logger=log
        ):
            with attempt:
                await self._transport.connect()

    async def _close_consumers(self) -> None:
        if self._pools is not None:
            with contextlib.suppress(OrchestratrError, OSError):
                await self._pools.close()
        for consumer in list(self._consumers.values()):
            try:
                await consumer.close()
            except Exception as exc:  # a broken transport must not stop the hand-over
                log.warning("could not cancel a job consumer: %s", exc)

    async def _on_pool(self, pool: Pool) -> None:
        """A pool exists: consume it if this server may run its jobs (idempotent)."""
        if pool in self._consumers or self._draining or self._stopped.is_set():
            return
        if not pool.accepts(self.kinds, self.labels):
            return
        self._consumers[pool] = _OPENING  # a second naming while we await is ignored
        capacity = self._pool_capacity(pool)
        try:
            consumer = await self._transport.consume_pool(pool, capacity, self._on_delivery)
        except BaseException:
            del self._consumers[pool]
            raise
        self._consumers[pool] = consumer
        self._capacities[pool] = capacity
        if self._consumer is None:
            self._consumer = consumer
        log.info("consuming pool %s (capacity %d)", pool.key, capacity)
        self._update_capacity()

    async def _shutdown(self) -> None:
        self._stopped.set()
        await cancel_and_log(self._tasks, logger=log)
        self._tasks.clear()
        if self._commands is not None:
            with contextlib.suppress(OrchestratrError, OSError):
                await self._commands.close()
        with contextlib.suppress(OrchestratrError, OSError):
            await self._transport.close()
        for runner in self._runners.values():
            await runner.close()

    async def _wait_runs(self, runs: list[Run]) -> None:
        tasks = [run.task for run in runs if run.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.options.stop_grace + 5.0)

    # -- deliveries -----------------------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery) -> None:
        message = delivery.message
        fence = make_fence(message.generation, delivery.delivery_count)
        if self._draining:
            await self._settle(delivery, release=True)
            return
        if (
            message.job_id in self._cancelled
            or self._is_held(message.job_id, fence)
            or message.generation <= self._dropped.get(message.job_id, -1)
        ):
            log.info("dropping cancelled or held job job_id=%s fence=%d", message.job_id, fence)
            if await self._settle(delivery, release=False):
                self._outbox.publish(
                    p.JobDiscarded(
                        server_id=self.id, job_id=message.job_id, fence=fence, at=time.time()
                    )
                )
            return
        pool = message.pool
        if not pool.accepts(self.kinds, self.labels):
            # Never run a job this server may not (I7): only a foreign message on
            # a pool's queue could get here. Hand it back for a server that may.
            log.error(
                "handing back a job of a pool this server does not run job_id=%s pool=%s",
                message.job_id,
                pool.key,
            )
            await self._settle(delivery, release=True)
            return
        previous = self._runs.get(message.job_id)
        if previous is None and not self._has_room(pool):
            # More was delivered than there is room for (prefetch follows capacity
            # a moment late across several pools): lower the prefetch first, let
            # that reach the transport, then give the message back, so that it is
            # not handed straight back to us.
            self._update_capacity()
            await asyncio.sleep(0)
            await self._settle(delivery, release=True)
            return
        if previous is None and self._avoids(message.job_id):
            log.info(
                "handing back job_id=%s: it failed here, another server may take it", message.job_id
            )
            spawn(
                self._release_later(delivery, AVOID_PAUSE * self._avoid[message.job_id][1]),
                name="orchestratr-avoid",
                logger=log,
                keep=self._background,
            )
            return
        if (
            previous is None
            and message.spread is not None
            and delivery.delivery_count < SPREAD_BOUNCES
            and any(
                run.spread == message.spread and run.stop_reason is None
                for run in self._runs.values()
            )
        ):
            # Hand it back after a pause that grows with each bounce, so that
            # servers that may not have consumed its pool yet get their chance.
            delay = SPREAD_PAUSE * (delivery.delivery_count + 1)
            log.info(
                "handing back job_id=%s in %.1fs: a job of spread group %r runs here",
                message.job_id,
                delay,
                message.spread,
            )
            spawn(
                self._release_later(delivery, delay),
                name="orchestratr-spread",
                logger=log,
                keep=self._background,
            )
            return
        if previous is not None:
            if previous.arg.fence >= fence:
                # A duplicate copy with an older token: drop it, keep what runs.
                log.warning(
                    "dropping duplicate delivery job_id=%s fence=%d (running fence=%d)",
                    message.job_id,
                    fence,
                    previous.arg.fence,
                )
                await self._settle(delivery, release=False)
                return
            previous.request_stop(p.StopReason.SUPERSEDED)
        arg = JobArgument(
            job_id=message.job_id,
            name=message.name,
            argument=message.argument,
            fence=fence,
            checkpoint=message.checkpoint,
            kind=message.kind,
        )
        run = Run(
            delivery=delivery,
            arg=arg,
            token=StopToken(lease=_lease_of(delivery)),
            heartbeat_timeout=message.heartbeat_timeout,
            checkpoint=message.checkpoint,
            pool=pool,
            spread=message.spread,
        )
        if delivery.delivery_count > 0 and message.kind in self._checkpointed:
            # Redelivered: an earlier owner may have recorded a newer checkpoint
            # than the message carries; the manager sends it after our start.
            run.handover = asyncio.get_running_loop().create_future()
        if message.kind in self._updatable:
            run.feed = UpdateFeed(run)
        self._count(self._runs.get(message.job_id), -1)
        self._runs[message.job_id] = run
        self._count(run, 1)
        if previous is None and run.handover is None:
            self._start_unsupervised(run)
        else:
            run.task = asyncio.create_task(
                self._supervise(run, previous), name=f"orchestratr-job-{message.job_id}"
            )

    def _start_unsupervised(self, run: Run) -> None:
        """Start the job function of a new run at once, without a supervising task:
        what the supervisor does first (watch the delivery, report the start, start
        the job function) is done here, and its task is made only when it has
        something to do -- the job ended, a stop or a loss, or the watchdog is due
        (:meth:`Run.park`). A job that just runs, which is nearly every job and
        every job a failover moves, costs one task instead of two."""
        arg = run.arg
        run.watch_loss()
        if run.stop_reason is not None:  # lost already: the supervisor never starts it
            run.task = asyncio.create_task(
                self._supervise(run, None), name=f"orchestratr-job-{arg.job_id}"
            )
            return
        # In a context of its own, as a supervising task would be: an observer sets
        # the job's context (its log fields) in the start hook, and this runs in
        # the delivery task, whose later lines are about other jobs or none.
        began, job_task = contextvars.copy_context().run(self._start_job, run)
        run.park(job_task, began, self._resume)
        job_task.add_done_callback(run.alert)

    def _start_job(self, run: Run) -> tuple[float, asyncio.Task[None]]:
        """Report the start of ``run`` and start its job function: (when, its task)."""
        return self._report_start(run), self._run_job(run)

    def _report_start(self, run: Run) -> float:
        """Report that the job function of ``run`` starts now; returns the time."""
        began = time.time()
        run.last_heartbeat = None
        arg = run.arg
        self._emit(
            p.JobStarted(
                server_id=self.id,
                job_id=arg.job_id,
                fence=arg.fence,
                at=began,
                restarts=run.restarts,
            ),
            arg.name,
        )
        return began

    def _run_job(self, run: Run) -> asyncio.Task[None]:
        """Start the job function of ``run`` as a task (an updatable function gets
        the run's :class:`UpdateFeed` as its heartbeat)."""
        arg = run.arg
        beat: Heartbeat = run.beat
        if run.feed is not None:
            run.feed.called_with = run.feed.version
            beat = run.feed
        return asyncio.create_task(
            self._runners[arg.kind].run(self._jobs[arg.kind], arg, run.token, beat)
        )

    def _supervise_parked(self, run: Run) -> None:
        """Make the supervisor of a job started without one (:meth:`Run.park`)."""
        job_task = run.parked
        assert job_task is not None
        run.parked = None
        run.task = asyncio.create_task(
            self._supervise(run, None, first=(job_task, run.began)),
            name=f"orchestratr-job-{run.arg.job_id}",
        )

    async def _release_later(self, delivery: Delivery, delay: float) -> None:
        await asyncio.sleep(delay)
        if not delivery.lost.is_set():
            await self._settle(delivery, release=True)

    async def _settle(self, delivery: Delivery, *, release: bool) -> bool:
        try:
            if release:
                await delivery.release()
            else:
                await delivery.ack()
        except DeliveryLost:
            return False
        except (OrchestratrError, OSError) as exc:
            log.warning("could not settle a delivery: %s", exc)
            return False
        return True

    async def _supervise(
        self,
        run: Run,
        previous: Run | None,
        *,
        first: tuple[asyncio.Task[None], float] | None = None,
    ) -> None:
        """Run one job until it is stopped, restarting it after failures.

        ``first``: the job function's task and start time when the job was started
        without this supervisor (:meth:`_start_unsupervised`), which then takes
        over from there."""
        arg = run.arg
        if first is None:
            run.watch_loss()
        forced = False
        error: str | None = None
        try:
            if previous is not None and previous.task is not None:
                # Never two copies in one process: wait for the older copy to end.
                await asyncio.wait({previous.task})
            attempt = 0
            while first is not None or run.stop_reason is None:
                job_task: asyncio.Task[None]
                if first is not None:
                    (job_task, began), first = first, None
                else:
                    arg = run.arg  # an update in place may have replaced the argument
                    began = self._report_start(run)
                    if run.handover is not None and not await self._await_checkpoint(run):
                        break
                    if arg.checkpoint != run.checkpoint:
                        arg = run.arg = dataclasses.replace(arg, checkpoint=run.checkpoint)
                    job_task = self._run_job(run)
                    job_task.add_done_callback(run.alert)
                outcome = await run.wait_job(job_task, began)
                if outcome is Outcome.STOP:
                    forced = await self._stop_job(run, job_task)
                    break
                if outcome is Outcome.WATCHDOG:
                    forced = await self._stop_job(run, job_task)
                    error = f"watchdog: no heartbeat() within {run.heartbeat_timeout} s"
                    run.token = StopToken(lease=_lease_of(run.delivery))
                elif run.token.lease_expired:
                    # The job saw its lease run out and returned: that is a loss,
                    # never a completion (the broker may have given it away).
                    if not job_task.cancelled():
                        job_task.exception()  # retrieved: it may have raised while stopping
                    run.request_stop(p.StopReason.LOST, hard=True)
                    break
                elif job_task.exception() is None:
                    run.request_stop(p.StopReason.COMPLETED)
                    break
                else:
                    exc = job_task.exception()
                    assert exc is not None
                    error = _describe(exc)
                if time.time() - began >= self.options.restart_reset_after:
                    attempt = 0
                attempt += 1
                run.restarts += 1
                delay = backoff_delay(
                    attempt, self.options.restart_initial, self.options.restart_max
                )
                log.warning(
                    "job failed job_id=%s fence=%d restarts=%d retry_in=%.1fs error=%s",
                    arg.job_id,
                    arg.fence,
                    run.restarts,
                    delay,
                    error,
                )
                self._emit(
                    p.JobFailed(
                        server_id=self.id,
                        job_id=arg.job_id,
                        fence=arg.fence,
                        error=error,
                        restarts=run.restarts,
                        retry_in=delay,
                        at=time.time(),
                    ),
                    arg.name,
                )
                moves = self.options.move_after_failures
                if moves and attempt >= moves and run.stop_reason is None:
                    # Failed here again and again: let a different server try next.
                    log.warning(
                        "moving job_id=%s fence=%d away after %d failures in a row",
                        arg.job_id,
                        arg.fence,
                        attempt,
                    )
                    self._note_avoid(arg.job_id)
                    run.request_stop(p.StopReason.RELEASED)
                    break
                retry_at = time.monotonic() + delay
                while run.stop_reason is None and (wait := retry_at - time.monotonic()) > 0:
                    await run.sleep(wait)
        except asyncio.CancelledError:
            run.request_stop(p.StopReason.LOST, hard=True)
            raise
        finally:
            run.unwatch_loss()
            if self._runs.get(arg.job_id) is run:
                del self._runs[arg.job_id]
                self._count(run, -1)
            self._gc.ended += 1
            await self._finish(run, forced=forced, error=error)
            self._update_capacity()

    async def _await_checkpoint(self, run: Run) -> bool:
        """Wait (at most ``checkpoint_wait``, or until stopped) for the manager's
        :class:`~protocol.JobCheckpoint` of a redelivered job. False if the job
        was told to stop meanwhile."""
        handover = run.handover
        assert handover is not None
        deadline = time.monotonic() + self.options.checkpoint_wait
        while not handover.done() and run.stop_reason is None:
            wait = deadline - time.monotonic()
            if wait <= 0:
                log.warning(
                    "no checkpoint from the manager within %.1f s job_id=%s fence=%d: "
                    "starting with the message's",
                    self.options.checkpoint_wait,
                    run.arg.job_id,
                    run.arg.fence,
                )
                break
            await run.sleep(wait)
        if handover.done():
            run.checkpoint = handover.result()
        run.handover = None
        return run.stop_reason is None

    def _note_avoid(self, job_id: str) -> None:
        """Remember to hand ``job_id`` back for a while; forget expired notes."""
        now = time.monotonic()
        for stale in [j for j, (until, _) in self._avoid.items() if until <= now]:
            del self._avoid[stale]
        self._avoid[job_id] = (now + self.options.avoid_for, 0)

    def _avoids(self, job_id: str) -> bool:
        """True if this server should hand back a message of ``job_id`` (it moved
        the job away after failures, lately, and bounced it fewer than
        :data:`AVOID_BOUNCES` times); counts the bounce."""
        note = self._avoid.get(job_id)
        if note is None:
            return False
        until, bounces = note
        if time.monotonic() >= until or bounces >= AVOID_BOUNCES:
            del self._avoid[job_id]
            return False
        self._avoid[job_id] = (until, bounces + 1)
        return True

    def _is_held(self, job_id: str, fence: int) -> bool:
        """True if a hold mark covers this copy's generation."""
        held = self._held.get(job_id)
        return held is not None and split_fence(fence)[0] <= held

    def _note_cancellation(self, entry: str) -> str | None:
        """Record a cancellation-set entry: a cancelled job id, or a hold mark.
        Returns the job id a hold mark names (``None`` for a cancellation)."""
        drop = parse_drop(entry)
        if drop is not None:
            job_id, generation = drop
            if generation > self._dropped.get(job_id, -1):
                self._dropped[job_id] = generation
            return None  # nothing to stop: the copy that runs took the new argument
        hold = parse_hold(entry)
        if hold is None:
            self._cancelled.add(entry)
            return None
        job_id, generation = hold
        if generation > self._held.get(job_id, -1):
            self._held[job_id] = generation
        return job_id

    async def _stop_job(self, run: Run, job_task: asyncio.Task[None]) -> bool:
        """Stop the job function; True if it had to be cancelled hard."""
        run.token.request_stop((run.stop_reason or p.StopReason.WATCHDOG).value)
        grace_until = time.monotonic() + self.options.stop_grace
        # A loss during the grace (stop_hard) ends it at once: the broker may
        # already hand the message to another server.
        while not run.stop_hard and not job_task.done():
            wait = grace_until - time.monotonic()
            if wait <= 0:
                break
            await run.sleep(wait)
        if job_task.done():
            if not job_task.cancelled():
                job_task.exception()  # retrieved: a job may raise while stopping
            return False
        job_task.cancel()
        await asyncio.wait({job_task}, timeout=1.0)
        if not run.stop_hard:
            log.warning(
                "job ignored its stop token for %.1f s and was cancelled hard job_id=%s fence=%d",
                self.options.stop_grace,
                run.arg.job_id,
                run.arg.fence,
            )
        return True

    async def _finish(self, run: Run, *, forced: bool, error: str | None) -> None:
        reason = run.stop_reason or p.StopReason.LOST
        if reason is not p.StopReason.LOST and not run.delivery.lost.is_set():
            release = reason in (p.StopReason.RELEASED, p.StopReason.WATCHDOG)
            if not await self._settle(run.delivery, release=release):
                reason = p.StopReason.LOST
        self._emit(
            p.JobStopped(
                server_id=self.id,
                job_id=run.arg.job_id,
                fence=run.arg.fence,
                reason=reason,
                at=time.time(),
                forced=forced,
                error=error if reason is not p.StopReason.COMPLETED else None,
            ),
            run.arg.name,
        )
        log.info(
            "job stopped job_id=%s fence=%d reason=%s forced=%s",
            run.arg.job_id,
            run.arg.fence,
            reason.value,
            forced,
        )

    def _total_capacity(self) -> int:
        """Jobs this server may hold now: threads that ignored their stop token
        still occupy a worker, and a rebalancing hold caps it for a while."""
        capacity = self.max_workers - sum(r.abandoned() for r in self._runners.values())
        if self._hold is not None:
            capacity = min(capacity, self._hold)
        return max(0, capacity)

    def _count(self, run: Run | None, step: int) -> None:
        """Keep the counts of runs per pool and per kind (O(1) capacity sums for a
        server holding thousands of jobs)."""
        if run is not None:
            self._pool_runs[run.pool] += step
            self._kind_runs[run.arg.kind] += step

    def _pool_capacity(self, pool: Pool) -> int:
        """The prefetch of one pool's consumer: the room the server has in all and
        for the pool's kind, less what the *other* pools' jobs take. With one pool
        this is the total capacity, as before pools; with several, each may take
        the whole room left, and a delivery beyond it is handed back at once
        (:meth:`_has_room`). Never based on this pool's own held count: a job of
        it handed back (rebalance) must not leave a slot for its own message."""
        mine = self._pool_runs[pool]
        capacity = self._total_capacity() - (len(self._runs) - mine)
        limit = self.kind_limits.get(pool.kind)
        if limit is not None:
            capacity = min(capacity, limit - (self._kind_runs[pool.kind] - mine))
        hold = self._pool_holds.get(pool)
        if hold is not None:
            capacity = min(capacity, hold)
        return max(0, capacity)

    def _has_room(self, pool: Pool) -> bool:
        """Whether one more job of ``pool`` fits (in all and for its kind)."""
        if len(self._runs) >= self._total_capacity():
            return False
        limit = self.kind_limits.get(pool.kind)
        return limit is None or self._kind_runs[pool.kind] < limit

    def _update_capacity(self) -> None:
        """Keep every pool's prefetch at what this server can really run."""
        if self._draining:
            return
        for pool, consumer in self._consumers.items():
            if consumer is _OPENING:
                continue
            capacity = self._pool_capacity(pool)
            if capacity != self._capacities.get(pool):
                self._capacities[pool] = capacity
                spawn(
                    consumer.set_capacity(capacity),
                    name="orchestratr-capacity",
                    logger=log,
                    keep=self._background,
                )

    # -- commands ---------------------------------------------------------------------

    async def _on_command(self, command: p.Command) -> None:
        if isinstance(command, p.CancelJob):
            held = self._note_cancellation(command.job_id)
            if held is not None:
                run = self._runs.get(held)
                if run is not None and self._is_held(held, run.arg.fence):
                    log.info("hold job_id=%s fence=%d", held, run.arg.fence)
                    run.request_stop(p.StopReason.HELD)
                return
            run = self._runs.get(command.job_id)
            if run is not None:
                log.info("cancel job_id=%s fence=%d", command.job_id, run.arg.fence)
                run.request_stop(p.StopReason.CANCELLED)
        elif isinstance(command, p.JobCheckpoint):
            run = self._runs.get(command.job_id)
            if run is not None and run.arg.fence == command.fence and run.handover is not None:
                if not run.handover.done():
                    run.handover.set_result(command.checkpoint)
                run.alert()
        elif isinstance(command, p.StopJob):
            run = self._runs.get(command.job_id)
            if run is None:
                return
            if command.max_fence is not None and run.arg.fence > command.max_fence:
                return
            reason = command.reason
            if reason is p.StopReason.CANCELLED:
                self._cancelled.add(command.job_id)
            if command.drop and reason is p.StopReason.RELEASED:
                reason = p.StopReason.SUPERSEDED
            log.info("stop job_id=%s fence=%d reason=%s", command.job_id, run.arg.fence, reason)
            run.request_stop(reason)
        elif isinstance(command, p.UpdateJob):
            self._update_in_place(command)
        elif isinstance(command, p.DrainServer):
            log.info("drain requested")
            if self._shutdown_requested is not None:
                self._shutdown_requested.set()
            else:
                spawn(self.stop(), name="orchestratr-drain", logger=log, keep=self._background)
        elif isinstance(command, p.ReleaseJobs):
            pool = Pool.from_key(command.pool) if command.pool is not None else None
            if pool is not None and pool not in self._consumers:
                return  # a pool this server does not run: nothing of it to release
            if pool is None:
                self._hold = command.hold
                self._hold_until = time.monotonic() + max(0.0, command.hold_for)
            elif command.hold is not None:
                self._pool_holds[pool] = command.hold
            self._update_capacity()
            asyncio.get_running_loop().call_later(max(0.0, command.hold_for), self._end_hold, pool)
            # Release the jobs that have been here longest: a job that just
            # arrived (perhaps moved by the previous round) never moves twice.
            runs = sorted(
                (
                    r
                    for r in self._runs.values()
                    if r.stop_reason is None and (pool is None or r.pool == pool)
                ),
                key=lambda r: r.started_at,
            )
            count = max(0, command.count)
            if count:
                log.info("rebalance: releasing %d job(s), holding %s", count, command.hold)
            for run in runs[:count]:
                run.request_stop(p.StopReason.RELEASED)
        elif isinstance(command, p.HeartbeatAck) and self._beats.acknowledged(command):
            self._outbox.publish_heartbeat()  # a complete listing, now

    def _update_in_place(self, command: p.UpdateJob) -> None:
        """Give a running copy of an updatable function its new argument, and
        report it (again, for a version it already holds: the first report may
        have been lost). A copy of another fence, one being stopped, or one whose
        function did not opt in is left alone: the manager restarts it instead."""
        run = self._runs.get(command.job_id)
        if (
            run is None
            or run.feed is None
            or run.arg.fence != command.fence
            or run.stop_reason is not None
        ):
            log.info(
                "update not applied in place job_id=%s fence=%d version=%d",
                command.job_id,
                command.fence,
                command.argument_version,
            )
            return
        if run.feed.apply(command.argument_version, command.argument):
            log.info(
                "updated in place job_id=%s fence=%d version=%d",
                command.job_id,
                command.fence,
                command.argument_version,
            )
        if run.feed.version >= command.argument_version:
            self._outbox.publish(
                p.JobUpdated(
                    server_id=self.id,
                    job_id=command.job_id,
                    fence=command.fence,
                    argument_version=run.feed.version,
                    at=time.time(),
                )
            )

    # -- events -------------------------------------------------------------------------

    def _emit(self, event: p.JobStarted | p.JobFailed | p.JobStopped, name: str) -> None:
        """Publish a job's event and tell the observers the same (``name`` is the
        job's name, which the event does not carry)."""
        self._outbox.publish(event)
        job = {
            "server_id": event.server_id,
            "job_id": event.job_id,
            "name": name,
            "fence": event.fence,
        }
        if isinstance(event, p.JobStarted):
            self._plugins.notify("job_started", **job, restarts=event.restarts)
        elif isinstance(event, p.JobFailed):
            self._plugins.notify(
                "job_failed",
                **job,
                error=event.error,
                restarts=event.restarts,
                retry_in=event.retry_in,
            )
        else:
            self._plugins.notify(
                "job_stopped", **job, reason=event.reason.value, forced=event.forced
            )

    def _heartbeat_event(self, listing: Collection[str] = ()) -> p.ServerHeartbeat:
        """The next heartbeat: everything running, or what changed since the one
        sent before or the one the manager acknowledged, with the jobs of
        ``listing`` in any case
        (:class:`~orchestratr_core.server.beats.HeartbeatSeries`)."""
        beats = self._beats
        seq, base, jobs, gone, digest, running = beats.next(
            (
                (run.reported(), run.heartbeat_timeout is not None)
                for run in self._runs.values()
                if run.stop_reason is None
            ),
            listing,
        )
        return p.ServerHeartbeat(
            server_id=self.id,
            name=self.name,
            max_workers=self.max_workers,
            started_at=self._started_at,
            sent_at=time.time(),
            host=_HOST,
            pid=os.getpid(),
            draining=self._draining,
            jobs=jobs,
            kinds=tuple(sorted(self.kinds)),
            labels=format_labels(self.labels),
            updatable=tuple(sorted(self._updatable)),
            drops=True,
            seq=seq,
            base=base,
            gone=gone,
            chained=beats.chained,
            digest=digest,
            running=running,
        )

    def _end_hold(self, pool: Pool | None = None) -> None:
        """A rebalancing cap is temporary: lift it once its time is up."""
        if pool is not None:
            if self._pool_holds.pop(pool, None) is not None:
                self._update_capacity()
            return
        if self._hold is not None and time.monotonic() >= self._hold_until - 0.001:
            self._hold = None
            self._update_capacity()

    async def _heartbeats(self) -> None:
        """Heartbeat for as long as the server lives: a failure is logged and the
        loop starts again (:func:`keep_running`), never ending the heartbeats."""
        await keep_running(self._heartbeat_loop, name="the heartbeat loop", logger=log)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat_interval)
            self._outbox.publish_heartbeat()
            if self.options.freeze_gc:
                self._gc.tend(len(self._runs))


_HOST = socket.gethostname()


class _Opening(JobConsumer):
    """Stands in the consumer table while a pool's consumer is being opened."""

    async def set_capacity(self, capacity: int) -> None:
        """Nothing to change yet: the consumer opens with the capacity of its time."""

    async def close(self) -> None:
        """Nothing opened yet."""


_OPENING = _Opening()


def _job_functions(job: JobFunction | Mapping[str, JobFunction]) -> dict[str, JobFunction]:
    """The server's job functions by kind, checked."""
    if isinstance(job, Mapping):
        if not job:
            raise ConfigurationError("give at least one job function (kind -> function)")
        jobs = {validate_kind(k, error=ConfigurationError): f for k, f in job.items()}
    elif not callable(job):
        raise ConfigurationError("job must be callable: async def job(arg, token, heartbeat)")
    else:
        jobs = {DEFAULT_KIND: job}
    for kind, function in jobs.items():
        if not callable(function):
            raise ConfigurationError(
                f"the job function of kind {kind!r} must be callable: "
                "async def job(arg, token, heartbeat)"
            )
    return jobs


def _kind_limits(
    limits: Mapping[str, int] | None, kinds: frozenset[str], max_workers: int
) -> dict[str, int]:
    """Per-kind limits, checked: kinds this server runs, 1..``max_workers``."""
    result: dict[str, int] = {}
    for kind, limit in (limits or {}).items():
        if kind not in kinds:
            raise ConfigurationError(
                f"max_workers_per_kind names kind {kind!r}, which this server does not run "
                f"(it runs {', '.join(sorted(kinds))})"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(f"the limit of kind {kind!r} must be a whole number >= 1")
        result[kind] = min(limit, max_workers)
    return result


def _lease_of(delivery: Delivery) -> Callable[[], float]:
    return lambda: delivery.valid_until


def _describe(exc: BaseException) -> str:
    """A one-line-ish description of a job's exception, with its last frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    text = f"{type(exc).__name__}: {exc}{where}"
    return text[:MAX_ERROR_LENGTH]  # longer is malformed on the wire
