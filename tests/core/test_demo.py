"""``orchestratr demo`` as a person runs it, and the example jobs it is built on."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from orchestratr_core.examples import DEFAULT_INTERVAL, blocking_ticker, tick_interval, ticker
from orchestratr_core.job import JobArgument
from orchestratr_core.runner import StopToken
from tests.support.cli import COMMAND, clean_env

DEMO_BOUND = 30.0
"""The demo promises to end by itself within this many seconds."""


def run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    proc = subprocess.run(
        [*COMMAND, "demo", *args],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=DEMO_BOUND * 3,  # generous: a slow CI must fail on the bound, not hang
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return proc, time.monotonic() - began


def test_demo_shows_kill_move_and_cancel_and_ends_by_itself_on_sqlite(tmp_path: Path) -> None:
    proc, took = run_demo(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert took < DEMO_BOUND, f"the demo took {took:.1f}s"
    out = proc.stdout
    assert "SQLite file" in out
    assert str(tmp_path / "orchestratr-demo.sqlite3") in out
    assert (tmp_path / "orchestratr-demo.sqlite3").exists()
    assert "Killing server-" in out
    assert "running on the survivors after" in out
    assert "larger fencing token" in out
    assert "never ran again" in out
    assert "declared dead" in out
    # Issue 15: a checkpoint survives the kill, and a pause and resume.
    assert "went on counting from the checkpoint their dead owner last sent" in out
    assert "paused after" in out and "nothing ran it for 1.0s" in out
    assert "paused and resumed, counting on from tick" in out
    assert "restarted with argument 0.2" in out
    assert "report-any and report-eu run on server-eu only" in out
    assert "report-us is pending: waiting: no live server runs kind 'report' with region=us" in out
    assert "Summary" in out
    assert "FAIL" not in out
    assert "Traceback" not in proc.stderr


def test_demo_on_memory_storage_runs_twice_in_one_directory(tmp_path: Path) -> None:
    for _ in range(2):
        proc, took = run_demo(tmp_path, "--storage", "memory")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert took < DEMO_BOUND
        assert "storage:   memory" in proc.stdout
    assert not (tmp_path / "orchestratr-demo.sqlite3").exists()


def test_demo_forever_keeps_running_until_ctrl_c_then_stops_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*COMMAND, "demo", "--storage", "memory", "--forever"],
        cwd=tmp_path,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(iter(proc.stdout.readline, ""))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + DEMO_BOUND
        while not any("Running until Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.1)
        time.sleep(1.0)
        assert proc.poll() is None, "--forever must not end by itself"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    assert proc.returncode == 0, "".join(lines)
    text = "".join(lines)
    assert "Shutting down" in text
    assert "Summary" in text


# -- the example jobs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "interval"),
    [("0.5", 0.5), ("2", 2.0), ("", DEFAULT_INTERVAL), ("fast", DEFAULT_INTERVAL),
     ("0", DEFAULT_INTERVAL), ("nan", DEFAULT_INTERVAL), ("-1", DEFAULT_INTERVAL)],
)  # fmt: skip
def test_ticker_interval_comes_from_a_numeric_argument(argument: str, interval: float) -> None:
    assert tick_interval(argument) == interval


async def test_ticker_beats_every_tick_and_returns_when_told_to_stop() -> None:
    token = StopToken()
    beats: list[tuple[float, str | None]] = []
    arg = JobArgument(job_id="j", name="t", argument="0.01", fence=1, checkpoint="41")

    def beat(checkpoint: str | None = None) -> None:
        beats.append((time.monotonic(), checkpoint))

    task = asyncio.create_task(ticker(arg, token, beat))
    await asyncio.sleep(0.2)
    token.request_stop("cancelled")
    await asyncio.wait_for(task, timeout=1)
    assert len(beats) >= 3
    # It counts on from the checkpoint it started with, and records each tick.
    assert [cp for _, cp in beats[:3]] == ["42", "43", "44"]


async def test_blocking_ticker_runs_in_a_thread_and_returns_when_told_to_stop() -> None:
    token = StopToken()
    beats: list[str] = []
    arg = JobArgument(job_id="j", name="t", argument="0.01", fence=1)

    def beat(checkpoint: str | None = None) -> None:
        beats.append(threading.current_thread().name)

    future = asyncio.get_running_loop().run_in_executor(None, blocking_ticker, arg, token, beat)
    await asyncio.sleep(0.2)
    token.request_stop("cancelled")
    await asyncio.wait_for(future, timeout=1)
    assert len(beats) >= 3
    assert threading.main_thread().name not in beats


def test_demo_with_an_unknown_storage_fails_in_one_line(tmp_path: Path) -> None:
    proc, _ = run_demo(tmp_path, "--storage", "memroy")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("orchestratr: error: unknown plugin 'memroy'")
    assert "did you mean 'memory'" in lines[0]


def test_ctrl_c_during_the_scripted_demo_exits_130_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*COMMAND, "demo", "--storage", "memory"],
        cwd=tmp_path,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if "Creating" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["orchestratr: interrupted"]
