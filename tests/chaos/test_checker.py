"""The chaos checker's own tests: synthetic ledgers, each with one known violation,
must make ``check()`` fail with that violation; known-good ones must pass. Pure
(no broker, no database, no processes): they run in the default suite.

Times are seconds from an arbitrary origin; servers write every 0.1 s as the
real job function does (``tests/chaos/jobs.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
from pathlib import Path

import pytest

from orchestratr_core.errors import BackendUnavailable, PublishError
from orchestratr_core.job import JobStatus
from orchestratr_core.logs import KeyValueFormatter
from orchestratr_core.placement import Pool
from tests.chaos import checker
from tests.chaos.checker import (
    Cancel,
    Copy,
    Facts,
    Hold,
    Process,
    Report,
    Running,
    ViewSample,
    ViewWait,
    check,
    parse_ledger,
)
from tests.chaos.harness import (
    CHAOS_JSON,
    CHAOS_RUNS,
    REPORT_MARGIN,
    ROOT,
    Timings,
    lost_confirm,
    record_figure,
    resent_in,
    results_path,
    seeded,
)

NOW = 100.0
RUNNING = JobStatus.PROCESSING


def copy(
    job: str,
    server: str,
    start: float,
    stop: float | None = None,
    *,
    fence: int = 1,
    pid: int | None = None,
    last_write: float | None = None,
    copy_id: str = "",
) -> Copy:
    """A copy writing every 0.1 s from ``start`` to ``last_write`` (default: its
    stop, or NOW for one still running)."""
    end = last_write if last_write is not None else (stop if stop is not None else NOW)
    writes = [round(start + 0.1 * i, 3) for i in range(int((end - start) / 0.1) + 1)]
    return Copy(
        job,
        job,
        fence,
        pid if pid is not None else _PIDS[server],
        server,
        start,
        stop,
        writes,
        copy_id or f"{server}/{job}/{start}",
    )


_PIDS = {"s1": 101, "s2": 102, "s3": 103}


def procs(capacity: int = 10, **changes: dict[str, object]) -> list[Process]:
    """Processes s1-s3 (pids 101-103), with ``changes`` per server name."""
    out = []
    for name, pid in _PIDS.items():
        proc = Process(name, pid, capacity)
        for key, value in changes.get(name, {}).items():
            setattr(proc, key, value)
        out.append(proc)
    return out


def rounded(
    items: list[tuple[str, str, float]] | list[tuple[str, str, str, float]],
) -> list[object]:
    """Findings with their seconds rounded to the millisecond."""
    return [tuple(round(x, 3) if isinstance(x, float) else x for x in item) for item in items]


def facts(**kwargs: object) -> Facts:
    kwargs.setdefault("processes", procs())
    return Facts(now=NOW, **kwargs)  # type: ignore[arg-type]


def fails(report: Report, match: str, **grace: float) -> None:
    with pytest.raises(AssertionError, match=match):
        report.assert_ok(**grace)


# -- I1: one runner --------------------------------------------------------------------------


def test_a_job_that_moves_once_after_its_copy_stopped_passes() -> None:
    ledger = [copy("a", "s1", 1.0, 5.0, fence=1), copy("a", "s2", 5.2, fence=2)]
    check(ledger, facts()).assert_ok()


def test_overlapping_copies_in_two_processes_fail() -> None:
    ledger = [copy("a", "s1", 1.0, 6.0, fence=1), copy("a", "s2", 5.0, fence=2)]
    report = check(ledger, facts())
    assert rounded(report.overlaps) == [("a", "s1", "s2", 1.0)]
    fails(report, "I1 overlapping copies")


def test_overlapping_copies_in_one_process_fail() -> None:
    """The old checker keyed copies by (process, job) and skipped same-process pairs."""
    ledger = [
        copy("a", "s1", 1.0, 6.0, fence=1, copy_id="x"),
        copy("a", "s1", 5.0, fence=2, copy_id="y"),
    ]
    report = check(ledger, facts())
    assert rounded(report.overlaps) == [("a", "s1", "s1", 1.0)]
    fails(report, "I1 overlapping copies")


def test_a_copy_lasts_until_its_stop_record_not_its_last_write() -> None:
    """A copy that stopped writing at 4.0 but returned only at 6.0 (a cooperative
    job slow to return, a release before it had ended) still ran until 6.0."""
    ledger = [copy("a", "s1", 1.0, 6.0, last_write=4.0), copy("a", "s2", 5.0, fence=2)]
    report = check(ledger, facts())
    assert rounded(report.overlaps) == [("a", "s1", "s2", 1.0)]
    fails(report, "I1 overlapping copies")


def test_a_copy_without_a_stop_record_runs_until_its_process_is_killed() -> None:
    killed = procs(s1={"killed_at": 5.0})
    good = [copy("a", "s1", 1.0, last_write=4.95), copy("a", "s2", 5.1, fence=2)]
    check(good, facts(processes=killed)).assert_ok()
    early = [copy("a", "s1", 1.0, last_write=4.5), copy("a", "s2", 4.9, fence=2)]
    fails(check(early, facts(processes=killed)), "I1 overlapping copies")
    # Not killed and no stop record: it still runs, however long ago it wrote.
    fails(check(early, facts()), "I1 overlapping copies")


def test_a_frozen_copy_that_stops_at_the_thaw_without_a_step_ended_at_the_freeze() -> None:
    frozen = procs(s1={"frozen": [(5.0, 15.0)]})
    good = [copy("a", "s1", 1.0, 15.01, last_write=4.95), copy("a", "s2", 13.0, fence=2)]
    check(good, facts(processes=frozen)).assert_ok()
    # It wrote once more after the thaw: it ran on while s2 held the job.
    wrote = good[0]
    wrote.writes.append(15.005)
    fails(check([wrote, good[1]], facts(processes=frozen)), "I1 overlapping copies")


def test_a_new_owner_with_a_token_not_larger_fails() -> None:
    ledger = [copy("a", "s1", 1.0, 5.0, fence=2), copy("a", "s2", 5.2, fence=2)]
    report = check(ledger, facts())
    assert report.fence_regressions == [("a", 2, 2)]
    fails(report, "fencing token did not grow")


def test_a_restart_in_place_keeps_its_token_but_a_lower_one_in_one_process_fails() -> None:
    """A job that raised is restarted by the same server on the same delivery: one
    ownership, one token. Another process, or a smaller token, is no restart."""
    in_place = [
        copy("a", "s1", 1.0, 2.0, fence=4, copy_id="x"),
        copy("a", "s1", 2.5, fence=4, copy_id="y"),
    ]
    check(in_place, facts()).assert_ok()
    lower = [
        copy("a", "s1", 1.0, 2.0, fence=4, copy_id="x"),
        copy("a", "s1", 2.5, fence=3, copy_id="y"),
    ]
    fails(check(lower, facts()), "fencing token did not grow")
    elsewhere = [copy("a", "s1", 1.0, 2.0, fence=4), copy("a", "s2", 2.5, fence=4)]
    fails(check(elsewhere, facts()), "fencing token did not grow")


def test_a_stale_write_with_a_token_not_lower_than_the_owners_fails() -> None:
    """Overlapping copies with one token: no downstream system can refuse either."""
    ledger = [copy("a", "s1", 1.0, 5.5, fence=3), copy("a", "s2", 5.0, fence=3)]
    report = check(ledger, facts())
    assert report.unfenced_stale_writes == 10  # 5 writes each in [5.0, 5.5)
    fails(report, "stale writes with a token not lower")


def test_an_overlap_where_the_later_copy_has_the_lower_token_is_a_regression_too() -> None:
    ledger = [copy("a", "s1", 1.0, 5.5, fence=3), copy("a", "s2", 5.0, fence=2)]
    report = check(ledger, facts())
    assert ("a", 3, 2) in report.fence_regressions
    assert report.stale_writes == 5  # the lower token's writes in [5.0, 5.5)
    fails(report, "fencing token did not grow")


# -- the duplicate-message gap (docs/reliability.md) ---------------------------------------


def test_copies_of_a_duplicate_message_pass_only_within_the_grace() -> None:
    report = Report(duplicate_copies=[("job-1", "s3", 0.9)])
    report.assert_ok(duplicate_grace=3.0)
    with pytest.raises(AssertionError, match="duplicate message's copies overlapped too long"):
        report.assert_ok()  # by default a duplicate is no more tolerated than any overlap
    with pytest.raises(AssertionError, match="overlapped too long"):
        Report(duplicate_copies=[("job-1", "s3", 3.5)]).assert_ok(duplicate_grace=3.0)


def test_a_duplicate_after_a_lost_confirm_is_excused_only_within_one_heartbeat() -> None:
    grace = Timings().duplicate_grace
    ledger = [copy("a", "s1", 1.0, 6.0, fence=1), copy("a", "s2", 5.0, fence=2)]
    report = check(ledger, facts(lost_confirms={"a"}))
    assert rounded(report.duplicate_copies) == [("a", "s1", 1.0)]
    assert rounded(report.overlaps) == []
    report.assert_ok(duplicate_grace=grace)
    longer = [copy("a", "s1", 1.0, 7.0, fence=1), copy("a", "s2", 5.0, fence=2)]
    fails(check(longer, facts(lost_confirms={"a"})), "overlapped too long", duplicate_grace=grace)
    # The same overlap for a job whose publish was confirmed is no gap at all.
    fails(check(ledger, facts()), "I1 overlapping copies", duplicate_grace=grace)


def test_an_excused_duplicate_still_gets_the_fence_checks() -> None:
    """Two messages of one generation with equal tokens: downstream cannot tell
    the copies apart, so the pair is a violation even for a lost confirm."""
    ledger = [copy("a", "s1", 1.0, 5.5, fence=4), copy("a", "s2", 5.0, fence=4)]
    report = check(ledger, facts(lost_confirms={"a"}))
    assert report.unfenced_stale_writes == 10
    fails(report, "fencing token did not grow", duplicate_grace=10.0)


def test_a_job_the_relay_sent_again_is_read_from_the_managers_log() -> None:
    """The harness counts a job the relay re-sent (under a new generation) like a
    lost confirm: it finds it in the manager's log line, as the manager writes it."""
    record = logging.LogRecord(
        "orchestratr.manager",
        logging.INFO,
        __file__,
        1,
        "outbox relay re-sends job %s under generation %d",
        ("01a2-job", 2),
        None,
    )
    line = KeyValueFormatter().format(record)
    assert resent_in(line + "\n" + line.replace("01a2-job", "other")) == {"01a2-job", "other"}
    assert resent_in("outbox relay sent 3 item(s)") == set()


