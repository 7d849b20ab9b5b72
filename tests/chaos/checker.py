"""The chaos checker: invariants I1-I4 and I6-I9 of ``design-notes.md``, judged from
the jobs' own ledger and the facts the harness observed (kills, freezes, exits,
cancels, waits, manager views).

Pure: no processes, no broker, no database. :class:`~tests.chaos.harness.ChaosCluster`
feeds it a real run; ``test_checker.py`` feeds it synthetic ledgers, so that every
violation kind is shown to be caught. What each check looks at, and at what
resolution, is in ``docs/reliability.md`` ("The checker").
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from orchestratr_core.job import JobStatus
from orchestratr_core.placement import DEFAULT_KIND, Pool, parse_labels

FREEZE_SLACK = 0.01
"""A ledger line stamped up to this long after ``SIGSTOP`` was sent counts as
written before the freeze: the signal is delivered a moment after ``kill()`` returns."""

CANCEL_SLACK = 0.001
"""A copy that starts this close after a cancel returned is not "after" it (clock reads)."""


@dataclass
class Copy:
    """One running copy of a job as the ledger shows it: one call of the job function."""

    job: str
    name: str
    fence: int
    pid: int
    server: str
    start: float
    stop: float | None = None
    writes: list[float] = field(default_factory=list)
    copy_id: str = ""
    """Unique per call of the job function: tells two copies in one process apart."""
    got_checkpoint: int | None = None
    """I9: the token of the owner that wrote the checkpoint this copy started with
    (``None``: it started without one)."""
    kind: str = DEFAULT_KIND
    """The kind the copy was run as (the function of that kind was called)."""
    server_kinds: tuple[str, ...] = (DEFAULT_KIND,)
    """The kinds its server process runs."""
    server_labels: tuple[str, ...] = ()
    """Its server process's labels (``KEY=VALUE``)."""
    argument: str = ""
    """The job argument the copy was started with (an update restarts it with another)."""
    updates: list[tuple[float, str]] = field(default_factory=list)
    """The arguments the copy took in place (``@updatable``), with when."""

    def last_step(self, dead_at: float | None) -> float:
        """The last moment this copy did something (its start, a write)."""
        last = max([self.start, *self.writes])
        return min(last, dead_at) if dead_at is not None else last


@dataclass
class Process:
    """What the harness knows of one server process."""

    server: str
    pid: int
    max_workers: int
    killed_at: float | None = None
    """When ``kill -9`` had been sent: the process runs no instruction after it."""
    exited_at: float | None = None
    """When the harness saw the process gone (an upper bound of its end)."""
    frozen: list[tuple[float, float | None]] = field(default_factory=list)
    """(SIGSTOP sent, SIGCONT sent or None while still frozen)."""


@dataclass
class Cancel:
    """A cancel the test issued, and what it later saw of it."""

    at: float
    """When ``mark_on_deleting`` returned."""
    delivered: bool = True
    """False when the client could not broadcast it (broker unreachable): the
    manager's relay sends it later -- the documented gap of docs/reliability.md."""
    bound: float | None = None
    """Seconds after ``at`` by which every copy must have ended (set by the wait
    that saw the job final); ``None``: nobody checked the cancel took effect."""
    status: JobStatus | None = None
    """The storage status that wait saw (must be ``deleted``)."""
    asked: float | None = None
    """When the ``mark_on_deleting`` call that succeeded began (for figures)."""


@dataclass
class Hold:
    """A pause (or quarantine, or an update's restart) of a job the test saw take
    effect: I8."""

    at: float
    """When ``pause`` returned."""
    bound: float | None = None
    """Seconds after ``at`` by which every copy must have ended (``None``: unchecked)."""
    released: float | None = None
    """When ``resume`` was called (``None``: still held): copies may start after it."""


@dataclass
class Running:
    """I2: at instant ``at`` (when the harness saw them running), or at ``since +
    bound`` if that is earlier or ``at`` is None, each of ``jobs`` has exactly one
    live copy, off ``exclude`` servers and started at or after ``after``."""

    jobs: tuple[str, ...]
    since: float
    bound: float
    at: float | None = None
    exclude: tuple[str, ...] = ()
    after: float | None = None


