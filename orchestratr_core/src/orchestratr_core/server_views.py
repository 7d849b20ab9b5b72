"""The manager's copy of each server's set of running jobs, as of the heartbeat it
acknowledged last: what lets a heartbeat carry only what changed
(``ServerHeartbeat.base``; the protocol module describes the exchange).

A :class:`ServerViews` answers, for each heartbeat, whether the manager can trust
the server's complete set without seeing it (:meth:`ServerViews.receive`):

* a complete listing (``base`` 0) replaces the copy;
* a delta on the acknowledged heartbeat is applied to the copy, and the result
  must match the heartbeat's ``digest`` and ``running``;
* a delta on an older heartbeat that this manager acknowledged too (it was sent
  before the newer acknowledgement arrived) is applied as it says, and the copy
  stays as it is;
* a chained delta (``chained``: relative to the heartbeat sent just before it)
  is applied to the copy if the copy is of that heartbeat, and the result must
  match as above;
* anything else -- no copy (a new or restarted manager, another manager took
  the events over), a digest that does not match, a gap in the heartbeats long
  enough for the server to have been declared dead meanwhile -- asks for a
  complete listing. For chained deltas it asks once: those the server sent
  before it could have read the request (:data:`ACK_GRACE` after it) are
  applied for what they say and not answered, so a manager far behind its
  events queue does not make the server send a complete listing for every
  delta still queued.

Every acknowledgement says that this manager applies chained deltas
(``HeartbeatAck.chain``); the copy is always of the last heartbeat applied to
it (:attr:`_View.last`).

The copy and the digest cover each job's identity and ownership -- its id and
fence (:func:`~orchestratr_core.protocol.job_digest`) -- which is what a
complete listing settles (a job it leaves out is released). A job's other
fields (its restart count, its own beat, a new checkpoint) are not state the
manager keeps per server: the storage holds them, and the server lists a job
again whenever one of them changed since the acknowledged heartbeat (a new
checkpoint until a heartbeat carrying it is acknowledged), so a lost heartbeat
loses none of them. Kinds and labels are per server and travel in every
heartbeat, delta or not.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestratr_core import protocol as p

__all__ = ["ServerViews", "Verdict"]

_DIGESTS_KEPT = 512
"""Acknowledged heartbeats remembered per server, with their set's digest: a delta
on one of them is applied as it says (built before a newer acknowledgement
arrived), and to the copy if its set is the copy's (a server that learnt of the
acknowledgement late, from a manager behind its events queue)."""
ACK_GRACE = 5.0
"""Seconds after an acknowledgement during which a delta on an earlier one is
expected (built before it arrived); later, the acknowledgement was lost. Judged
by when the manager applied the delta, and also by when the server sent it (its
``sent_at`` against the acknowledgement's wall-clock time): a manager behind its
events queue applies heartbeats built before its acknowledgement arrived long
after it sent it."""


class Verdict(enum.Enum):
    """What the manager does after applying a heartbeat."""

    NOTHING = "nothing"
    """Nothing changed (or an older server): no answer."""
    ACK = "ack"
    """Acknowledge it: later heartbeats may be relative to it."""
    FULL = "full"
    """Ask the server for a complete listing."""


@dataclass
class _View:
    shares: dict[str, int]
    """job id -> its share of the digest, as of ``acked``"""
    digest: int
    acked: int
    seen: float
    """monotonic time of the last heartbeat applied"""
    acked_at: float
    """monotonic time of the acknowledgement of ``acked``"""
    acked_wall: float
    """wall-clock time of the acknowledgement of ``acked`` (epoch seconds)"""
    sent: float = 0.0
    """``sent_at`` (the server's clock) of the last heartbeat applied"""
    digests: dict[int, tuple[int, int]] = field(default_factory=dict)
    """acknowledged seq -> (digest, count) of the set it acknowledged"""
    applied: dict[str, p.RunningJob] = field(default_factory=dict)
    """job id -> the report of it that this manager last applied to the storage
    (from any heartbeat of the server since the copy was made)"""
    last: int = 0
    """``seq`` of the heartbeat whose set the copy is (a chained delta on it applies)"""

    def relative_to_copy(self, base: int) -> bool:
        """Whether a delta on ``base`` is relative to this copy: the acknowledged
        heartbeat, or an earlier acknowledged one whose set was the same."""
        return base == self.acked or self.digests.get(base) == (self.digest, len(self.shares))

    def note_acked(self) -> None:
        """Remember the digest of the set just acknowledged (``acked``)."""
        self.digests[self.acked] = (self.digest, len(self.shares))
        while len(self.digests) > _DIGESTS_KEPT:
            del self.digests[min(self.digests)]


class ServerViews:
    """One :class:`_View` per server whose heartbeats are numbered.

    :param stale_after: seconds without a heartbeat after which the copy is not
        trusted (keep it below the manager's server timeout: a server declared dead
        has its jobs released in the storage, which the copy does not show).
        Judged between two heartbeats of the server by its own clock (``sent_at``),
        and by when the manager applied them, less ``behind()``.
    :param behind: seconds the manager is behind in applying the events queue
        (:meth:`EventsFrontier.behind <orchestratr_core.frontier.EventsFrontier.behind>`):
        a manager behind applies two heartbeats of one server further apart than
        the server sent them, and the leader holds back declaring servers dead
        by as much. Default: never behind.
    """

    def __init__(self, stale_after: float, behind: Callable[[], float] | None = None) -> None:
        self._views: dict[str, _View] = {}
        self._stale_after = stale_after
        self._behind = behind
        self._older: dict[str, tuple[frozenset[str], float]] = {}
        """Server id -> the jobs of the last complete listing of a server of an
        older version (unnumbered heartbeats), and when it arrived (monotonic)."""
        self._asked: dict[str, float] = {}
        """Server id -> when a complete listing was last asked for on a chained
        delta (wall clock): the deltas sent before it could arrive ask no more."""

    def __len__(self) -> int:
        return len(self._views)

    def forget(self, server_id: str) -> None:
        """Drop the copy (the server is dead or left; its jobs were released)."""
        self._views.pop(server_id, None)
        self._older.pop(server_id, None)
        self._asked.pop(server_id, None)

    def clear(self) -> None:
        """Drop every copy."""
        self._views.clear()
        self._older.clear()
        self._asked.clear()

    def running(self, server_id: str) -> frozenset[str] | None:
        """The ids of the jobs the server runs as of its last heartbeat that this
        manager could check (the acknowledged set, or an older server's last
        listing); ``None`` when there is no such copy or it is stale."""
        now = time.monotonic()
        view = self._views.get(server_id)
        if view is not None and now - view.seen < self._stale_after:
            return frozenset(view.shares)
        older = self._older.get(server_id)
        if older is not None and now - older[1] < self._stale_after:
            return older[0]
        return None

    def idle(self, hb: p.ServerHeartbeat) -> bool:
        """Whether ``hb`` changes nothing the manager keeps: a delta on the
        acknowledged heartbeat of a fresh copy that lists no job, names none gone
        or started, and whose digest and count match the copy. Then the only write
        it asks for is its server row (``last_seen``, and the fields every
        heartbeat carries), and :meth:`receive` would answer
        :attr:`Verdict.NOTHING`; this notes it as seen, as :meth:`receive` does.
        Anything else returns False and changes nothing (apply it, then call
        :meth:`receive`)."""
        if not hb.seq or not hb.base or hb.jobs or hb.gone or hb.started:
            return False
        view = self._views.get(hb.server_id)
        if view is None or not (
            hb.base == view.last if hb.chained else view.relative_to_copy(hb.base)
        ):
            return False
        now = time.monotonic()
        if self._stale(view, hb, now):
            return False
        if hb.digest != view.digest or hb.running != len(view.shares):
            return False
        view.seen, view.sent, view.last = now, hb.sent_at, hb.seq
        return True

    def known_delta(self, hb: p.ServerHeartbeat) -> bool:
        """Whether ``hb`` is a delta on an earlier acknowledgement, built before
        the newer one arrived (:meth:`receive` answers :attr:`Verdict.NOTHING`),
        that names no job gone or started and lists only jobs this manager
        already applied as listed: it changes nothing but its server row, like
        an :meth:`idle` one, and is noted as seen as that one is. A manager
        behind its events queue gets such deltas from every server for as long
        as it is behind."""
        if not hb.seq or not hb.base or hb.gone or hb.started or hb.chained:
            return False
        view = self._views.get(hb.server_id)
        if view is None or view.relative_to_copy(hb.base):
            return False
        now = time.monotonic()
        if self._stale(view, hb, now) or not self._built_before_ack(view, hb, now):
            return False
        applied = view.applied
        for job in hb.jobs:
            if job.checkpoint is not None or applied.get(job.job_id) != job:
                return False
        view.seen, view.sent = now, hb.sent_at
        return True

    @staticmethod
    def _built_before_ack(view: _View, hb: p.ServerHeartbeat, now: float) -> bool:
        """Whether ``hb``, a delta on an earlier acknowledgement of ours, was built
        before the newer one reached the server (see :data:`ACK_GRACE`)."""
        return hb.base in view.digests and (
            now - view.acked_at < ACK_GRACE or hb.sent_at < view.acked_wall + ACK_GRACE
        )

    def unapplied(self, hb: p.ServerHeartbeat) -> tuple[p.RunningJob, ...] | None:
        """The jobs a delta lists that this manager has not already applied as
        they are listed, or ``None`` when all must be applied (a complete listing,
        no fresh copy). A manager behind its events queue gets deltas on old
        acknowledgements, each listing again every job started since: the ones
        it already applied, with the same fence, restarts and own beat and no
        checkpoint, change nothing in the storage (as a job left out of an idle
        heartbeat does not). Kept only while the copy is trusted: a gap after
        which the server may have been declared dead drops the copy and this
        with it, so a server alive after all gets every job applied again."""
        if not hb.seq or not hb.base or not hb.jobs:
            return None
        view = self._views.get(hb.server_id)
        if view is None or not view.applied or self._stale(view, hb, time.monotonic()):
            return None
        applied, started = view.applied, frozenset(hb.started)
        return tuple(
            job
            for job in hb.jobs
            if job.checkpoint is not None
            or applied.get(job.job_id) != job
            or (started and job.job_id in started)
        )

    def _stale(self, view: _View, hb: p.ServerHeartbeat, now: float) -> bool:
        """Whether so long passed between the copy's last heartbeat and ``hb``
        that the server may have been declared dead meanwhile (see the class)."""
        if hb.sent_at - view.sent >= self._stale_after:
            return True
        if now - view.seen < self._stale_after:
            return False
        return now - view.seen >= self._stale_after + (self._behind() if self._behind else 0.0)

    def receive(self, hb: p.ServerHeartbeat, *, refused: bool = False) -> Verdict:
        """Update the copy for ``hb`` (already applied to the storage) and say what
        to answer. A delta whose complete set cannot be checked was still applied
        for what it says (starts and gone jobs are guarded transitions).

        ``refused``: the storage refused some of the reported jobs (the server was
        told to stop those copies). Then nothing is acknowledged, so that the server
        keeps listing them and every later heartbeat raises the conflict again until
        the copies are gone -- as a complete listing always did."""
        if not hb.seq:
            # An older server: every heartbeat is complete.
            self._older[hb.server_id] = (
                frozenset(job.job_id for job in hb.jobs),
                time.monotonic(),
            )
            return Verdict.NOTHING
        if refused:
            if hb.chained:
                # A chained delta lists a job once: the conflict is raised again
                # by a complete listing, as long as the copy runs.
                return self._lost(hb)
            if not hb.base:
                self._views.pop(hb.server_id, None)
            return Verdict.NOTHING
        now = time.monotonic()
        view = self._views.get(hb.server_id)
        if view is not None and self._stale(view, hb, now):
            view = None  # the server may have been declared dead meanwhile
            del self._views[hb.server_id]
        if not hb.base:
            shares = {job.job_id: p.job_digest(job.job_id, job.fence) for job in hb.jobs}
            digest = p.jobs_digest(shares.values())
            if digest != hb.digest or len(shares) != hb.running:
                self._views.pop(hb.server_id, None)
                return Verdict.FULL  # a listing that contradicts itself: ask again
            if view is None:
                view = self._views[hb.server_id] = _View(
                    shares, digest, hb.seq, now, now, time.time()
                )
            else:
                view.shares, view.digest, view.acked = shares, digest, hb.seq
                view.acked_at, view.acked_wall = now, time.time()
            view.seen, view.sent, view.last = now, hb.sent_at, hb.seq
            view.applied = {job.job_id: job for job in hb.jobs}
            view.note_acked()
            self._asked.pop(hb.server_id, None)
            return Verdict.ACK
        if hb.chained:
            return self._receive_chained(view, hb, now)
        if view is None:
            return Verdict.FULL
        self._note_applied(view, hb, now)
        if not view.relative_to_copy(hb.base):
            # Relative to an earlier acknowledgement of ours, built before the newer
            # one arrived: applied, the copy stays. Else we lack its base, or the
            # newer acknowledgement never reached the server. (An earlier one whose
            # set is the copy's is applied to the copy, below.)
            if self._built_before_ack(view, hb, now):
                return Verdict.NOTHING
            return self._lost(hb)
        return self._apply_to_copy(view, hb, now) or self._lost(hb)

    @staticmethod
    def _note_applied(view: _View, hb: p.ServerHeartbeat, now: float) -> None:
        """Note a delta applied to the storage: when, and the reports it listed."""
        view.seen, view.sent = now, hb.sent_at
        applied = view.applied
        for job_id in hb.gone:
            applied.pop(job_id, None)
        for job in hb.jobs:
            applied[job.job_id] = job

    def _receive_chained(self, view: _View | None, hb: p.ServerHeartbeat, now: float) -> Verdict:
        """:meth:`receive` for a chained delta (``hb.base`` = ``hb.seq`` - 1)."""
        if view is None:
            return self._lost(hb)
        if hb.seq <= view.last:
            return Verdict.NOTHING  # applied before (delivered again)
        self._note_applied(view, hb, now)
        if hb.base != view.last:
            # The heartbeat before it did not reach the copy (lost, or applied by
            # another manager): the copy is of another set.
            return self._lost(hb)
        return self._apply_to_copy(view, hb, now) or self._lost(hb)

    def _apply_to_copy(self, view: _View, hb: p.ServerHeartbeat, now: float) -> Verdict | None:
        """Apply a delta on the copy's set; ``None`` (and the copy unchanged) when
        the result does not match the heartbeat's digest and count."""
        shares, digest = view.shares, view.digest
        removed: dict[str, int] = {}
        for job_id in hb.gone:
            share = shares.get(job_id)
            if share is None:
                return None
            removed[job_id] = share
            digest ^= share
        added: dict[str, int] = {}
        for job in hb.jobs:
            old = shares.get(job.job_id) if job.job_id not in removed else None
            new = p.job_digest(job.job_id, job.fence)
            if old is not None:
                digest ^= old
            digest ^= new
            added[job.job_id] = new
        count = len(shares) - len(removed) + sum(1 for j in added if j not in shares)
        if digest != hb.digest or count != hb.running:
            return None
        view.last = hb.seq
        if not removed and not added:
            return Verdict.NOTHING  # nothing new: the acknowledgement stands
        for job_id in removed:
            del shares[job_id]
        shares.update(added)
        view.digest = digest
        view.acked, view.acked_at, view.acked_wall = hb.seq, now, time.time()
        view.note_acked()
        return Verdict.ACK

    def _lost(self, hb: p.ServerHeartbeat) -> Verdict:
        """Drop the copy and ask for a complete listing (once, for a chained delta)."""
        self._views.pop(hb.server_id, None)
        return self._ask_full(hb) if hb.chained else Verdict.FULL

    def _ask_full(self, hb: p.ServerHeartbeat) -> Verdict:
        """Ask for a complete listing on a chained delta -- unless one was asked
        for so recently that the server sent ``hb`` before it could read that
        request (:data:`ACK_GRACE`, by its clock against ours): it is coming."""
        asked = self._asked.get(hb.server_id)
        if asked is not None and hb.sent_at < asked + ACK_GRACE:
            return Verdict.NOTHING
        self._asked[hb.server_id] = time.time()
        return Verdict.FULL