def test_the_grace_is_the_documented_heartbeat_plus_the_stated_margin() -> None:
    """docs/reliability.md promises the lower copy stops "within one heartbeat";
    the chaos timings table there states that heartbeat."""
    t = Timings()
    assert t.duplicate_grace == t.heartbeat_interval + REPORT_MARGIN
    assert t.cancel_grace == t.heartbeat_interval + REPORT_MARGIN
    assert t.cancel_bound == t.stop_grace + REPORT_MARGIN
    doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert f"| server heartbeat to manager | {t.heartbeat_interval:g} s |" in doc
    assert f"| stop grace | {t.stop_grace:g} s |" in doc
    assert f"{REPORT_MARGIN:g} s margin" in doc
    assert "within one heartbeat" in doc


def test_only_a_publish_the_broker_may_have_stored_counts_as_a_lost_confirm() -> None:
    assert lost_confirm(PublishError("RabbitMQ did not confirm the job message within 5s"))
    assert lost_confirm(PublishError("publishing the job message failed: ConnectionResetError"))
    assert not lost_confirm(PublishError("RabbitMQ refused to store the job message (nack)"))
    assert not lost_confirm(PublishError("RabbitMQ could not route the job message to 'x'"))
    assert not lost_confirm(BackendUnavailable("RabbitMQ at h is unreachable"))