@dataclass
class ViewSample:
    """The manager's view of some jobs, read at ``at``: job id -> (status, server name)."""

    at: float
    jobs: dict[str, tuple[JobStatus, str | None]]


@dataclass
class ViewWait:
    """I4: some sample taken by ``since + bound`` matches the ledger at its instant."""

    jobs: tuple[str, ...]
    since: float
    bound: float
    samples: list[ViewSample] = field(default_factory=list)


@dataclass
class Facts:
    """Everything the checker judges besides the ledger."""

    now: float
    """The instant of the check: a copy that has not ended runs until then."""
    processes: list[Process] = field(default_factory=list)
    cancels: dict[str, Cancel] = field(default_factory=dict)
    lost_confirms: set[str] = field(default_factory=set)
    """Jobs whose first publish lost its confirm, or whose message the outbox relay
    sent again under a new generation: the broker may hold two messages (of two
    generations), so two copies may overlap -- only under two tokens, and only
    within the duplicate grace (:meth:`Report.assert_ok`)."""
    running: list[Running] = field(default_factory=list)
    views: list[ViewWait] = field(default_factory=list)
    holds: dict[str, list[Hold]] = field(default_factory=dict)
    """I8: the pauses of each job."""
    placements: dict[str, Pool] = field(default_factory=dict)
    """I7: the pool (kind and constraints) each job was created with; a job not
    named is of the default kind without constraints."""


@dataclass
class Report:
    """What the checker found."""

    overlaps: list[tuple[str, str, str, float]] = field(default_factory=list)
    """I1: (job, server of the earlier copy, server of the later, seconds both ran)."""
    fence_regressions: list[tuple[str, int, int]] = field(default_factory=list)
    stale_writes: int = 0
    """Writes by a copy while another copy with a higher token ran (refused downstream)."""
    unfenced_stale_writes: int = 0
    """Writes during an overlap that a downstream system cannot refuse (equal tokens)."""
    ran_after_cancel: list[tuple[str, str, float]] = field(default_factory=list)
    """Copies started after a cancel the client could not broadcast: (job, server, seconds run)."""
    over_capacity: list[tuple[str, int, int]] = field(default_factory=list)
    duplicate_copies: list[tuple[str, str, float]] = field(default_factory=list)
    """Two copies run by two messages of a job whose publish lost its confirm: (job,
    server of the lower token, seconds both ran)."""
    started_after_cancel: list[tuple[str, str, float]] = field(default_factory=list)
    """I3: copies started after a delivered cancel: (job, server, seconds after the cancel)."""
    outlived_cancel: list[tuple[str, str, float]] = field(default_factory=list)
    """I3: copies that ended later than the bound after the cancel (inf: still running)."""
    cancel_unchecked: list[str] = field(default_factory=list)
    """I3: cancelled jobs that no wait saw final (no live copy, ``deleted``)."""
    not_deleted: list[tuple[str, str]] = field(default_factory=list)
    not_running: list[tuple[str, float, int]] = field(default_factory=list)
    """I2: (job, seconds after the fault it was judged, live copies then: not 1)."""
    view_not_converged: list[tuple[str, ...]] = field(default_factory=list)
    """I4: mismatches of the last sample of a wait that never matched in its bound."""
    started_while_held: list[tuple[str, str, float]] = field(default_factory=list)
    """I8: copies started after a pause and before its resume: (job, server, seconds after)."""
    outlived_hold: list[tuple[str, str, float]] = field(default_factory=list)
    """I8: copies that ended later than the bound after the pause (inf: still running)."""
    checkpoint_from_newer: list[tuple[str, int, int]] = field(default_factory=list)
    """I9: a copy started with a checkpoint of a larger token: (job, its token, the writer's)."""
    checkpoint_regressed: list[tuple[str, int, int]] = field(default_factory=list)
    """I9: a later owner started with an older owner's checkpoint than an earlier
    owner got: (job, the earlier owner's writer token, the later one's)."""
    misplaced: list[tuple[str, str, str]] = field(default_factory=list)
    """I7: (job, server, why) for copies run where the job may not run."""

    def assert_ok(self, *, cancel_grace: float = 0.0, duplicate_grace: float = 0.0) -> None:
        """No invariant violated. ``cancel_grace``: a copy started after a cancel the
        client could not broadcast (broker down) is tolerated if it ran no longer
        than this. ``duplicate_grace``: two copies run by two messages of a job
        whose publish lost its confirm are tolerated if the overlap lasted no
        longer than this. Both gaps are documented in docs/reliability.md; by
        default neither is tolerated."""
        problems = {
            "duplicate message's copies overlapped too long": [
                d for d in self.duplicate_copies if d[2] > duplicate_grace
            ],
            "I1 overlapping copies": self.overlaps,
            "fencing token did not grow": self.fence_regressions,
            "stale writes with a token not lower than the owner's": self.unfenced_stale_writes,
            "I2 not running exactly once within the bound": self.not_running,
            "I3 ran after cancel": [r for r in self.ran_after_cancel if r[2] > cancel_grace],
            "I3 started after a delivered cancel": self.started_after_cancel,
            "I3 copy outlived the cancel's bound": self.outlived_cancel,
            "I3 cancel never checked final": self.cancel_unchecked,
            "I3 cancelled job not deleted": self.not_deleted,
            "I4 manager view never converged": self.view_not_converged,
            "I6 over capacity": self.over_capacity,
            "I8 started while held": self.started_while_held,
            "I8 copy outlived the hold's bound": self.outlived_hold,
            "I9 checkpoint from a newer owner": self.checkpoint_from_newer,
            "I9 checkpoint went back to an older owner's": self.checkpoint_regressed,
            "I7 ran where it may not": self.misplaced,
        }
        bad = {k: v for k, v in problems.items() if v}
        assert not bad, f"invariants violated: {bad}"


