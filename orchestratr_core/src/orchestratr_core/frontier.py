"""How far the manager has applied the events queue: the time up to which every
event published is applied (:class:`EventsFrontier`), so that the leader judges a
server's silence against what it has read, not against the wall clock.

A server is dead when it published no heartbeat for ``server_timeout``. Its row's
``last_seen`` is written when the manager *applies* a heartbeat, and a manager
that falls behind (a burst of complete listings, a slow database, a pause) holds
heartbeats of live servers in the broker that it has not applied: by the wall
clock those servers look silent, and declaring them dead releases their jobs and
asks them for complete listings -- more work for a manager already behind.

The events queue is first in, first out, and one manager consumes it at a time,
one event after another. So the leader asks the broker how many events wait
(:meth:`~orchestratr_core.transport.Transport.events_backlog`) at a time ``t``:
once this manager has applied that many more events (and the one it was
applying), everything published before ``t`` is applied, and ``t`` becomes the
frontier. A server whose ``last_seen`` is older than ``frontier -
server_timeout`` published nothing for a whole timeout before ``t``: it is dead,
however far behind the manager is. When the manager keeps up, the frontier is
the time of the last probe (about one sweep ago).

What bounds it:

* a transport that cannot count its events queue (``None``), or a probe that
  failed: the wall clock, as before;
* a manager that is not the one consuming the events (another manager holds the
  single active consumer: this one applies none) while events wait: it cannot
  count what the other applies, so it judges by what the other *wrote* -- the
  freshest ``last_seen`` of the live servers (``elsewhere``, read by the caller
  from the storage; a row's ``last_seen`` is when a manager applied a heartbeat
  of that server). A consumer cut off from the storage, or behind, writes no
  fresher row, so a live server whose heartbeats wait unapplied is not declared
  dead by a leader that does not consume them (the wall clock did: a
  ``make chaos-cluster`` run, 2026-12-06). The same when nothing waits in the
  queue but the consumer wrote a heartbeat more recently than this manager
  applied one: it is another manager, and it may hold events it took ahead
  (RabbitMQ: up to 64) that no count shows -- a frozen consumer holds them as
  its servers fall silent. Nothing waiting and no such sign: the wall clock
  (this manager consumes and keeps up; and when every server is dead, no
  heartbeat waits);
* a manager that stays behind: the frontier never lags the wall clock by more
  than ``max_lag`` (``ManagerOptions.backlog_wait``), so a dead server is
  declared dead at most ``server_timeout + max_lag`` (plus a sweep) after its
  last heartbeat, whatever the backlog.
"""

from __future__ import annotations

import collections
import time
from datetime import UTC, datetime, timedelta

__all__ = ["EventsFrontier"]

_MARKS_KEPT = 4096
"""Probes awaiting their events at most (one per sweep); the oldest goes first."""


class EventsFrontier:
    """See the module docstring.

    :param max_lag: seconds the frontier may lag the wall clock at most.
    :param idle_after: seconds without applying an event, while events wait and
        none is being applied, after which this manager is taken not to be the
        one consuming them (the wall clock is used).
    """

    def __init__(self, max_lag: float, idle_after: float) -> None:
        self.max_lag = max_lag
        self.idle_after = idle_after
        self.done = 0
        """Events this manager has finished applying (or refused)."""
        self.handling = False
        """True while this manager applies an event."""
        self._last_done = time.monotonic()
        self._applied_at: datetime | None = None
        """When this manager last finished applying an event (wall clock)."""
        self._marks: collections.deque[tuple[int, datetime]] = collections.deque(maxlen=_MARKS_KEPT)
        self._frontier: datetime | None = None
        self._lag = 0.0

    def begin(self) -> None:
        """An event is being applied."""
        self.handling = True

    def end(self) -> None:
        """The event is applied (or dead-lettered, or left for a retry)."""
        self.handling = False
        self.done += 1
        self._last_done = time.monotonic()
        self._applied_at = datetime.now(UTC)
        marks = self._marks
        while marks and marks[0][0] <= self.done:
            _, at = marks.popleft()
            if self._frontier is None or at > self._frontier:
                self._frontier = at

    def idle(self) -> bool:
        """Whether this manager applied no event for ``idle_after`` and applies
        none now (it may not be the one consuming the events)."""
        return not self.handling and time.monotonic() - self._last_done >= self.idle_after

    def consumed_elsewhere(self, backlog: int | None, elsewhere: datetime | None = None) -> bool:
        """Whether another manager consumes the events (or nobody does): this one
        is :meth:`idle`, and ``backlog`` events wait, or none waits but the
        freshest ``last_seen`` of the live servers (``elsewhere``) is newer than
        the last event this manager applied."""
        if backlog is None or backlog < 0 or not self.idle():
            return False
        if backlog > 0:
            return True
        return elsewhere is not None and (self._applied_at is None or elsewhere > self._applied_at)

    def probe(
        self, backlog: int | None, at: datetime, *, elsewhere: datetime | None = None
    ) -> datetime:
        """Note a count of the events waiting (``backlog``), taken at ``at`` or
        after, and return the frontier to judge silence against (at most
        ``at``). ``None``: the count is unknown -- the wall clock. ``elsewhere``:
        when this manager is :meth:`idle`, the freshest ``last_seen`` of the live
        servers (see the module docstring and :meth:`consumed_elsewhere`);
        without it, the wall clock."""
        frontier = self._judge(backlog, at, elsewhere)
        self._lag = (at - frontier).total_seconds()
        return frontier

    def _judge(self, backlog: int | None, at: datetime, elsewhere: datetime | None) -> datetime:
        if backlog is None or backlog < 0:
            self._marks.clear()
            self._frontier = at
            return at
        if self.consumed_elsewhere(backlog, elsewhere):
            # Events wait (or may, taken ahead by the consumer), yet this manager
            # applies none: another one consumes (or none does). Judge by what the
            # consumer wrote, within max_lag.
            self._marks.clear()
            judged = at
            if elsewhere is not None:
                judged = max(min(elsewhere, at), at - timedelta(seconds=self.max_lag))
            self._frontier = judged
            return judged
        if backlog == 0 and not self.handling:
            # Nothing waits and nothing is being applied: everything published
            # before ``at`` is applied (but an event handed over this instant).
            self._marks.clear()
            self._frontier = at
            return at
        # The waiting ones, and one more: the one being applied or, when none is,
        # one the broker may be handing over (one unacknowledged event at a time).
        self._marks.append((self.done + backlog + 1, at))
        floor = at - timedelta(seconds=self.max_lag)
        frontier = self._frontier
        if frontier is None or frontier < floor:
            return floor
        return min(frontier, at)

    def behind(self) -> float:
        """Seconds the frontier lagged the clock at the last probe (0 before any)."""
        return self._lag
