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
the set).
"""

from __future__ import annotations

from collections.abc import Iterable

from orchestratr_core import protocol as p
from orchestratr_core.storage import HEARTBEAT_REFRESH_STEP

__all__ = ["ACK_PATIENCE", "BEAT_REPORT_STEP", "HeartbeatSeries"]

BEAT_REPORT_STEP = HEARTBEAT_REFRESH_STEP
"""A watchdog job's own beat is reported again once it is this much newer (s)."""
ACK_PATIENCE = 3
"""Heartbeats with unacknowledged changes before the server lists everything again."""
_KEEP = 16
"""Unacknowledged heartbeats whose sets are kept."""
_KEEP_DIGESTS = 512
"""Heartbeats whose digest is kept: an acknowledgement of one whose set is no
longer kept still counts if the set it acknowledges is the one last sent (a
manager far behind its events queue answers later than :data:`_KEEP` heartbeats)."""


class HeartbeatSeries:
    """The numbering of one server's heartbeats, the sets of those not yet
    acknowledged, and the one the manager acknowledged last."""

    __slots__ = (
        "_acked",
        "_base",
        "_checkpoints",
        "_digests",
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
        self._sent: dict[int, dict[str, p.RunningJob]] = {}
        self._digests: dict[int, tuple[int, int]] = {}
        """seq -> (digest, running) of the set it carried, for :data:`_KEEP_DIGESTS`."""
        self._unanswered = 0
        self._shares: dict[str, tuple[int, int]] = {}
        """job id -> (fence, its share of the digest): hashed once per ownership."""
        self._checkpoints: dict[str, tuple[p.RunningJob, int]] = {}
        """job id -> (the report of its newest checkpoint not yet acknowledged,
        how many heartbeats carried it)."""

    @property
    def base(self) -> int:
        """The acknowledged heartbeat deltas are relative to (0: none)."""
        return self._base

    def acknowledged(self, ack: p.HeartbeatAck) -> bool:
        """Apply the manager's answer; True if it asks for a complete listing now."""
        # Either answer says the manager applied heartbeat ``seq``: the checkpoints
        # it carried are stored (or refused by their fence) and go no more.
        sent = self._sent.get(ack.seq)
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
            return True
        jobs = self._sent.get(ack.seq)
        if jobs is None and ack.seq > self._base and self._sent:
            # Its set is no longer kept; if it is the set sent last, that one is
            # what the manager holds (a digest over every job's id and fence).
            last = max(self._sent)
            if self._digests.get(ack.seq) == self._digests.get(last):
                jobs = self._sent[last]
        if jobs is not None and ack.seq > self._base:
            self._base = ack.seq
            self._acked = jobs
            self._unanswered = 0
            for seq in [s for s in self._sent if s <= ack.seq]:
                del self._sent[seq]
        return False

    def next(
        self, reports: Iterable[tuple[p.RunningJob, bool]]
    ) -> tuple[int, int, tuple[p.RunningJob, ...], tuple[str, ...], int, int]:
        """Number the next heartbeat of ``reports`` (each with whether the job has a
        watchdog): ``(seq, base, jobs, gone, digest, running)``, ``jobs`` and
        ``gone`` relative to ``base`` (complete when ``base`` is 0)."""
        self.seq += 1
        current: dict[str, p.RunningJob] = {}
        digest = 0
        acked = self._acked
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
            if before is None or _changed(before, report, watched):
                changed.append(report)
        self._shares = shares
        if pending:
            for job_id in [j for j in pending if j not in current]:
                del pending[job_id]  # stopped: its owner's last checkpoint went with it
        base = self._base
        gone: tuple[str, ...] = ()
        if base:
            gone = tuple(job_id for job_id in acked if job_id not in current)
            if changed or gone:
                self._unanswered += 1
                if self._unanswered > ACK_PATIENCE:
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
        sent = dict(current)
        if base:
            listed = {report.job_id for report in changed}
            for job_id, report in current.items():
                before = acked.get(job_id)
                if before is not None and before is not report and job_id not in listed:
                    sent[job_id] = before
        self._sent[self.seq] = sent
        while len(self._sent) > _KEEP:
            del self._sent[min(self._sent)]
        self._digests[self.seq] = (digest, len(current))
        while len(self._digests) > _KEEP_DIGESTS:
            del self._digests[min(self._digests)]
        return self.seq, base, tuple(changed), gone, digest, len(current)


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