# -- the ledger ---------------------------------------------------------------------------


def parse_ledger(lines: Iterable[str]) -> list[Copy]:
    """Copies from ledger lines (``tests/chaos/jobs.py``), in order of their start.
    A line that does not parse (the last one, still being written) is skipped."""
    out: list[Copy] = []
    current: dict[str, Copy] = {}
    for raw in lines:
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        # Older ledgers had no copy id: one copy per (process, job) at a time.
        key = str(line.get("copy") or f"{line['pid']}/{line['job']}")
        if line["e"] == "start":
            copy = Copy(
                line["job"],
                line["name"],
                line["fence"],
                line["pid"],
                line["server"],
                line["t"],
                copy_id=key,
                got_checkpoint=line.get("cpf"),
                kind=line.get("kind", DEFAULT_KIND),
                server_kinds=tuple(filter(None, line.get("server_kinds", DEFAULT_KIND).split(","))),
                server_labels=tuple(filter(None, line.get("server_labels", "").split(","))),
                argument=str(line.get("arg", "")),
            )
            current[key] = copy
            out.append(copy)
        elif line["e"] == "write" and key in current:
            current[key].writes.append(line["t"])
        elif line["e"] == "update" and key in current:
            current[key].updates.append((line["t"], str(line.get("arg", ""))))
        elif line["e"] == "stop" and key in current:
            current[key].stop = line["t"]
            del current[key]
    return out


def read_ledger(directory: Path) -> list[Copy]:
    """Every copy the ledger files (one per process) in ``directory`` record."""
    out: list[Copy] = []
    for path in sorted(directory.glob("*.jsonl")):
        out.extend(parse_ledger(path.read_text(encoding="utf-8").splitlines()))
    return out


def copy_end(copy: Copy, process: Process | None) -> float | None:
    """When a copy ended; ``None`` while it runs. Its ``stop`` record, or its
    process's kill (or observed exit) if earlier; a copy whose process froze after
    its last step, and that took no step after (at most its stop), ended at the freeze."""
    end = copy.stop
    if process is None:
        return end
    for dead in (process.killed_at, process.exited_at):
        if dead is not None and (end is None or dead < end):
            end = dead
    last = max([copy.start, *copy.writes])
    for since, _ in sorted(process.frozen):
        if last <= since + FREEZE_SLACK and (end is None or since < end):
            return max(since, last)
    return end


@dataclass
class _Span:
    copy: Copy
    end: float | None
    until: float

    def live_at(self, t: float) -> bool:
        return self.copy.start <= t and (self.end is None or t < self.end)