# -- I3: cancel is final -----------------------------------------------------------------------


def _cancelled(at: float = 5.0, bound: float = 3.0, **kw: object) -> dict[str, Cancel]:
    return {"a": Cancel(at=at, bound=bound, status=JobStatus.DELETED, **kw)}  # type: ignore[arg-type]


def test_a_cancel_that_stops_the_copy_within_its_bound_passes() -> None:
    check([copy("a", "s1", 1.0, 5.3)], facts(cancels=_cancelled())).assert_ok()


def test_a_copy_of_a_cancelled_job_still_running_after_the_bound_fails() -> None:
    """The old checker looked only at copies started after the cancel."""
    report = check([copy("a", "s1", 1.0)], facts(cancels=_cancelled()))
    assert rounded(report.outlived_cancel) == [("a", "s1", math.inf)]
    fails(report, "I3 copy outlived the cancel's bound")
    late = check([copy("a", "s1", 1.0, 8.5)], facts(cancels=_cancelled()))
    assert rounded(late.outlived_cancel) == [("a", "s1", 3.5)]
    fails(late, "I3 copy outlived")


def test_a_copy_started_after_a_delivered_cancel_fails() -> None:
    ledger = [copy("a", "s1", 1.0, 5.1), copy("a", "s2", 5.5, 5.6, fence=2)]
    report = check(ledger, facts(cancels=_cancelled()))
    assert rounded(report.started_after_cancel) == [("a", "s2", 0.5)]
    fails(report, "I3 started after a delivered cancel", cancel_grace=10.0)


