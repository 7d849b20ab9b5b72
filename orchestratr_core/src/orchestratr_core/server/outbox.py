"""A server's events on their way to the manager: one queue, one pump, and the
coalescing of a burst of start reports into one heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import replace

from orchestratr_core import protocol as p
from orchestratr_core._aio import keep_running
from orchestratr_core.errors import OrchestratrError
from orchestratr_core.retry import backoff_delay

__all__ = ["EventOutbox"]

log = logging.getLogger("orchestratr.server")

COALESCE_STARTS = 8
"""With this many start reports queued, the event pump sends one heartbeat instead."""
COALESCE_GAP = 1.0
"""Longest wait between two such heartbeats (at most half the heartbeat interval)."""
COALESCE_JOBS_PER_SECOND = 25_000
"""The wait between two such heartbeats grows with the jobs they list (1 s at 25,000
jobs, 40 ms at 1,000), so that the loop keeps time to answer the fence pings
(docs/benchmarks.md, "What changed", items 2 and 3)."""

COALESCE_QUIET = 0.02
"""A burst of starts is over when no start was reported for this long: the
coalescing heartbeat waits for that (at most :data:`COALESCE_SETTLE` seconds,
or the pace above if longer), because building it walks every running job and,
built in the middle of a failover, it delays the deliveries still to start."""
COALESCE_SETTLE = 0.25
"""Longest wait for a burst of starts to end (see :data:`COALESCE_QUIET`)."""

_PUBLISH_ATTEMPTS = 3
"""Quick tries of one event before it is dropped or sent to the back of the queue."""


class _HeartbeatDue:
    """Queued by :meth:`EventOutbox.publish_heartbeat`: the pump builds the
    heartbeat when its turn comes, so that each is built after the one before
    it was published (a chained heartbeat is relative to that one)."""

    TYPE = "heartbeat"


HEARTBEAT_DUE = _HeartbeatDue()


class EventOutbox:
    """The events of one server, published in order by :meth:`pump`.

    :param send: publishes one event (the transport's ``publish_event``).
    :param heartbeat: builds a heartbeat of the jobs running now, listing the
        jobs of the ids it is given even if unchanged.
    :param running: how many jobs run now (paces the coalescing heartbeats).
    :param heartbeat_interval: the server's heartbeat interval.
    :param sent: told, after each heartbeat, its ``seq`` and whether it was
        published (``HeartbeatSeries.sent`` of :mod:`orchestratr_core.server.beats`).
    """

    def __init__(
        self,
        send: Callable[[p.Event], Awaitable[None]],
        heartbeat: Callable[[Collection[str]], p.ServerHeartbeat],
        running: Callable[[], int],
        heartbeat_interval: float,
        sent: Callable[[int, bool], None] | None = None,
    ) -> None:
        self.queue: asyncio.Queue[p.Event | _HeartbeatDue] = asyncio.Queue()
        self.closed = False
        """Set when the server was killed: it says nothing more."""
        self._send = send
        self._heartbeat = heartbeat
        self._sent = sent
        self._running = running
        self._heartbeat_interval = heartbeat_interval
        self._queued_starts = 0  # start reports queued since the last coalescing
        self._settled_events = 0  # events at the head that coalescing has looked at
        self._last_heartbeat_sent = -float("inf")  # monotonic

    def publish(self, event: p.Event) -> None:
        """Queue ``event`` for the pump (nothing once :attr:`closed`)."""
        if not self.closed:
            if isinstance(event, p.JobStarted):
                self._queued_starts += 1
            self.queue.put_nowait(event)

    def publish_heartbeat(self) -> None:
        """Queue a heartbeat, built by the pump when its turn comes (nothing once
        :attr:`closed`)."""
        if not self.closed:
            self.queue.put_nowait(HEARTBEAT_DUE)

    async def flush(self, limit: float) -> None:
        """Wait up to ``limit`` seconds for the queue to be sent."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout=limit)

    async def pump(self) -> None:
        """Publish events in order, for as long as the server lives: a failure of
        the pump itself is logged and the pump starts again (:func:`keep_running`),
        so that the heartbeats never stop silently."""
        await keep_running(self._pump, name="the event pump", logger=log)

    async def _pump(self) -> None:
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
            event: p.Event | _HeartbeatDue = await self.queue.get()
            try:
                if self._settled_events:
                    # Kept by the last coalescing: the start reports among them
                    # are of jobs that ended already; no heartbeat covers them.
                    self._settled_events -= 1
                elif isinstance(event, p.JobStarted):
                    self._queued_starts -= 1
                    if self._queued_starts + 1 >= COALESCE_STARTS:
                        gap = min(
                            COALESCE_GAP,
                            self._heartbeat_interval / 2,
                            self._running() / COALESCE_JOBS_PER_SECOND,
                        )
                        now = time.monotonic()
                        wait = self._last_heartbeat_sent + gap - now
                        if wait > 0:
                            await asyncio.sleep(wait)  # more starts gather meanwhile
                        await self._burst_settles(now + max(gap, COALESCE_SETTLE))
                        event = self._coalesce_starts(event)
                if isinstance(event, p.ServerHeartbeat | _HeartbeatDue) and any(
                    isinstance(e, p.ServerHeartbeat | _HeartbeatDue) for e in _peek(self.queue)
                ):
                    continue  # a newer heartbeat is queued
                if isinstance(event, _HeartbeatDue):
                    # Built now, it may list jobs whose start reports wait behind
                    # it: it replaces them, as a coalescing heartbeat does (a
                    # heartbeat must not tell of a start before its report).
                    event = self._coalesce_starts(None)
                published = await self._publish(event)
                if self._sent is not None and isinstance(event, p.ServerHeartbeat):
                    self._sent(event.seq, published)
            finally:
                self.queue.task_done()

    async def _burst_settles(self, until: float) -> None:
        """Wait while start reports keep coming, :data:`COALESCE_QUIET` seconds
        without one, but not past ``until`` (monotonic) nor half the heartbeat
        interval: the heartbeat then covers the whole burst, built once, after it."""
        until = min(until, time.monotonic() + self._heartbeat_interval / 2)
        while time.monotonic() < until:
            seen = self._queued_starts
            await asyncio.sleep(COALESCE_QUIET)
            if self._queued_starts == seen:
                return

    async def _publish(self, event: p.Event) -> bool:
        """Publish ``event``; False if it was dropped or put back in the queue."""
        error: BaseException | None = None
        for attempt in range(1, _PUBLISH_ATTEMPTS + 1):
            try:
                await self._send(event)
                if isinstance(event, p.ServerHeartbeat):
                    self._last_heartbeat_sent = time.monotonic()
                return True
            except (OrchestratrError, OSError) as exc:
                error = exc
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                # Raised inside the transport, not a cancellation of the pump.
                log.error("publishing %s raised a stray cancellation", event.TYPE, exc_info=True)
                error = exc
            except Exception as exc:  # a fault of the transport must not end the pump
                log.error("publishing %s failed unexpectedly", event.TYPE, exc_info=True)
                error = exc
            await asyncio.sleep(backoff_delay(attempt, 0.1, 1.0))
        if isinstance(event, p.JobStopped | p.JobDiscarded | p.ServerLeft):
            log.warning("cannot publish %s yet (%s); will retry", event.TYPE, error)
            self.queue.put_nowait(event)
        else:
            log.warning("dropping %s event (%s)", event.TYPE, error)
        return False

    def _coalesce_starts(self, first: p.JobStarted | None) -> p.Event:
        """Replace the queued start reports by one heartbeat built now (``first``:
        the report just taken from the queue, if any).

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
        starts = [e for e in _peek(self.queue) if isinstance(e, p.JobStarted)]
        if first is None and not starts:
            return self._heartbeat(())  # nothing to replace: the queue stays as it is
        if first is not None:
            starts.insert(0, first)
        heartbeat = self._heartbeat([start.job_id for start in starts])
        covered = {(job.job_id, job.fence) for job in heartbeat.jobs}
        kept: list[p.Event] = []
        dropped: list[str] = []  # ids of the start reports the heartbeat replaces
        if first is not None:
            if (first.job_id, first.fence) in covered:
                dropped.append(first.job_id)
            else:
                kept.append(first)
        while True:
            try:
                event = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self.queue.task_done()
            if isinstance(event, p.ServerHeartbeat | _HeartbeatDue):
                continue
            if isinstance(event, p.JobStarted) and (event.job_id, event.fence) in covered:
                dropped.append(event.job_id)
                continue
            kept.append(event)
        for event in kept:
            self.queue.put_nowait(event)
        self._queued_starts = 0
        self._settled_events = len(kept)
        log.debug(
            "%d start report(s) replaced by one heartbeat of %d job(s)",
            len(dropped),
            len(heartbeat.jobs),
        )
        # A restarted job may have had two start reports: its id once.
        return replace(heartbeat, started=tuple(dict.fromkeys(dropped)))


def _peek(queue: asyncio.Queue[p.Event | _HeartbeatDue]) -> list[p.Event | _HeartbeatDue]:
    return list(getattr(queue, "_queue", ()))