def _spans(copies: list[Copy], facts: Facts) -> list[_Span]:
    procs = {p.pid: p for p in facts.processes}
    out = []
    for c in copies:
        end = copy_end(c, procs.get(c.pid))
        out.append(_Span(c, end, end if end is not None else facts.now))
    return out


def live_at(copies: list[Copy], facts: Facts, t: float) -> list[Copy]:
    """The copies running at instant ``t``."""
    return [s.copy for s in _spans(copies, facts) if s.live_at(t)]


def view_mismatches(sample: ViewSample, live: list[Copy]) -> list[str]:
    """I4: jobs whose status/server in ``sample`` disagrees with the ``live`` copies."""
    running = {c.job: c for c in live}
    wrong = []
    for job_id, (status, server) in sample.jobs.items():
        copy = running.get(job_id)
        if copy is None:
            if status is JobStatus.PROCESSING:
                wrong.append(f"{job_id}: view says processing on {server}, ledger: not running")
        elif status is not JobStatus.PROCESSING or server != copy.server:
            wrong.append(f"{job_id}: view {status.value} on {server}, ledger on {copy.server}")
    return wrong


# -- the checks ----------------------------------------------------------------------------


def check(copies: list[Copy], facts: Facts, *, final: bool = True) -> Report:
    """Judge I1, I2, I3, I4, I6 and I7 over a whole ledger. ``final``: the test is
    done with its cancels, so one that no wait saw final is a violation."""
    report = Report()
    spans = _spans(copies, facts)
    by_job: dict[str, list[_Span]] = {}
    for s in spans:
        by_job.setdefault(s.copy.job, []).append(s)
    for job, js in by_job.items():
        js.sort(key=lambda s: s.copy.start)
        _one_runner(job, js, job in facts.lost_confirms, report)
        cancel = facts.cancels.get(job)
        if cancel is not None:
            _cancel_is_final(job, js, cancel, report)
        for hold in facts.holds.get(job, ()):
            _held_means_held(job, js, hold, report)
        _checkpoints_follow_the_fence(job, js, report)
    for job, cancel in facts.cancels.items():
        if cancel.bound is None:
            if final:
                report.cancel_unchecked.append(job)
        elif cancel.status is not JobStatus.DELETED:
            report.not_deleted.append((job, cancel.status.value if cancel.status else "unknown"))
    for r in facts.running:
        _nothing_lost(r, spans, facts.now, report)
    for w in facts.views:
        _converges(w, spans, report)
    _capacity(spans, facts, report)
    _placement(copies, facts, report)
    return report


def _placement(copies: list[Copy], facts: Facts, report: Report) -> None:
    """I7: every copy ran on a server that runs its job's kind and whose labels
    satisfy its constraints, and was run by the function of that kind."""
    for c in copies:
        pool = facts.placements.get(c.job, Pool())
        labels = parse_labels(c.server_labels)
        if c.kind != pool.kind:
            report.misplaced.append((c.job, c.server, f"run as kind {c.kind!r}, not {pool.kind!r}"))
        elif not pool.accepts(c.server_kinds, labels):
            report.misplaced.append(
                (
                    c.job,
                    c.server,
                    f"pool {pool.key} on a server running {','.join(c.server_kinds)} "
                    f"with labels {','.join(c.server_labels) or '-'}",
                )
            )


def _one_runner(job: str, js: list[_Span], lost_confirm: bool, report: Report) -> None:
    """I1 over every pair of copies of one job, in one process or two."""
    for i, a in enumerate(js):
        for b in js[i + 1 :]:
            ca, cb = a.copy, b.copy
            both_until = min(a.until, b.until)
            if both_until <= cb.start:
                # A restart in place (the function raised; same process, same delivery)
                # keeps its token; a new owner's must be larger.
                same_owner = cb.fence == ca.fence and cb.pid == ca.pid
                if cb.fence <= ca.fence and not same_owner:
                    report.fence_regressions.append((job, ca.fence, cb.fence))
                continue
            # Overlap [b.start, both_until): the lower token's writes are refused
            # downstream; with equal tokens no write of either can be.
            inside = [(c, w) for c in (ca, cb) for w in c.writes if cb.start <= w < both_until]
            if ca.fence == cb.fence:
                report.unfenced_stale_writes += len(inside)
                report.fence_regressions.append((job, ca.fence, cb.fence))
            else:
                low = ca if ca.fence < cb.fence else cb
                report.stale_writes += sum(1 for c, _ in inside if c is low)
            seconds = both_until - cb.start
            if lost_confirm and ca.fence != cb.fence:
                low = ca if ca.fence < cb.fence else cb
                report.duplicate_copies.append((job, low.server, seconds))
                continue
            report.overlaps.append((job, ca.server, cb.server, seconds))
            if cb.fence < ca.fence:
                report.fence_regressions.append((job, ca.fence, cb.fence))