def test_a_copy_started_after_an_undelivered_cancel_is_excused_only_within_the_grace() -> None:
    grace = Timings().cancel_grace
    cancels = _cancelled(delivered=False)
    short = [copy("a", "s2", 5.5, 6.5)]
    check(short, facts(cancels=cancels)).assert_ok(cancel_grace=grace)
    fails(check(short, facts(cancels=cancels)), "I3 ran after cancel")  # no grace by default
    long = [copy("a", "s2", 5.5, 7.9)]
    fails(check(long, facts(cancels=cancels)), "I3 ran after cancel", cancel_grace=grace)


def test_a_cancel_nobody_saw_final_or_not_deleted_fails() -> None:
    unchecked = {"a": Cancel(at=5.0)}
    fails(check([copy("a", "s1", 1.0, 5.1)], facts(cancels=unchecked)), "I3 cancel never checked")
    # In the middle of a test (the wait comes later) it is not yet a violation.
    check([copy("a", "s1", 1.0, 5.1)], facts(cancels=unchecked), final=False).assert_ok()
    stuck = {"a": Cancel(at=5.0, bound=3.0, status=JobStatus.DELETING)}
    report = check([copy("a", "s1", 1.0, 5.1)], facts(cancels=stuck))
    assert report.not_deleted == [("a", "deleting")]
    fails(report, "I3 cancelled job not deleted")


# -- I2: nothing lost ------------------------------------------------------------------------


def test_a_job_running_again_within_the_bound_passes() -> None:
    killed = procs(s1={"killed_at": 5.0})
    ledger = [copy("a", "s1", 1.0, last_write=4.95), copy("a", "s2", 5.4, fence=2)]
    running = [Running(("a",), since=5.0, bound=3.0, at=5.5, exclude=("s1",))]
    check(ledger, facts(processes=killed, running=running)).assert_ok()


