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
  its fencing token, so that the manager can reconcile after anything; when many
  jobs start at once, one heartbeat replaces their start reports.

A running job costs two asyncio tasks (its supervisor and the job function) and
a few small objects, so that one process can hold tens of thousands of idle jobs:
the supervisor sleeps on one plain future (``_Run.wake``) that a stop request,
the end of the job function, the watchdog's timer and the loss of the delivery
resolve.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import math
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from orchestratr_core import protocol as p
from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    DeliveryLost,
    OrchestratrError,
)
from orchestratr_core.job import (
    MAX_COUNT,
    MAX_ERROR_LENGTH,
    MAX_SERVER_TEXT_LENGTH,
    JobArgument,
    make_fence,
    new_id,
)
from orchestratr_core.plugin.manager import PluginManager, get_plugin_manager
from orchestratr_core.retry import backoff_delay
from orchestratr_core.runner import JobRunner, StopToken, ThreadJobRunner
from orchestratr_core.transport import Delivery, JobConsumer, Subscription, Transport

__all__ = ["JobFunction", "OrchestratedServer", "ServerOptions", "backoff_delay"]

log = logging.getLogger("orchestratr.server")

JobFunction = Callable[[JobArgument, StopToken, Callable[[], None]], Any]
"""``async def job(arg, token, heartbeat)`` — or a plain blocking function."""


@dataclass(frozen=True)
class ServerOptions:
    """Timings of a server. The defaults suit most fleets."""

    heartbeat_interval: float = 2.0
    """Seconds between heartbeats to the manager (one message for all jobs)."""
    stop_grace: float = 10.0
    """Seconds a job has to honour its stop token before it is cancelled hard."""
    restart_initial: float = 1.0
    """Backoff before the first restart of a job function that raised."""
    restart_max: float = 60.0
    """Longest backoff between restarts."""
    restart_reset_after: float = 60.0
    """A job that ran this long before raising starts its backoff afresh."""
    connect_retry_max: float = 30.0
    """Longest wait between attempts to reach the broker at start."""
    freeze_gc: bool = True
    """Keep the objects of long-running jobs out of the garbage collector's full
    passes once a server holds thousands of them (:class:`_GcFreezer`)."""

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval", "restart_initial", "restart_max"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be > 0")
        if self.stop_grace < 0:
            raise ConfigurationError("stop_grace must be >= 0")


