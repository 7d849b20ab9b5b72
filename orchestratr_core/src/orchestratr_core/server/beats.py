"""What a server's heartbeats said and what the manager acknowledged: the series
that lets a heartbeat carry only what changed (``ServerHeartbeat.base``).

Every heartbeat is numbered (``seq``) and carries the digest and size of the
complete set of running jobs. Until a manager acknowledges one
(:class:`~orchestratr_core.protocol.HeartbeatAck`), every heartbeat is a complete
listing, as an older manager expects. Once one is acknowledged, a heartbeat lists
only the jobs that are new or changed since that one (``jobs``) and those that
are gone (``gone``); the manager rebuilds the rest from its copy. A job counts as
changed when its fence or restart count differs from the acknowledged report,
when it recorded a new checkpoint (``RunningJob.checkpoint``), or -- for a job
with a watchdog (``heartbeat_timeout``) -- when its own beat is
:data:`BEAT_REPORT_STEP` newer: an idle job is not in the heartbeat at all, so it
costs neither the manager nor the database anything.

A new checkpoint is listed again (with the job's later reports) until a
heartbeat that carried it is acknowledged, at most :data:`ACK_PATIENCE` + 1
times: a heartbeat lost on the way, or applied by a manager that then asked for
a complete listing, does not lose it, and a manager of an older version, which
never acknowledges, stores it a bounded number of times. A complete listing
carries the checkpoints not yet acknowledged, as it always carried the ones
recorded since the previous heartbeat.

A server falls back to complete listings when the manager asks for one
(``full``), and when no acknowledgement came for :data:`ACK_PATIENCE` heartbeats
while changes waited (a manager that no longer answers: the next one may lack
the set) -- patience that grows by twice the manager's last measured lag, in
heartbeats (how many heartbeats the server had sent since the one an
acknowledgement answered, at most :data:`MAX_LAG`). A manager behind its events
queue answers every heartbeat late; falling back to complete listings then would
make each heartbeat it has yet to apply a thousand-job listing instead of a
delta, and put it further behind (the feedback that kept a manager of a million
jobs from ever catching up).

**Chained deltas.** Once an acknowledgement says the manager keeps the set of
the last heartbeat it applied (``HeartbeatAck.chain``), each heartbeat is
relative to the one sent just before it (``chained``), provided that one was
published (:meth:`HeartbeatSeries.sent`; else the next is a complete listing):
it lists what changed in one interval, however far behind the manager is. A
delta on the last acknowledged heartbeat lists everything started since; with a
manager minutes behind its events queue while a fleet fills, that is every job
of the server in every heartbeat, which kept a manager of a million jobs behind
for good. Chained, there is no patience to run out either: a manager that lacks
the set asks for a complete listing on the first chained delta it cannot apply.

An acknowledgement may answer a heartbeat sent long before: the set of every
heartbeat since the last acknowledged one can be rebuilt (:meth:`set_of`), from
that set and the difference of each heartbeat's set from the one before -- a
few jobs per heartbeat, not a copy of the set.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from orchestratr_core import protocol as p
from orchestratr_core.storage import HEARTBEAT_REFRESH_STEP

__all__ = ["ACK_PATIENCE", "BEAT_REPORT_STEP", "MAX_LAG", "HeartbeatSeries"]

BEAT_REPORT_STEP = HEARTBEAT_REFRESH_STEP
"""A watchdog job's own beat is reported again once it is this much newer (s)."""
ACK_PATIENCE = 3
"""Heartbeats with unacknowledged changes before the server lists everything
again, when the manager answers at once (see :data:`MAX_LAG`)."""
MAX_LAG = 250
"""The largest lag of the manager's answers, in heartbeats, that lengthens the
patience (by twice the lag): a manager further behind gets complete listings."""
_KEEP_CHAIN = 512
"""Differences kept after the anchor (heartbeats whose set changed): beyond, the
oldest joins the anchor, and an acknowledgement of a heartbeat before the anchor
counts only by digest (below)."""
_KEEP_DIGESTS = 512
"""Heartbeats whose digest is kept: an acknowledgement of one whose set can no
longer be rebuilt still counts if the set it acknowledges is the one last sent."""