def test_a_late_restart_beyond_the_bound_fails() -> None:
    killed = procs(s1={"killed_at": 5.0})
    ledger = [copy("a", "s1", 1.0, last_write=4.95), copy("a", "s2", 8.5, fence=2)]
    running = [Running(("a",), since=5.0, bound=3.0, exclude=("s1",))]
    report = check(ledger, facts(processes=killed, running=running))
    assert report.not_running == [("a", 3.0, 0)]
    fails(report, "I2 not running exactly once")
    # Seen running, but only after the bound: judged at the bound.
    seen_late = [Running(("a",), since=5.0, bound=3.0, at=8.6, exclude=("s1",))]
    fails(check(ledger, facts(processes=killed, running=seen_late)), "I2 not running")


# -- I4: convergence -------------------------------------------------------------------------


def _view(at: float, status: JobStatus, server: str | None) -> ViewSample:
    return ViewSample(at, {"a": (status, server)})


def test_a_view_that_catches_up_within_the_bound_passes() -> None:
    ledger = [copy("a", "s1", 1.0, 5.0), copy("a", "s2", 5.2, fence=2)]
    samples = [_view(5.5, RUNNING, "s1"), _view(6.0, RUNNING, "s2")]
    views = [ViewWait(("a",), since=5.0, bound=5.0, samples=samples)]
    check(ledger, facts(views=views)).assert_ok()


def test_a_view_that_never_converges_fails() -> None:
    ledger = [copy("a", "s1", 1.0, 5.0), copy("a", "s2", 5.2, fence=2)]
    samples = [_view(t, RUNNING, "s1") for t in (5.5, 7.0, 9.5)]
    samples.append(_view(10.5, RUNNING, "s2"))  # right, but after the bound
    views = [ViewWait(("a",), since=5.0, bound=5.0, samples=samples)]
    report = check(ledger, facts(views=views))
    assert report.view_not_converged == [("a: view processing on s1, ledger on s2",)]
    fails(report, "I4 manager view never converged")
    stopped = [copy("a", "s1", 1.0, 5.0)]
    ghost = [ViewWait(("a",), 5.0, 5.0, [_view(6.0, RUNNING, "s1")])]
    fails(check(stopped, facts(views=ghost)), "I4 manager view never converged")


# -- I6: capacity ----------------------------------------------------------------------------


def test_a_server_at_capacity_passes_and_one_over_it_fails() -> None:
    full = [copy(f"j{i}", "s1", 1.0 + i * 0.01) for i in range(2)]
    handover = [copy("k0", "s2", 1.0, 5.0), copy("k1", "s2", 5.0), copy("k2", "s2", 2.0)]
    check(full + handover, facts(processes=procs(capacity=2))).assert_ok()  # end, then start
    over = [*full, copy("j2", "s1", 3.0, 4.0)]
    report = check(over, facts(processes=procs(capacity=2)))
    assert report.over_capacity == [("s1", 3, 2)]
    fails(report, "I6 over capacity")


# -- the ledger ------------------------------------------------------------------------------


def _line(e: str, t: float, copy_id: str, job: str = "a", fence: int = 1) -> str:
    return json.dumps(
        {"e": e, "copy": copy_id, "job": job, "name": job, "fence": fence, "pid": 7,
         "server": "s1", "t": t}
    )  # fmt: skip


def test_the_ledger_tells_two_copies_in_one_process_apart() -> None:
    lines = [
        _line("start", 1.0, "x"),
        _line("write", 1.1, "x"),
        _line("start", 1.5, "y", fence=2),
        _line("write", 1.6, "x"),
        _line("write", 1.6, "y", fence=2),
        _line("stop", 2.0, "x"),
        '{"e": "write", "copy": "y", "jo',  # torn last line of a killed process
    ]
    copies = parse_ledger(lines)
    assert [(c.copy_id, c.start, c.stop, c.writes) for c in copies] == [
        ("x", 1.0, 2.0, [1.1, 1.6]),
        ("y", 1.5, None, [1.6]),
    ]
    report = check(copies, Facts(now=3.0, processes=[Process("s1", 7, 10)]))
    assert rounded(report.overlaps) == [("a", "s1", "s1", 0.5)]


