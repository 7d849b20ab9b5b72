"""One running job as its server sees it (:class:`Run`), what woke its supervisor
(:class:`Outcome`), and the garbage-collector tending of a server holding many
(:class:`GcFreezer`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from orchestratr_core import protocol as p
from orchestratr_core.job import JobArgument
from orchestratr_core.lifecycle import validate_checkpoint
from orchestratr_core.placement import DEFAULT_POOL, Pool
from orchestratr_core.runner import StopToken
from orchestratr_core.transport import Delivery

__all__ = ["GcFreezer", "Outcome", "Run", "UpdateFeed"]

log = logging.getLogger("orchestratr.server")


class Outcome(enum.Enum):
    """Why a supervisor's wait on its job ended."""

    DONE = "done"
    """The job function returned or raised."""
    STOP = "stop"
    """The job was told to stop (cancel, hand-over, loss, superseded...)."""
    WATCHDOG = "watchdog"
    """The job did not call ``heartbeat()`` within its heartbeat timeout."""


@dataclass(eq=False, slots=True)
class Run:
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
    checkpoint: str | None = None
    """The latest checkpoint this copy knows (its own, or the one it started with)."""
    unsent_checkpoint: bool = False
    """``checkpoint`` was recorded by the job and is not in a heartbeat yet."""
    handover: asyncio.Future[str | None] | None = None
    """Set while a copy from a redelivered message waits for the manager's
    :class:`~orchestratr_core.protocol.JobCheckpoint`."""
    pool: Pool = DEFAULT_POOL
    """The pool its delivery came from."""
    spread: str | None = None
    """Its spread group, if any."""
    feed: UpdateFeed | None = None
    """The heartbeat of an :func:`~orchestratr_core.lifecycle.updatable` job
    function, which brings it new arguments; ``None`` for any other function."""
    resume: Callable[[Run], None] | None = None
    """While the job runs without a supervising task (:meth:`park`): makes it."""
    parked: asyncio.Task[None] | None = None
    """While parked: the job function's task."""
    began: float = 0.0
    """When the parked job function started (``time.time()``)."""
    timer: asyncio.TimerHandle | None = None
    """While parked with a watchdog: the timer that checks the job's heartbeat."""

    def request_stop(self, reason: p.StopReason, *, hard: bool = False) -> None:
        if self.stop_reason is None or (reason is p.StopReason.LOST and not self.stop_hard):
            # Loss overrides any cooperative reason: the message is no longer ours.
            self.stop_reason = reason
        self.stop_hard = self.stop_hard or hard
        self.token.request_stop(self.stop_reason.value)
        if self.feed is not None:
            self.feed.wake()  # its updates() ends
        self.alert()

    def beat(self, checkpoint: str | None = None) -> None:
        """``heartbeat()`` of the job function; ``checkpoint`` records a checkpoint
        (at most 64 KiB: :class:`InvalidJobInput` above) that travels with the
        next server heartbeat."""
        if checkpoint is not None:
            self.checkpoint = validate_checkpoint(checkpoint)
            self.unsent_checkpoint = True
        self.last_heartbeat = time.time()

    def reported(self) -> p.RunningJob:
        """This job in a heartbeat. Reused while unchanged: building tens of
        thousands of objects every heartbeat costs CPU, and full collections of
        the garbage collector as they pile up."""
        report = self.report
        if self.unsent_checkpoint:
            self.unsent_checkpoint = False
            self.report = None  # the checkpoint goes once; the next report is built plain
            return p.RunningJob(
                self.arg.job_id, self.arg.fence, self.last_heartbeat, self.restarts, self.checkpoint
            )
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
        """Wake the supervisor if it sleeps (also a done callback of the job task),
        or make it if the job runs without one (:meth:`park`)."""
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        elif self.resume is not None:
            resume, self.resume = self.resume, None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            resume(self)

    def park(
        self, job_task: asyncio.Task[None], began: float, resume: Callable[[Run], None]
    ) -> None:
        """The job function runs (``job_task``, since ``began``) without a
        supervising task: the next :meth:`alert` calls ``resume(self)``, which
        makes one. Every reason the supervisor wakes for alerts -- a stop
        request, the loss of the delivery, the end of the job function -- and so
        does the watchdog, here a timer that re-arms itself while the job calls
        ``heartbeat()`` in time. The supervisor then looks at the state, as it
        does after any wake. Nothing is allocated per job but the timer."""
        self.parked, self.began, self.resume = job_task, began, resume
        if self.heartbeat_timeout is not None:
            self._arm_watchdog()

    def _arm_watchdog(self) -> None:
        timeout = self.heartbeat_timeout
        assert timeout is not None
        due = max(self.last_heartbeat or 0.0, self.began) + timeout - time.time()
        self.timer = asyncio.get_running_loop().call_later(max(0.0, due), self._watchdog_due)

    def _watchdog_due(self) -> None:
        self.timer = None
        if self.resume is None or self.heartbeat_timeout is None:
            return
        if max(self.last_heartbeat or 0.0, self.began) + self.heartbeat_timeout > time.time():
            self._arm_watchdog()  # it beat meanwhile
            return
        self.alert()

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

    async def wait_job(self, job_task: asyncio.Task[None], began: float) -> Outcome:
        """Wait for the job to end, be told to stop, or miss its heartbeat timeout."""
        while True:
            if self.stop_reason is not None:
                return Outcome.STOP
            if job_task.done():
                return Outcome.DONE
            if self.heartbeat_timeout is None:
                await self.alarm()  # the idle wait of nearly every job
                continue
            last = max(self.last_heartbeat or 0.0, began)
            timeout = last + self.heartbeat_timeout - time.time()
            if timeout <= 0:
                return Outcome.WATCHDOG
            await self.sleep(timeout)