class HeartbeatSeries:
    """The numbering of one server's heartbeats, what their sets were, and the one
    the manager acknowledged last."""

    __slots__ = (
        "_acked",
        "_anchor",
        "_anchor_seq",
        "_base",
        "_chain",
        "_chain_ok",
        "_chained",
        "_checkpoints",
        "_digests",
        "_full_due",
        "_lag",
        "_last",
        "_sent",
        "_shares",
        "_unanswered",
        "seq",
    )

    def __init__(self) -> None:
        self.seq = 0
        self._base = 0
        """The ``seq`` of the acknowledged heartbeat (0: none; list everything)."""
        self._acked: dict[str, p.RunningJob] = {}
        self._anchor_seq = 0
        self._anchor: dict[str, p.RunningJob] = {}
        """The set sent with heartbeat ``_anchor_seq`` (the last acknowledged one,
        or a later one once the chain grew too long); never changed in place."""
        self._chain: dict[int, tuple[dict[str, p.RunningJob], tuple[str, ...]]] = {}
        """seq -> (reports new or other, ids gone) in the set sent with it, against
        the set sent with ``seq - 1``, for every heartbeat after the anchor whose
        set differs (in order; an idle heartbeat adds nothing)."""
        self._last: dict[str, p.RunningJob] = {}
        """The set sent with heartbeat ``seq``."""
        self._digests: dict[int, tuple[int, int]] = {}
        """seq -> (digest, running) of the set it carried, for :data:`_KEEP_DIGESTS`."""
        self._unanswered = 0
        self._lag = 0
        """Heartbeats sent between the last acknowledged one and its acknowledgement."""
        self._shares: dict[str, tuple[int, int]] = {}
        """job id -> (fence, its share of the digest): hashed once per ownership."""
        self._checkpoints: dict[str, tuple[p.RunningJob, int]] = {}
        """job id -> (the report of its newest checkpoint not yet acknowledged,
        how many heartbeats carried it)."""
        self._chain_ok = False
        """The last acknowledgement said ``chain``: heartbeats may be chained."""
        self._sent = 0
        """The ``seq`` of the last heartbeat known to be published (0: the last one
        built was not, or nothing was said: the next is not chained)."""
        self._chained = False
        """Whether the last heartbeat built is chained (:attr:`chained`)."""
        self._full_due = False
        """The manager asked for a complete listing: the next one is (even if the
        one being published as the request came is reported sent after it)."""

    @property
    def base(self) -> int:
        """The acknowledged heartbeat deltas are relative to (0: none)."""
        return self._base

    @property
    def chained(self) -> bool:
        """Whether the heartbeat :meth:`next` built last is chained: its ``base``
        is the heartbeat sent before it (``ServerHeartbeat.chained``)."""
        return self._chained

    def sent(self, seq: int, published: bool = True) -> None:
        """Say whether heartbeat ``seq`` was published (call it before the next
        one is built): the next heartbeat is chained on it only if it was, and
        only if it is the last one built."""
        if published and seq == self.seq:
            self._sent = seq  # (building the next one resets it)

    @property
    def lag(self) -> int:
        """The manager's lag measured at its last acknowledgement, in heartbeats."""
        return self._lag

    def set_of(self, seq: int) -> dict[str, p.RunningJob] | None:
        """The set sent with heartbeat ``seq`` (job id -> report as sent or as
        acknowledged before), or ``None`` if it can no longer be rebuilt. Do not
        change the result."""
        if seq == self.seq:
            return self._last
        if seq == self._anchor_seq:
            return self._anchor
        if not self._anchor_seq < seq < self.seq:
            return None
        rebuilt = dict(self._anchor)
        for step, (upserts, gone) in self._chain.items():
            if step > seq:
                break
            for job_id in gone:
                del rebuilt[job_id]
            rebuilt.update(upserts)
        return rebuilt

    def acknowledged(self, ack: p.HeartbeatAck) -> bool:
        """Apply the manager's answer; True if it asks for a complete listing now."""
        self._chain_ok = ack.chain
        sent = self.set_of(ack.seq)
        # Either answer says the manager applied heartbeat ``seq``: the checkpoints
        # it carried are stored (or refused by their fence) and go no more.
        if sent is not None and self._checkpoints:
            for job_id, (report, _) in list(self._checkpoints.items()):
                carried = sent.get(job_id)
                if (
                    carried is not None
                    and carried.fence == report.fence
                    and carried.checkpoint == report.checkpoint
                ):
                    del self._checkpoints[job_id]
        if ack.full:
            self._base = 0
            self._acked = {}
            self._unanswered = 0
            self._full_due = True  # the next heartbeat is complete, chained or not
            return True
        if (
            sent is None
            and ack.seq > self._base
            and self._digests.get(ack.seq) == self._digests.get(self.seq)
        ):
            # Its set can no longer be rebuilt, but it is the set sent last: that
            # one is what the manager holds (a digest over every job's id and fence).
            sent = self._last
        if sent is not None and ack.seq > self._base:
            self._lag = min(self.seq - ack.seq, MAX_LAG)
            self._base = ack.seq
            self._acked = sent
            self._unanswered = 0
            self._move_anchor(ack.seq, sent)
        return False

    def _move_anchor(self, seq: int, sent: dict[str, p.RunningJob]) -> None:
        if seq <= self._anchor_seq:
            return
        self._anchor_seq, self._anchor = seq, sent
        chain = self._chain
        while chain and next(iter(chain)) <= seq:
            del chain[next(iter(chain))]

    def next(
        self, reports: Iterable[tuple[p.RunningJob, bool]], listing: Collection[str] = ()
    ) -> tuple[int, int, tuple[p.RunningJob, ...], tuple[str, ...], int, int]:
        """Number the next heartbeat of ``reports`` (each with whether the job has a
        watchdog): ``(seq, base, jobs, gone, digest, running)``, ``jobs`` and
        ``gone`` relative to ``base`` (complete when ``base`` is 0; :attr:`chained`
        says whether ``base`` is the heartbeat sent before). ``listing``: ids of
        jobs a delta lists even if unchanged (those whose start reports the
        heartbeat replaces)."""
        chained = self._chain_ok and self.seq > 0 and self._sent == self.seq and not self._full_due
        self._full_due = False
        listing = frozenset(listing) if listing else frozenset()
        self._chained = chained
        self._sent = 0
        self.seq += 1
        current: dict[str, p.RunningJob] = {}
        digest = 0
        acked = self._last if chained else self._acked
        changed: list[p.RunningJob] = []
        shares, known = {}, self._shares
        pending = self._checkpoints
        for reported, watched in reports:
            job_id, fence = reported.job_id, reported.fence
            report = (
                _with_checkpoint(pending, reported)
                if reported.checkpoint is not None or job_id in pending
                else reported
            )
            current[job_id] = report
            share = known.get(job_id)
            if share is None or share[0] != fence:
                share = (fence, p.job_digest(job_id, fence))
            shares[job_id] = share
            digest ^= share[1]
            before = acked.get(job_id)
            if before is None or _changed(before, report, watched) or job_id in listing:
                changed.append(report)
        self._shares = shares
        if pending:
            for job_id in [j for j in pending if j not in current]:
                del pending[job_id]  # stopped: its owner's last checkpoint went with it
        # Chaining, a heartbeat that cannot be chained (the one before was not
        # published) is a complete listing: the manager's copy is of the last
        # heartbeat it applied, not of the acknowledged one.
        base = self.seq - 1 if chained else 0 if self._chain_ok else self._base
        gone: tuple[str, ...] = ()
        if base:
            gone = tuple(job_id for job_id in acked if job_id not in current)
            if not chained and (changed or gone):
                self._unanswered += 1
                if self._unanswered > ACK_PATIENCE + 2 * self._lag:
                    base = self._base = 0  # nobody acknowledges: list everything
                    self._acked = {}
                    self._unanswered = 0
                    gone = ()
            if not base:
                changed = list(current.values())
        else:
            changed = list(current.values())
        # The set as sent, for when this heartbeat is acknowledged: an unchanged
        # job keeps the report acknowledged before (a fresher beat was not sent).
        # (``current`` becomes that set: only existing keys are reassigned.)
        if base:
            listed = {report.job_id for report in changed}
            for job_id, report in current.items():
                before = acked.get(job_id)
                if before is not None and before is not report and job_id not in listed:
                    current[job_id] = before
        self._remember(current, digest)
        return self.seq, base, tuple(changed), gone, digest, len(current)

    def _remember(self, sent: dict[str, p.RunningJob], digest: int) -> None:
        """Keep what lets the set of this heartbeat be rebuilt later: its
        difference from the one before, and its digest."""
        last = self._last
        upserts = {job_id: r for job_id, r in sent.items() if last.get(job_id) is not r}
        gone: tuple[str, ...] = ()
        if len(sent) - len(upserts) < len(last):  # not every job sent before is kept
            gone = tuple(job_id for job_id in last if job_id not in sent)
        self._last = sent
        chain = self._chain
        if upserts or gone:
            chain[self.seq] = (upserts, gone)
        if len(chain) > _KEEP_CHAIN:
            # Nobody acknowledges: the oldest difference joins the anchor.
            step = next(iter(chain))
            upserts, gone = chain.pop(step)
            anchor = dict(self._anchor)
            for job_id in gone:
                del anchor[job_id]
            anchor.update(upserts)
            self._anchor_seq, self._anchor = step, anchor
        digests = self._digests
        digests[self.seq] = (digest, len(sent))
        if len(digests) > _KEEP_DIGESTS:
            del digests[next(iter(digests))]


def _with_checkpoint(
    pending: dict[str, tuple[p.RunningJob, int]], report: p.RunningJob
) -> p.RunningJob:
    """``report`` with the job's newest checkpoint not yet acknowledged (counted as
    carried once more; dropped after :data:`ACK_PATIENCE` + 1 heartbeats)."""
    job_id = report.job_id
    if report.checkpoint is not None:
        pending[job_id] = (report, 1)
        return report
    newest, carried = pending[job_id]
    if newest.fence != report.fence or carried > ACK_PATIENCE:
        del pending[job_id]  # another ownership, or nobody acknowledges
        return report
    pending[job_id] = (newest, carried + 1)
    return p.RunningJob(
        job_id, report.fence, report.last_heartbeat, report.restarts, newest.checkpoint
    )


def _changed(before: p.RunningJob, now: p.RunningJob, watched: bool) -> bool:
    if before is now:
        return False
    if now.checkpoint is not None:
        return True  # a checkpoint not yet acknowledged
    if before.fence != now.fence or before.restarts != now.restarts:
        return True
    if not watched or now.last_heartbeat is None:
        return False
    return before.last_heartbeat is None or (
        now.last_heartbeat - before.last_heartbeat >= BEAT_REPORT_STEP
    )