def test_a_full_good_run_passes() -> None:
    """A kill -9 and a move, a cancel that took effect, a view that caught up, a
    server at capacity: everything a real run has, nothing violated."""
    processes = procs(capacity=2, s1={"killed_at": 5.0})
    ledger = [
        copy("a", "s1", 1.0, last_write=4.95, fence=1),
        copy("b", "s1", 1.0, last_write=4.95, fence=1),
        copy("a", "s2", 5.1, fence=2),
        copy("b", "s2", 5.2, fence=2),
        copy("c", "s3", 1.0, 6.05, fence=1),
    ]
    cancels = {"c": Cancel(at=6.0, bound=3.0, status=JobStatus.DELETED)}
    running = [Running(("a", "b"), since=5.0, bound=3.0, at=5.3, exclude=("s1",))]
    views = [
        ViewWait(("a", "b", "c"), 6.0, 5.0, [
            ViewSample(6.5, {"a": (RUNNING, "s2"), "b": (RUNNING, "s2"),
                             "c": (JobStatus.DELETED, None)}),
        ])
    ]  # fmt: skip
    check(ledger, Facts(NOW, processes, cancels, set(), running, views)).assert_ok()


# -- the harness's bookkeeping ---------------------------------------------------------------


def test_figures_are_appended_with_their_bound_test_and_commit(tmp_path: Path) -> None:
    path = tmp_path / "chaos.json"
    path.write_text(json.dumps({"runs": 5, "faults": {"kill -9": {"median": 0.1}}}))
    record_figure("kill -9", 0.123456, 3.0, path=path)
    record_figure("SIGTERM", 0.5, 4.0, path=path)
    data = json.loads(path.read_text())
    assert data["faults"] == {"kill -9": {"median": 0.1}}  # the summary is kept
    first, second = data["records"]
    assert (first["figure"], first["value"], first["bound"]) == ("kill -9", 0.123, 3.0)
    assert second["figure"] == "SIGTERM"
    assert "test_figures_are_appended" in first["test"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert first["commit"].removesuffix("-dirty") == head.stdout.strip()
    assert first["at"].endswith("+00:00")


def test_routine_runs_append_lines_to_a_git_ignored_file(tmp_path: Path) -> None:
    path = tmp_path / "chaos-runs.jsonl"
    record_figure("kill -9", 0.1, 3.0, path=path)
    record_figure("SIGTERM", 0.5, 4.0, path=path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["figure"], r["value"], r["bound"]) for r in lines] == [
        ("kill -9", 0.1, 3.0),
        ("SIGTERM", 0.5, 4.0),
    ]
    # By default figures go to a file git ignores; into chaos.json only on purpose.
    assert results_path("") == CHAOS_RUNS
    assert results_path("record") == CHAOS_JSON
    assert results_path("off") is None
    assert results_path("/tmp/x.json") == Path("/tmp/x.json")
    git = ["git", "-C", str(ROOT)]
    ignored = subprocess.run([*git, "check-ignore", "-q", str(CHAOS_RUNS)], check=False)
    assert ignored.returncode == 0
    tracked = subprocess.run(
        [*git, "ls-files", "--error-unmatch", str(CHAOS_JSON)], capture_output=True, check=False
    )
    assert tracked.returncode == 0


def test_the_daily_seed_is_the_utc_date_and_chaos_seed_overrides_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import datetime as dt

    monkeypatch.delenv("CHAOS_SEED", raising=False)
    _, seed = seeded(daily=True)
    assert seed == int(dt.datetime.now(dt.UTC).strftime("%Y%m%d"))
    assert f"CHAOS_SEED={seed}" in capsys.readouterr().out
    monkeypatch.setenv("CHAOS_SEED", "42")
    rng, seed = seeded(daily=True)
    assert seed == 42
    assert rng.random() == seeded(42)[0].random()


