"""The lifecycle controls on the command line, as a person or a script runs them:
the crash-loop options of ``orchestratr server`` and ``manager``, and what
``jobs show ID --json`` says of a quarantined job with a checkpoint."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from orchestratr_core.cli import sqlite_url
from orchestratr_core.job import JobEvent, JobStatus, utcnow
from orchestratr_sql import storage_from_url
from tests.core.test_cli import _wait_for_line
from tests.support.cli import COMMAND, assert_one_line_error, clean_env, run

TICKER = "orchestratr_core.examples:ticker"


def _starting_line(tmp_path: Path, *flags: str) -> str:
    """Run ``orchestratr server`` with ``flags`` until it started, stop it with
    SIGTERM, and return the line in which it states its settings."""
    proc = subprocess.Popen(
        [*COMMAND, "server", "--job", TICKER, "--transport", f"memory://{tmp_path.name}", *flags],
        cwd=tmp_path, env=clean_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen = _wait_for_line(proc, "server started", 30)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    return next(line for line in seen if "starting" in line)


def test_server_takes_move_after_failures_and_avoid_for(tmp_path: Path) -> None:
    starting = _starting_line(tmp_path, "--move-after-failures", "0", "--avoid-for", "7.5")
    assert "moves a job away after 0 failures in a row (for 7.5 s)" in starting, starting


def test_server_defaults_for_moving_after_failures_are_stated(tmp_path: Path) -> None:
    starting = _starting_line(tmp_path)
    assert "after 3 failures in a row (for 30 s)" in starting, starting


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["server", "--job", TICKER, "--move-after-failures", "-1"], "--move-after-failures"),
        (["server", "--job", TICKER, "--move-after-failures", "two"], "--move-after-failures"),
        (["server", "--job", TICKER, "--avoid-for", "-3"], "--avoid-for"),
        (["server", "--job", TICKER, "--avoid-for", "nan"], "--avoid-for"),
        (["manager", "--storage", "memory", "--confirm-hold-after", "-1"], "--confirm-hold-after"),
    ],
)
def test_crash_loop_options_that_cannot_work_are_refused(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    proc = run(*args, "--transport", "memory://refused", cwd=tmp_path)
    assert_one_line_error(proc, 2, needle)


def test_manager_help_and_server_help_name_the_options(tmp_path: Path) -> None:
    server = run("server", "--help", cwd=tmp_path)
    assert "--move-after-failures N" in server.stdout and "--avoid-for S" in server.stdout
    manager = run("manager", "--help", cwd=tmp_path)
    assert "--confirm-hold-after S" in manager.stdout


async def _quarantine_with_checkpoint(url: str, job_id: str) -> None:
    """What a server and a manager would have written: the job ran on ``s1``,
    stored a checkpoint, failed twice and spent its budget of one restart."""
    storage = storage_from_url(url)
    await storage.open()
    try:
        now = utcnow()
        fence = 1 << 32
        await storage.transition(job_id, JobEvent.START, server_id="s1", fence=fence, now=now)
        await storage.save_checkpoints("s1", [(job_id, fence, "offset=4711")], now)
        for seq, error in enumerate(("cannot reach the feed", "still cannot reach it")):
            await storage.transition(
                job_id, JobEvent.FAIL, server_id="s1", fence=fence, now=now,
                error=error, restarts=seq + 1,
            )  # fmt: skip
        log = json.dumps([[now.timestamp() - 1, "cannot reach the feed"],
                          [now.timestamp(), "still cannot reach it"]])  # fmt: skip
        await storage.record_failure(job_id, seq=0, failure_log=log, now=now)
        spent = await storage.record_failure(
            job_id, seq=1, failure_log=log, now=now + timedelta(seconds=1),
            quarantine="restart budget spent: 2 failures within 60 s",
        )  # fmt: skip
        assert spent.job is not None and spent.job.status is JobStatus.QUARANTINED
    finally:
        await storage.close()


def test_jobs_show_json_of_a_quarantined_job_has_its_lifecycle_values(tmp_path: Path) -> None:
    db = sqlite_url(tmp_path / "o.sqlite3")
    created = run("jobs", "create", "feed-1", "--max-restarts", "1", "--restart-window", "60",
                  "--storage", db, "--json", cwd=tmp_path)  # fmt: skip
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]
    asyncio.run(_quarantine_with_checkpoint(db, job_id))

    shown = run("jobs", "show", job_id, "--storage", db, "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    job = json.loads(shown.stdout)
    assert job["status"] == "quarantined"
    assert job["checkpoint_size"] == len("offset=4711")
    assert job["checkpoint_at"] is not None and job["checkpoint_fence"] == 1 << 32
    assert job["restarts"] == 2
    assert job["last_error"] == "still cannot reach it"
    assert job["quarantine_reason"] == "restart budget spent: 2 failures within 60 s"
    assert [e["error"] for e in job["last_errors"]] == [
        "cannot reach the feed",
        "still cannot reach it",
    ]
    assert job["failures"] == 2
    assert (job["max_restarts"], job["restart_window"]) == (1, 60.0)
    assert "offset=4711" not in shown.stdout  # the size, never the content

    text = run("jobs", "show", job_id, "--storage", db, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "restart budget spent" in text.stdout
    assert "still cannot reach it" in text.stdout
    assert "11 bytes" in text.stdout