class _GcFreezer:
    """CPython's full garbage collections stop the process for a time that grows
    with every object alive: 0.7 s at 25,000 running jobs on one idle core, several
    seconds on a loaded one -- longer than the fence timeout, so a healthy server
    gave all its jobs up. Jobs live for hours, so once the server holds many more of
    them than at the last freeze, their objects are moved to the permanent
    generation (:func:`gc.freeze`), which collections skip; they are still freed
    by reference counting when their job ends. Cycles among frozen objects wait
    for the next thaw: after many jobs have ended, one full collection runs
    (:func:`gc.unfreeze`, :func:`gc.collect`) and the survivors are frozen again.
    Below ``least`` jobs nothing is done: the pauses are short anyway.
    """

    __slots__ = ("ended", "frozen", "least")

    def __init__(self, least: int = 1000) -> None:
        self.least = least
        self.frozen = 0  # running jobs at the last freeze
        self.ended = 0  # jobs ended since

    def tend(self, running: int) -> None:
        """Called every heartbeat with the number of running jobs."""
        if not gc.isenabled():
            return  # the application manages the collector itself
        step = max(self.least, self.frozen // 4)
        if self.frozen and self.ended >= step:
            gc.unfreeze()
            gc.collect()
            self.frozen = self.ended = 0
            step = self.least
        if running - self.frozen >= step:
            gc.freeze()
            self.frozen, self.ended = running, 0


_COALESCE_STARTS = 8
"""With this many start reports queued, the event pump sends one heartbeat instead."""
_COALESCE_GAP = 1.0
"""Longest wait between two such heartbeats (at most half the heartbeat interval)."""
_COALESCE_JOBS_PER_SECOND = 25_000
"""The wait between two such heartbeats grows with the jobs they list (1 s at 25,000
jobs, 40 ms at 1,000): a heartbeat costs the server and the manager work in
proportion to every job in it, and a server taking 25,000 jobs that sent one per
handful of starts kept its loop too busy to answer the fence pings in time."""


@dataclass(eq=False, slots=True)
class _Run:
    """One running job: its delivery, token and supervising task.

    The supervisor waits on ``wake`` (:meth:`alarm`, or :meth:`sleep` with a
    time limit), a plain future that :meth:`alert` resolves; a stop request, the
    end of the job function, the watchdog's timer and the loss of the delivery
    (:meth:`on_loss`) all alert. The supervisor then looks at the state to see
    what happened.
    """

    delivery: Delivery
    arg: JobArgument
    token: StopToken
    heartbeat_timeout: float | None
    started_at: float = field(default_factory=time.time)
    last_heartbeat: float | None = None
    restarts: int = 0
    task: asyncio.Task[None] | None = None
    stop_reason: p.StopReason | None = None
    stop_hard: bool = False
    wake: asyncio.Future[None] | None = None
    loss_watch: asyncio.Future[Any] | None = None
    report: p.RunningJob | None = None
    """What the last heartbeat said about this job (reused while it holds)."""

    def request_stop(self, reason: p.StopReason, *, hard: bool = False) -> None:
        if self.stop_reason is None or (reason is p.StopReason.LOST and not self.stop_hard):
            # Loss overrides any cooperative reason: the message is no longer ours.
            self.stop_reason = reason
        self.stop_hard = self.stop_hard or hard
        self.token.request_stop(self.stop_reason.value)
        self.alert()

    def beat(self) -> None:
        self.last_heartbeat = time.time()

    def reported(self) -> p.RunningJob:
        """This job in a heartbeat. Reused while unchanged: building tens of
        thousands of objects every heartbeat costs CPU, and full collections of
        the garbage collector as they pile up."""
        report = self.report
        if (
            report is None
            or report.last_heartbeat != self.last_heartbeat
            or report.restarts != self.restarts
        ):
            report = self.report = p.RunningJob(
                self.arg.job_id, self.arg.fence, self.last_heartbeat, self.restarts
            )
        return report

    def alert(self, *_: object) -> None:
        """Wake the supervisor if it sleeps (also a done callback of the job task)."""
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def alarm(self) -> asyncio.Future[None]:
        """A new ``wake`` future: awaiting it sleeps until alerted (no coroutine of
        its own, for the long idle wait of every job)."""
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.wake = wake
        return wake

    async def sleep(self, seconds: float) -> None:
        """Sleep until alerted or for ``seconds``; the caller looks why."""
        wake = self.alarm()
        timer = asyncio.get_running_loop().call_later(seconds, self.alert)
        try:
            await wake
        finally:
            timer.cancel()

    def watch_loss(self) -> None:
        """Stop the job at once, hard, when its delivery is lost (:meth:`on_loss`).

        ``Delivery.lost`` is an :class:`asyncio.Event`, which has no callbacks.
        Waiting on it costs a task per job; instead a future is added to the
        event's waiters, which is all that ``Event.wait()`` itself does (and what
        ``Event.set()`` resolves) -- without the coroutine and its task. If the
        event is not built that way (another implementation of asyncio), a task
        waits on it as before.
        """
        lost = self.delivery.lost
        if lost.is_set():
            self.on_loss()
            return
        waiters = getattr(lost, "_waiters", None)
        watch: asyncio.Future[Any]
        if type(waiters) is collections.deque:
            watch = asyncio.get_running_loop().create_future()
            waiters.append(watch)
        else:
            watch = asyncio.ensure_future(lost.wait())
        watch.add_done_callback(self.on_loss)
        self.loss_watch = watch

    def unwatch_loss(self) -> None:
        watch, self.loss_watch = self.loss_watch, None
        if watch is None:
            return
        watch.remove_done_callback(self.on_loss)
        watch.cancel()
        waiters = getattr(self.delivery.lost, "_waiters", None)
        if type(waiters) is collections.deque:
            with contextlib.suppress(ValueError):
                waiters.remove(watch)

    def on_loss(self, watch: asyncio.Future[Any] | None = None) -> None:
        """The delivery is no longer ours: the broker may give it to another
        server. Stop at once, hard, without grace (self-fencing)."""
        if watch is not None and watch.cancelled():
            return
        if self.stop_reason is not p.StopReason.LOST:
            log.warning(
                "delivery lost: stopping job at once job_id=%s fence=%d",
                self.arg.job_id,
                self.arg.fence,
            )
        self.request_stop(p.StopReason.LOST, hard=True)


class OrchestratedServer:
    """Runs jobs delivered by the transport. See the module docstring.

    :param job: ``async def job(arg, token, heartbeat)`` or a blocking function of
        the same parameters (run in a thread pool of ``max_workers`` threads).
    :param transport: a :class:`Transport`, or a plugin name / URL
        (``"memory"``, ``"amqp://guest:guest@localhost/"``).
    :param name: a label for people; need not be unique.
    :param max_workers: how many jobs this server runs at once (>= 1).
    """

    def __init__(
        self,
        job: JobFunction,
        *,
        transport: Transport | str,
        name: str = "server",
        max_workers: int = 10,
        options: ServerOptions | None = None,
        plugins: PluginManager | None = None,
    ) -> None:
        if not callable(job):
            raise ConfigurationError("job must be callable: async def job(arg, token, heartbeat)")
        if (
            isinstance(max_workers, bool)
            or not isinstance(max_workers, int)
            or not 1 <= max_workers <= MAX_COUNT
        ):
            raise ConfigurationError(
                f"max_workers must be a whole number within 1..{MAX_COUNT}, not {max_workers!r} "
                "(there is no 'unlimited': size it to what the host can run)"
            )
        _check_server_name(name)
        self.id = new_id()
        self.name = name
        self.max_workers = max_workers
        self.options = options or ServerOptions()
        self._plugins = plugins or get_plugin_manager()
        self._transport = (
            self._plugins.make_transport(transport) if isinstance(transport, str) else transport
        )
        self._job = job
        self._runner: JobRunner = self._plugins.make_runner(job)
        if isinstance(self._runner, ThreadJobRunner):
            self._runner.resize(max_workers)
        self._runs: dict[str, _Run] = {}
        self._cancelled: set[str] = set()
        self._consumer: JobConsumer | None = None
        self._commands: Subscription | None = None
        self._events: asyncio.Queue[p.Event] = asyncio.Queue()
        self._queued_starts = 0  # start reports queued since the last coalescing
        self._settled_events = 0  # events at the head that coalescing has looked at
        self._last_heartbeat_sent = -math.inf  # monotonic
        self._gc = _GcFreezer()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._started_at = time.time()
        self._started = False
        self._stopped = asyncio.Event()
        self._draining = False
        self._dead = False
        self._shutdown_requested: asyncio.Event | None = None
        self._capacity = max_workers
        self._hold: int | None = None
        self._hold_until = 0.0

    # -- public API -----------------------------------------------------------------

    def running(self) -> dict[str, JobArgument]:
        """Jobs running now (not being stopped): job id -> argument."""
        return {jid: run.arg for jid, run in self._runs.items() if run.stop_reason is None}

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
        self._cancelled.update(cancelled)
        self._tasks.append(asyncio.create_task(self._event_pump(), name="orchestratr-events"))
        self._publish(self._heartbeat_event())
        self._consumer = await self._transport.consume_jobs(self.max_workers, self._on_delivery)
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="orchestratr-hb"))
        self._plugins.notify(
            "server_joined", server_id=self.id, name=self.name, max_workers=self.max_workers
        )
        log.info(
            "server started id=%s name=%s max_workers=%d", self.id, self.name, self.max_workers
        )

    async def stop(self, *, handover: bool = True) -> None:
        """Stop gracefully: take no more jobs, stop every job cooperatively (hard
        after ``stop_grace``), hand their messages back to the queue so other
        servers take them at once, say goodbye, close the transport."""
        if self._stopped.is_set():
            return
        self._draining = True
        if self._consumer is not None:
            try:
                await self._consumer.close()
            except Exception as exc:  # a broken transport must not stop the hand-over
                log.warning("could not cancel the job consumer: %s", exc)
        reason = p.StopReason.RELEASED if handover else p.StopReason.LOST
        runs = list(self._runs.values())
        for run in runs:
            run.request_stop(reason)
        await self._wait_runs(runs)
        if self._consumer is not None:  # it got as far as taking jobs: say goodbye
            self._publish(p.ServerLeft(server_id=self.id, at=time.time()))
            await self._flush_events(5.0)
        await self._shutdown()
        self._plugins.notify("server_left", server_id=self.id, name=self.name, reason="stopped")
        log.info("server stopped id=%s", self.id)

    async def kill(self) -> None:
        """Die abruptly, as ``kill -9`` would: no hand-over, no goodbye. The broker
        gives the held messages to other servers. For tests and the demo."""
        if self._stopped.is_set():
            return
        self._draining = True
        self._dead = True
        crash = getattr(self._transport, "crash", None)
        for run in self._runs.values():
            run.request_stop(p.StopReason.LOST, hard=True)
        if callable(crash):
            result = crash()
            if asyncio.iscoroutine(result):
                await result
        await self._wait_runs(list(self._runs.values()))
        await self._shutdown()

    async def run_forever(self, *, install_signal_handlers: bool = True) -> None:
        """Start, run until SIGTERM/SIGINT (or a drain command), then stop gracefully."""
        self._shutdown_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._shutdown_requested.set)
        try:
            # A signal must work while start() still waits for the broker too.
            starting = asyncio.create_task(self.start())
            requested = asyncio.create_task(self._shutdown_requested.wait())
            await asyncio.wait({starting, requested}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
            else:
                starting.result()
                stopped = asyncio.create_task(self._stopped.wait())
                await asyncio.wait({stopped, requested}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
            requested.cancel()
        finally:
            if install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            await self.stop()

    # -- start-up and shutdown ----------------------------------------------------------

    async def _connect(self) -> None:
        attempt = 0
        while True:
            try:
                await self._transport.connect()
                return
            except BackendUnavailable as exc:
                attempt += 1
                delay = backoff_delay(attempt, 0.5, self.options.connect_retry_max)
                log.warning("broker unreachable (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)

    async def _shutdown(self) -> None:
        self._stopped.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._commands is not None:
            with contextlib.suppress(OrchestratrError, OSError):
                await self._commands.close()
        with contextlib.suppress(OrchestratrError, OSError):
            await self._transport.close()
        await self._runner.close()

    async def _wait_runs(self, runs: list[_Run]) -> None:
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
        if message.job_id in self._cancelled:
            log.info("dropping cancelled job job_id=%s fence=%d", message.job_id, fence)
            if await self._settle(delivery, release=False):
                self._publish(
                    p.JobDiscarded(
                        server_id=self.id, job_id=message.job_id, fence=fence, at=time.time()
                    )
                )
            return
        previous = self._runs.get(message.job_id)
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
            job_id=message.job_id, name=message.name, argument=message.argument, fence=fence
        )
        run = _Run(
            delivery=delivery,
            arg=arg,
            token=StopToken(lease=_lease_of(delivery)),
            heartbeat_timeout=message.heartbeat_timeout,
        )
        self._runs[message.job_id] = run
        run.task = asyncio.create_task(
            self._supervise(run, previous), name=f"orchestratr-job-{message.job_id}"
        )

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

    async def _supervise(self, run: _Run, previous: _Run | None) -> None:
        """Run one job until it is stopped, restarting it after failures."""
        arg = run.arg
        run.watch_loss()
        forced = False
        error: str | None = None
        try:
            if previous is not None and previous.task is not None:
                # Never two copies in one process: wait for the older copy to end.
                await asyncio.wait({previous.task})
            attempt = 0
            while run.stop_reason is None:
                began = time.time()
                run.last_heartbeat = None
                self._publish(
                    p.JobStarted(
                        server_id=self.id,
                        job_id=arg.job_id,
                        fence=arg.fence,
                        at=began,
                        restarts=run.restarts,
                    )
                )
                self._plugins.notify(
                    "job_started",
                    server_id=self.id,
                    job_id=arg.job_id,
                    name=arg.name,
                    fence=arg.fence,
                    restarts=run.restarts,
                )
                job_task: asyncio.Task[None] = asyncio.create_task(
                    self._runner.run(self._job, arg, run.token, run.beat)
                )
                job_task.add_done_callback(run.alert)
                outcome = await self._wait_job(run, job_task, began)
                if outcome == "stop":
                    forced = await self._stop_job(run, job_task)
                    break
                if outcome == "watchdog":
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
                self._publish(
                    p.JobFailed(
                        server_id=self.id,
                        job_id=arg.job_id,
                        fence=arg.fence,
                        error=error,
                        restarts=run.restarts,
                        retry_in=delay,
                        at=time.time(),
                    )
                )
                self._plugins.notify(
                    "job_failed",
                    server_id=self.id,
                    job_id=arg.job_id,
                    name=arg.name,
                    fence=arg.fence,
                    error=error,
                    restarts=run.restarts,
                    retry_in=delay,
                )
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
            self._gc.ended += 1
            await self._finish(run, forced=forced, error=error)
            self._update_capacity()

    async def _wait_job(self, run: _Run, job_task: asyncio.Task[None], began: float) -> str:
        """Wait for the job to end or be told to stop: 'done', 'stop' or 'watchdog'
        (the job did not call ``heartbeat()`` within its heartbeat timeout)."""
        while True:
            if run.stop_reason is not None:
                return "stop"
            if job_task.done():
                return "done"
            if run.heartbeat_timeout is None:
                await run.alarm()  # the idle wait of nearly every job
                continue
            last = max(run.last_heartbeat or 0.0, began)
            timeout = last + run.heartbeat_timeout - time.time()
            if timeout <= 0:
                return "watchdog"
            await run.sleep(timeout)

    async def _stop_job(self, run: _Run, job_task: asyncio.Task[None]) -> bool:
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

    async def _finish(self, run: _Run, *, forced: bool, error: str | None) -> None:
        reason = run.stop_reason or p.StopReason.LOST
        if reason is not p.StopReason.LOST and not run.delivery.lost.is_set():
            release = reason in (p.StopReason.RELEASED, p.StopReason.WATCHDOG)
            if not await self._settle(run.delivery, release=release):
                reason = p.StopReason.LOST
        self._publish(
            p.JobStopped(
                server_id=self.id,
                job_id=run.arg.job_id,
                fence=run.arg.fence,
                reason=reason,
                at=time.time(),
                forced=forced,
                error=error if reason is not p.StopReason.COMPLETED else None,
            )
        )
        self._plugins.notify(
            "job_stopped",
            server_id=self.id,
            job_id=run.arg.job_id,
            name=run.arg.name,
            fence=run.arg.fence,
            reason=reason.value,
            forced=forced,
        )
        log.info(
            "job stopped job_id=%s fence=%d reason=%s forced=%s",
            run.arg.job_id,
            run.arg.fence,
            reason.value,
            forced,
        )

    def _update_capacity(self) -> None:
        """Keep the prefetch at what this server can really run: threads that
        ignored their stop token still occupy a worker."""
        capacity = self.max_workers - self._runner.abandoned()
        if self._hold is not None:
            capacity = min(capacity, self._hold)
        capacity = max(0, capacity)
        if capacity != self._capacity and self._consumer is not None and not self._draining:
            self._capacity = capacity
            task = asyncio.create_task(self._consumer.set_capacity(capacity))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- commands ---------------------------------------------------------------------

    async def _on_command(self, command: p.Command) -> None:
        if isinstance(command, p.CancelJob):
            self._cancelled.add(command.job_id)
            run = self._runs.get(command.job_id)
            if run is not None:
                log.info("cancel job_id=%s fence=%d", command.job_id, run.arg.fence)
                run.request_stop(p.StopReason.CANCELLED)
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
        elif isinstance(command, p.DrainServer):
            log.info("drain requested")
            if self._shutdown_requested is not None:
                self._shutdown_requested.set()
            else:
                task = asyncio.create_task(self.stop())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        elif isinstance(command, p.ReleaseJobs):
            self._hold = command.hold
            self._hold_until = time.monotonic() + max(0.0, command.hold_for)
            self._update_capacity()
            asyncio.get_running_loop().call_later(max(0.0, command.hold_for), self._end_hold)
            # Release the jobs that have been here longest: a job that just
            # arrived (perhaps moved by the previous round) never moves twice.
            runs = sorted(
                (r for r in self._runs.values() if r.stop_reason is None),
                key=lambda r: r.started_at,
            )
            count = max(0, command.count)
            if count:
                log.info("rebalance: releasing %d job(s), holding %s", count, command.hold)
            for run in runs[:count]:
                run.request_stop(p.StopReason.RELEASED)

    # -- events -------------------------------------------------------------------------

    def _publish(self, event: p.Event) -> None:
        if not self._dead:  # a killed server says nothing more
            if isinstance(event, p.JobStarted):
                self._queued_starts += 1
            self._events.put_nowait(event)

    async def _event_pump(self) -> None:
        """Publish events in order, never letting one failing event hold back the
        heartbeats behind it for long.

        A heartbeat that cannot be sent is dropped when a newer one is queued. A
        start or failure report that still fails after a few quick attempts is
        dropped too: the next heartbeat carries the same state. A stop, discard or
        goodbye report is only in that message, so it goes to the back of the queue
        and is tried again until the broker takes it; the manager's guarded
        transitions accept it after a later heartbeat as well.

        When many start reports are queued (a burst of deliveries), one fresh
        heartbeat replaces them (:meth:`_coalesce_starts`).
        """
        while True:
            event = await self._events.get()
            try:
                if self._settled_events:
                    # Kept by the last coalescing: the start reports among them
                    # are of jobs that ended already; no heartbeat covers them.
                    self._settled_events -= 1
                elif isinstance(event, p.JobStarted):
                    self._queued_starts -= 1
                    if self._queued_starts + 1 >= _COALESCE_STARTS:
                        gap = min(
                            _COALESCE_GAP,
                            self.options.heartbeat_interval / 2,
                            len(self._runs) / _COALESCE_JOBS_PER_SECOND,
                        )
                        wait = self._last_heartbeat_sent + gap - time.monotonic()
                        if wait > 0:
                            await asyncio.sleep(wait)  # more starts gather meanwhile
                        event = self._coalesce_starts(event)
                if isinstance(event, p.ServerHeartbeat) and any(
                    isinstance(e, p.ServerHeartbeat) for e in _peek(self._events)
                ):
                    continue  # a newer heartbeat is queued
                for attempt in range(1, 4):
                    try:
                        await self._transport.publish_event(event)
                        if isinstance(event, p.ServerHeartbeat):
                            self._last_heartbeat_sent = time.monotonic()
                        break
                    except (OrchestratrError, OSError) as exc:
                        error = exc
                        await asyncio.sleep(backoff_delay(attempt, 0.1, 1.0))
                else:
                    if isinstance(event, p.JobStopped | p.JobDiscarded | p.ServerLeft):
                        log.warning("cannot publish %s yet (%s); will retry", event.TYPE, error)
                        self._events.put_nowait(event)
                    else:
                        log.warning("dropping %s event (%s)", event.TYPE, error)
            finally:
                self._events.task_done()

    def _coalesce_starts(self, first: p.JobStarted) -> p.Event:
        """Replace the queued start reports by one heartbeat built now.

        A server taking many jobs at once (start-up, failover) would otherwise
        send a confirmed message per job, and the manager would apply each in
        its own transactions. The heartbeat lists every job running now with its
        fence; the manager applies ``START`` (guard newer) to all of them in one
        transaction with a bounded number of statements, as for any heartbeat,
        and tells the server to stop the copies it refuses.

        Dropped are only the start reports that the heartbeat covers (same job,
        same fence) and the older heartbeats queued (they would undo it). Every
        other event keeps its place and order: a job that started and has stopped
        already is not in the heartbeat, so its start report stays, ahead of its
        stop report, and the manager sees both. ``first`` (just taken from the
        queue) is put back at the head if it is not covered. Returns the event to
        publish now: the heartbeat, its ``started`` the ids of the start reports
        it replaces, for which the manager does what it does on a ``JobStarted``
        (it stops a job its storage does not know, and tells the previous owner
        of a job that moved to stop its copy).
        """
        heartbeat = self._heartbeat_event()
        covered = {(job.job_id, job.fence) for job in heartbeat.jobs}
        kept: list[p.Event] = []
        dropped: list[str] = []  # ids of the start reports the heartbeat replaces
        if (first.job_id, first.fence) in covered:
            dropped.append(first.job_id)
        else:
            kept.append(first)
        while True:
            try:
                event = self._events.get_nowait()
            except asyncio.QueueEmpty:
                break
            self._events.task_done()
            if isinstance(event, p.ServerHeartbeat):
                continue
            if isinstance(event, p.JobStarted) and (event.job_id, event.fence) in covered:
                dropped.append(event.job_id)
                continue
            kept.append(event)
        for event in kept:
            self._events.put_nowait(event)
        self._queued_starts = 0
        self._settled_events = len(kept)
        log.debug(
            "%d start report(s) replaced by one heartbeat of %d job(s)",
            len(dropped),
            len(heartbeat.jobs),
        )
        # A restarted job may have had two start reports: its id once.
        return replace(heartbeat, started=tuple(dict.fromkeys(dropped)))

    async def _flush_events(self, limit: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._events.join(), timeout=limit)

    def _heartbeat_event(self) -> p.ServerHeartbeat:
        jobs = tuple([run.reported() for run in self._runs.values() if run.stop_reason is None])
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
        )

    def _end_hold(self) -> None:
        """A rebalancing cap is temporary: lift it once its time is up."""
        if self._hold is not None and time.monotonic() >= self._hold_until - 0.001:
            self._hold = None
            self._update_capacity()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat_interval)
            self._publish(self._heartbeat_event())
            if self.options.freeze_gc:
                self._gc.tend(len(self._runs))


_HOST = socket.gethostname()


def _lease_of(delivery: Delivery) -> Callable[[], float]:
    return lambda: delivery.valid_until


def _check_server_name(name: object) -> None:
    """A server name every storage keeps: 1..255 characters, not blank, no
    control characters (heartbeats carry it to the manager's database)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError("server name must be a non-empty string")
    if len(name) > MAX_SERVER_TEXT_LENGTH:
        raise ConfigurationError(
            f"server name is {len(name)} characters long; the limit is {MAX_SERVER_TEXT_LENGTH}"
        )
    if not name.isprintable():
        raise ConfigurationError("server name must not hold control characters (NUL, newline...)")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError("server name is not valid Unicode (lone surrogate)") from None


def _describe(exc: BaseException) -> str:
    """A one-line-ish description of a job's exception, with its last frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    text = f"{type(exc).__name__}: {exc}{where}"
    return text[:MAX_ERROR_LENGTH]  # longer is malformed on the wire


def _peek(queue: asyncio.Queue[p.Event]) -> list[p.Event]:
    return list(getattr(queue, "_queue", ()))