@pytest.mark.postgresql
@pytest.mark.parametrize(
    ("url", "port"),
    [
        ("postgresql://postgres@127.0.0.1:5432", "5432"),
        ("postgresql://u:p@db.example:6543/x", "6543"),
        ("postgresql://db.example", "5432"),
    ],
)
def test_pg_cluster_names_the_cluster_on_the_test_urls_port(url: str, port: str) -> None:
    """The one source of truth for .ci/services (start) and the harness (restart)."""
    out = subprocess.run(
        ["bash", str(ROOT / ".ci" / "pg-cluster")],
        env={**os.environ, "ORCHESTRATR_TEST_PG": url},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    listed = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    )
    on_port = [line.split()[:3] for line in listed.stdout.splitlines() if line.split()[2] == port]
    if on_port:
        assert out == on_port[0]
    else:  # nothing on that port: the highest installed version's main cluster
        versions = sorted(
            os.listdir("/etc/postgresql"), key=lambda v: [int(x) for x in v.split(".")]
        )
        assert out == [versions[-1], "main", port]
    services = (ROOT / ".ci" / "services").read_text()
    assert "pg-cluster" in services and "sort -V" not in services


def test_live_at_uses_the_same_ends_as_the_checks() -> None:
    killed = procs(s1={"killed_at": 5.0})
    ledger = [copy("a", "s1", 1.0, last_write=4.95), copy("b", "s2", 1.0, 3.0)]
    f = facts(processes=killed)
    assert [c.job for c in checker.live_at(ledger, f, 2.0)] == ["a", "b"]
    assert checker.live_at(ledger, f, 5.0) == []
    # A copy that has not ended runs at the instant of the check itself.
    assert [c.job for c in checker.live_at(ledger, f, NOW)] == []
    assert [c.job for c in checker.live_at([copy("c", "s2", 1.0)], f, NOW)] == ["c"]


# -- I8: held means held -----------------------------------------------------------------------


def _held(released: float | None = None) -> dict[str, list[Hold]]:
    return {"a": [Hold(at=5.0, bound=3.0, released=released)]}


def test_a_pause_that_stops_the_copy_within_its_bound_and_a_resume_pass() -> None:
    ledger = [copy("a", "s1", 1.0, 6.0), copy("a", "s2", 9.5, 12.0, fence=2)]
    check(ledger, facts(holds=_held(released=9.0))).assert_ok()


def test_a_held_copy_still_running_after_the_bound_fails() -> None:
    report = check([copy("a", "s1", 1.0)], facts(holds=_held()))
    assert rounded(report.outlived_hold) == [("a", "s1", math.inf)]
    fails(report, "I8 copy outlived the hold's bound")
    late = check([copy("a", "s1", 1.0, 8.5)], facts(holds=_held()))
    assert rounded(late.outlived_hold) == [("a", "s1", 3.5)]


def test_a_copy_started_while_held_fails_and_after_the_resume_passes() -> None:
    ledger = [copy("a", "s1", 1.0, 5.5), copy("a", "s2", 7.0, 7.5, fence=2)]
    report = check(ledger, facts(holds=_held(released=9.0)))
    assert rounded(report.started_while_held) == [("a", "s2", 2.0)]
    fails(report, "I8 started while held")
    check(ledger, facts(holds=_held(released=6.5))).assert_ok()


# -- I9: checkpoints follow the fence -----------------------------------------------------------


def _with_checkpoint(c: Copy, writer: int | None) -> Copy:
    c.got_checkpoint = writer
    return c


def test_checkpoints_handed_on_in_fence_order_pass() -> None:
    ledger = [
        copy("a", "s1", 1.0, 2.0, fence=1),
        _with_checkpoint(copy("a", "s2", 2.5, 3.5, fence=2), 1),
        _with_checkpoint(copy("a", "s3", 4.0, 5.0, fence=3), 2),
    ]
    check(ledger, facts()).assert_ok()


