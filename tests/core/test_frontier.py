"""The events frontier (how far the manager has applied its events queue) and the
view staleness that follows it. The end-to-end check with real processes is
``tests/chaos/test_manager_backlog.py``."""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta

from orchestratr_core import protocol as p
from orchestratr_core.frontier import EventsFrontier
from orchestratr_core.job import utcnow
from orchestratr_core.server.beats import HeartbeatSeries
from orchestratr_core.server_views import ServerViews, Verdict
from tests.core.test_heartbeat_deltas import _hb as deltas_hb


def test_a_manager_that_keeps_up_judges_by_the_time_of_the_probe() -> None:
    frontier = EventsFrontier(max_lag=60.0, idle_after=2.0)
    at = utcnow()
    assert frontier.probe(0, at) == at
    assert frontier.probe(None, at + timedelta(seconds=1)) == at + timedelta(seconds=1)
    assert frontier.behind() == 0.0


def test_a_probe_counts_once_the_events_waiting_then_are_applied() -> None:
    frontier = EventsFrontier(max_lag=60.0, idle_after=2.0)
    first = utcnow()
    assert frontier.probe(0, first) == first
    frontier.begin()
    at = first + timedelta(seconds=1)
    # Three wait, one is being applied (the one unacknowledged event): the
    # frontier stays at the last probe until those four are done.
    assert frontier.probe(3, at) == first
    for _ in range(3):
        frontier.end()
        frontier.begin()
        assert frontier.probe(99, at + timedelta(seconds=2)) == first
    frontier.end()
    assert frontier.probe(99, at + timedelta(seconds=3)) == at
    assert frontier.behind() == 3.0


def test_the_frontier_never_lags_the_clock_by_more_than_max_lag() -> None:
    frontier = EventsFrontier(max_lag=5.0, idle_after=2.0)
    at = utcnow()
    frontier.begin()
    assert frontier.probe(10, at) == at - timedelta(seconds=5)  # no earlier probe
    assert frontier.probe(10, at + timedelta(seconds=30)) == at + timedelta(seconds=25)
    assert frontier.behind() == 5.0


def test_events_waiting_that_this_manager_does_not_apply_are_another_s() -> None:
    """Another manager holds the events queue: nothing is applied here, nothing
    is being applied -- the wall clock, as before."""
    frontier = EventsFrontier(max_lag=60.0, idle_after=0.05)
    at = utcnow()
    assert frontier.probe(7, at) == at - timedelta(seconds=60)  # may be ours, behind
    time.sleep(0.06)
    assert frontier.probe(7, at) == at


def test_a_manager_that_does_not_consume_judges_by_what_the_consumer_wrote() -> None:
    """Events wait that this manager applies none of: the frontier is the
    freshest ``last_seen`` the consumer wrote (``elsewhere``), never later than
    the probe and never more than ``max_lag`` behind it."""
    frontier = EventsFrontier(max_lag=60.0, idle_after=0.05)
    at = utcnow()
    assert not frontier.consumed_elsewhere(7)  # may be ours, behind
    time.sleep(0.06)
    assert frontier.consumed_elsewhere(7)
    assert not frontier.consumed_elsewhere(0) and not frontier.consumed_elsewhere(None)
    written = at - timedelta(seconds=20)
    assert frontier.probe(7, at, elsewhere=written) == written
    assert frontier.behind() == 20.0
    assert frontier.probe(7, at, elsewhere=at + timedelta(seconds=1)) == at
    assert frontier.probe(7, at, elsewhere=at - timedelta(hours=1)) == at - timedelta(seconds=60)
    # Nothing waits, but the consumer -- not this manager, which applied
    # nothing -- wrote a heartbeat: it may hold events it took ahead.
    assert frontier.consumed_elsewhere(0, written)
    assert frontier.probe(0, at, elsewhere=written) == written
    assert frontier.probe(0, at) == at  # no live server: the clock


def test_nothing_waiting_after_this_manager_applied_the_last_heartbeat_is_the_clock() -> None:
    """This manager consumes: the freshest ``last_seen`` is one it wrote before
    it last applied an event, so when every server falls silent, nothing waits
    and it judges by the clock (a dead server is declared dead a timeout after
    its last heartbeat, not ``max_lag`` later); a heartbeat written after that
    one is another consumer's."""
    frontier = EventsFrontier(max_lag=60.0, idle_after=0.05)
    written = utcnow()
    frontier.begin()
    frontier.end()
    time.sleep(0.06)
    later = utcnow()
    at = utcnow()
    assert not frontier.consumed_elsewhere(0, written)
    assert frontier.probe(0, at, elsewhere=written) == at
    assert frontier.consumed_elsewhere(0, later)
    assert frontier.probe(0, at, elsewhere=later) == later


def _hb(
    out: tuple[int, int, tuple[p.RunningJob, ...], tuple[str, ...], int, int], sent: float
) -> p.ServerHeartbeat:
    return dataclasses.replace(deltas_hb(out), sent_at=sent)


def _acked_view(behind: float | None) -> tuple[HeartbeatSeries, ServerViews]:
    job = p.RunningJob("a", 1, None, 0)
    series = HeartbeatSeries()
    views = ServerViews(stale_after=0.05, behind=None if behind is None else (lambda: behind))
    first = _hb(series.next([(job, False)]), sent=100.0)
    assert views.receive(first) is Verdict.ACK
    series.acknowledged(p.HeartbeatAck(seq=first.seq))
    return series, views


def test_a_copy_stays_trusted_while_the_manager_applies_heartbeats_late() -> None:
    """Applied 0.1 s apart but sent 0.01 s apart by the server, with the manager
    10 s behind: the copy stands (no complete listing asked)."""
    series, views = _acked_view(behind=10.0)
    time.sleep(0.1)
    idle = _hb(series.next([(p.RunningJob("a", 1, None, 0), False)]), sent=100.01)
    assert views.idle(idle)
    assert views.receive(idle) is Verdict.NOTHING


def test_a_copy_is_stale_after_a_gap_applied_by_a_manager_that_keeps_up() -> None:
    series, views = _acked_view(behind=None)
    time.sleep(0.1)
    idle = _hb(series.next([(p.RunningJob("a", 1, None, 0), False)]), sent=100.01)
    assert not views.idle(idle)
    assert views.receive(idle) is Verdict.FULL


def test_a_copy_is_stale_after_the_server_itself_went_quiet() -> None:
    """The server sent its two heartbeats a timeout apart (it may have been
    declared dead meanwhile), however quickly the manager applies them."""
    series, views = _acked_view(behind=10.0)
    idle = _hb(series.next([(p.RunningJob("a", 1, None, 0), False)]), sent=100.06)
    assert not views.idle(idle)
    assert views.receive(idle) is Verdict.FULL