def _cancel_is_final(job: str, js: list[_Span], cancel: Cancel, report: Report) -> None:
    """I3: nothing starts after the cancel; everything running ends within its bound."""
    for s in js:
        c = s.copy
        if c.start > cancel.at + CANCEL_SLACK:
            if cancel.delivered:
                report.started_after_cancel.append((job, c.server, c.start - cancel.at))
            else:
                report.ran_after_cancel.append((job, c.server, s.until - c.start))
        if cancel.bound is not None:
            after = (s.end if s.end is not None else math.inf) - cancel.at
            if after > cancel.bound:
                report.outlived_cancel.append((job, c.server, after))


def _held_means_held(job: str, js: list[_Span], hold: Hold, report: Report) -> None:
    """I8: nothing starts while held; everything running ends within the bound."""
    for s in js:
        c = s.copy
        started_inside = c.start > hold.at + CANCEL_SLACK and (
            hold.released is None or c.start < hold.released
        )
        if started_inside:
            report.started_while_held.append((job, c.server, c.start - hold.at))
        if hold.bound is not None and c.start <= hold.at + CANCEL_SLACK:
            after = (s.end if s.end is not None else math.inf) - hold.at
            if after > hold.bound:
                report.outlived_hold.append((job, c.server, after))


def _checkpoints_follow_the_fence(job: str, js: list[_Span], report: Report) -> None:
    """I9: a copy starts with a checkpoint written under a token no larger than its
    own, and owners (by token) never get an older writer's than an earlier owner got."""
    best: int | None = None
    for s in sorted(js, key=lambda s: (s.copy.fence, s.copy.start)):
        got = s.copy.got_checkpoint
        if got is None:
            continue
        if got > s.copy.fence:
            report.checkpoint_from_newer.append((job, s.copy.fence, got))
        if best is not None and got < best:
            report.checkpoint_regressed.append((job, best, got))
        best = got if best is None else max(best, got)


def _nothing_lost(r: Running, spans: list[_Span], now: float, report: Report) -> None:
    """I2: exactly one live copy of each job at the instant judged."""
    at = min(r.at if r.at is not None else math.inf, r.since + r.bound)
    if at > now:
        return  # the bound has not passed yet
    for job in r.jobs:
        n = sum(
            1
            for s in spans
            if s.copy.job == job
            and s.copy.server not in r.exclude
            and (r.after is None or s.copy.start >= r.after)
            and s.live_at(at)
        )
        if n != 1:
            report.not_running.append((job, at - r.since, n))


def _converges(w: ViewWait, spans: list[_Span], report: Report) -> None:
    """I4: some sample within the bound matches the ledger at its instant."""
    last: list[str] = ["no sample of the view was taken"]
    for sample in w.samples:
        if sample.at > w.since + w.bound:
            break
        last = view_mismatches(sample, [s.copy for s in spans if s.live_at(sample.at)])
        if not last:
            return
    report.view_not_converged.append(tuple(last[:5]))


def _capacity(spans: list[_Span], facts: Facts, report: Report) -> None:
    """I6: per process, copies running at one instant never above ``max_workers``."""
    for proc in facts.processes:
        events: list[tuple[float, int]] = []
        for s in spans:
            if s.copy.pid == proc.pid:
                events += [(s.copy.start, 1), (s.until, -1)]
        running = peak = 0
        for _, delta in sorted(events):  # at one instant an end comes before a start
            running += delta
            peak = max(peak, running)
        if peak > proc.max_workers:
            report.over_capacity.append((proc.server, peak, proc.max_workers))