class GcFreezer:
    """Keeps long-running jobs' objects out of the full garbage collections,
    whose pauses grow with every object alive and once outlasted the fence
    (docs/benchmarks.md, "What changed", item 2). Jobs live for hours, so once
    the server holds many more of them than at the last freeze, their objects are
    moved to the permanent generation (:func:`gc.freeze`), which collections skip;
    they are still freed by reference counting when their job ends. Cycles among frozen objects wait
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


class UpdateFeed:
    """The :class:`~orchestratr_core.runner.UpdatableHeartbeat` of one copy of an
    :func:`~orchestratr_core.lifecycle.updatable` job function: ``heartbeat()``,
    plus the arguments the server applies to the copy (:meth:`apply`) without
    restarting it. Lives on the server's event loop; :attr:`argument` may be read
    from a job thread."""

    __slots__ = ("_run", "_waiters", "called_with", "version")

    def __init__(self, run: Run) -> None:
        self._run = run
        self._waiters: list[asyncio.Future[None]] = []
        self.version = 0
        """The argument version the copy holds (0: its message's)."""
        self.called_with = 0
        """The version the job function was last called with: its
        :meth:`updates` yields what is newer."""

    def __call__(self, checkpoint: str | None = None) -> None:
        """``heartbeat()``, as for any job (see :meth:`Run.beat`)."""
        self._run.beat(checkpoint)

    @property
    def argument(self) -> JobArgument:
        """The latest argument of this copy."""
        return self._run.arg

    def apply(self, version: int, argument: str) -> bool:
        """Take argument ``version`` if it is newer than the one held; True if it was."""
        if version <= self.version:
            return False
        self._run.arg = dataclasses.replace(self._run.arg, argument=argument)
        self.version = version
        self.wake()
        return True

    def wake(self) -> None:
        """Wake every :meth:`updates` waiting (a new argument, or a stop)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def updates(self) -> AsyncIterator[JobArgument]:
        """Each argument newer than the one the function was called with (only
        the latest when several arrive at once), until the job is told to stop."""
        seen = self.called_with
        while not self._run.token.stop_requested:
            if self.version > seen:
                seen = self.version
                yield self._run.arg
                continue
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