def test_a_checkpoint_from_a_newer_owner_fails() -> None:
    ledger = [
        copy("a", "s1", 1.0, 2.0, fence=1),
        _with_checkpoint(copy("a", "s2", 2.5, fence=2), 3),
    ]
    report = check(ledger, facts())
    assert report.checkpoint_from_newer == [("a", 2, 3)]
    fails(report, "I9 checkpoint from a newer owner")


def test_a_stale_owners_checkpoint_reaching_a_later_owner_fails() -> None:
    """The stale owner (token 1) overwrote the checkpoint of owner 2, so owner 3
    started from 1's: a regression."""
    ledger = [
        copy("a", "s1", 1.0, 2.0, fence=1),
        _with_checkpoint(copy("a", "s2", 2.5, 3.5, fence=2), 1),
        _with_checkpoint(copy("a", "s3", 4.0, 5.0, fence=3), 2),
        _with_checkpoint(copy("a", "s1", 6.0, 7.0, fence=4), 1),
    ]
    report = check(ledger, facts())
    assert report.checkpoint_regressed == [("a", 2, 1)]
    fails(report, "I9 checkpoint went back")


def test_the_ledger_carries_the_checkpoint_a_copy_started_with() -> None:
    lines = [
        json.dumps(
            {
                "e": "start",
                "copy": "c1",
                "job": "a",
                "name": "a",
                "fence": 5,
                "pid": 1,
                "server": "s1",
                "t": 1.0,
                "cpf": 4,
            }
        ),
        json.dumps(
            {
                "e": "start",
                "copy": "c2",
                "job": "b",
                "name": "b",
                "fence": 5,
                "pid": 1,
                "server": "s1",
                "t": 1.0,
            }
        ),
    ]
    assert [c.got_checkpoint for c in parse_ledger(lines)] == [4, None]


def test_i7_a_copy_on_a_server_without_its_kind_or_labels_is_misplaced() -> None:
    eu = Pool.of("feed", ["region=eu"])
    good = copy("a", "s1", 1.0, 2.0)
    good.kind, good.server_kinds, good.server_labels = "feed", ("feed",), ("region=eu",)
    wrong_labels = copy("a", "s2", 3.0, 4.0, fence=2)
    wrong_labels.kind, wrong_labels.server_kinds = "feed", ("feed",)
    wrong_kind = copy("b", "s3", 1.0, 2.0)
    wrong_kind.kind, wrong_kind.server_kinds = "feed", ("socket", "feed")
    plain = copy("c", "s1", 1.0, 2.0)  # default kind on a default server: fine
    facts = Facts(now=NOW, placements={"a": eu, "b": Pool.of("socket")})
    report = check([good, wrong_labels, wrong_kind, plain], facts)
    assert [(job, server) for job, server, _ in report.misplaced] == [("a", "s2"), ("b", "s3")]
    assert "region=eu" in report.misplaced[0][2]
    assert "run as kind 'feed'" in report.misplaced[1][2]
    with pytest.raises(AssertionError, match="I7"):
        report.assert_ok()


def test_the_ledger_carries_the_kind_and_the_servers_kinds_and_labels() -> None:
    line = json.loads(_line("start", 1.0, "x"))
    line.update(kind="feed", server_kinds="feed,socket", server_labels="nic=40g,region=eu")
    (parsed,) = parse_ledger([json.dumps(line)])
    assert (parsed.kind, parsed.server_kinds, parsed.server_labels) == (
        "feed",
        ("feed", "socket"),
        ("nic=40g", "region=eu"),
    )
    (old,) = parse_ledger([_line("start", 1.0, "y")])  # a ledger from before kinds
    assert (old.kind, old.server_kinds, old.server_labels) == ("default", ("default",), ())
