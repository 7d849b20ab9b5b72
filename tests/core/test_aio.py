"""The shared task plumbing (``orchestratr_core._aio``) and the retry idiom."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from orchestratr_core._aio import cancel_and_log, run_until_signal, spawn, wait_first
from orchestratr_core.errors import BackendUnavailable
from orchestratr_core.retry import retrying


async def _fail() -> None:
    raise RuntimeError("boom in the background")


async def test_a_spawned_task_that_fails_is_logged_and_released(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keep: set[asyncio.Task[object]] = set()
    with caplog.at_level(logging.ERROR, logger="orchestratr"):
        task = spawn(_fail(), name="failing-side-task", keep=keep)
        assert task in keep
        with pytest.raises(RuntimeError):
            await task
        await asyncio.sleep(0)
    assert not keep
    assert any(
        "failing-side-task" in r.getMessage() and "boom in the background" in r.getMessage()
        for r in caplog.records
    )


async def test_cancel_and_log_reports_what_a_task_raised_instead_of_hiding_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def raises_on_cancel() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            raise ValueError("raised while stopping")

    quiet = asyncio.create_task(asyncio.sleep(60), name="quiet")
    loud = asyncio.create_task(raises_on_cancel(), name="loud")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="orchestratr"):
        await cancel_and_log([quiet, loud])
    assert quiet.cancelled() and loud.done()
    messages = [r.getMessage() for r in caplog.records]
    assert any("loud" in m and "raised while stopping" in m for m in messages)
    assert not any("quiet" in m for m in messages)


async def test_wait_first_returns_the_finished_and_cancels_the_rest() -> None:
    slow = asyncio.ensure_future(asyncio.sleep(60))
    fast = asyncio.ensure_future(asyncio.sleep(0, result="fast"))
    done = await wait_first(slow, fast)
    assert done == {fast} and fast.result() == "fast"
    assert slow.cancelled()


async def test_run_until_signal_stops_on_sigterm_even_while_starting() -> None:
    events: list[str] = []

    async def start() -> None:
        events.append("starting")
        await asyncio.sleep(60)  # a broker that never answers

    async def stop() -> None:
        events.append("stopped")

    loop = asyncio.get_running_loop()
    loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(run_until_signal(start, stop), 5)
    assert events == ["starting", "stopped"]


async def test_run_until_signal_returns_when_the_object_stops_by_itself() -> None:
    stopped = asyncio.Event()
    calls: list[str] = []

    async def start() -> None:
        asyncio.get_running_loop().call_later(0.05, stopped.set)

    async def stop() -> None:
        calls.append("stop")

    await asyncio.wait_for(
        run_until_signal(start, stop, stopped=stopped, install_signal_handlers=False), 5
    )
    assert calls == ["stop"]


async def test_run_until_signal_raises_a_failed_start_after_stopping() -> None:
    calls: list[str] = []

    async def start() -> None:
        raise BackendUnavailable("no broker")

    async def stop() -> None:
        calls.append("stop")

    with pytest.raises(BackendUnavailable):
        await run_until_signal(start, stop, install_signal_handlers=False)
    assert calls == ["stop"]


async def test_retrying_retries_only_what_is_transient_with_one_warning_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tries = 0
    with caplog.at_level(logging.WARNING, logger="orchestratr"):
        async for attempt in retrying("reach the thing", initial=0.001, maximum=0.002):
            with attempt:
                tries += 1
                if tries < 3:
                    raise BackendUnavailable(f"down {tries}")
    assert tries == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("cannot reach the thing" in w for w in warnings)

    with pytest.raises(ValueError, match="permanent"):
        async for attempt in retrying("do it", initial=0.001):
            with attempt:
                raise ValueError("permanent")


async def test_retrying_gives_up_after_the_attempts_asked_for() -> None:
    tries = 0
    with pytest.raises(BackendUnavailable, match="still down"):
        async for attempt in retrying("connect", initial=0.001, attempts=3):
            with attempt:
                tries += 1
                raise BackendUnavailable("still down")
    assert tries == 3


async def test_retrying_can_wait_before_the_first_try_and_quiet_a_repeated_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    tried_at: list[float] = []
    with caplog.at_level(logging.DEBUG, logger="orchestratr"):
        async for attempt in retrying(
            "reconnect", initial=0.2, maximum=0.2, wait_first=True, quiet_repeats=True
        ):
            with attempt:
                tried_at.append(loop.time())
                if len(tried_at) < 4:
                    raise BackendUnavailable("down" if len(tried_at) < 3 else "refused")
    assert len(tried_at) == 4
    # Jitter keeps each wait within [50 %, 100 %] of 0.2 s: the first try waited too.
    assert tried_at[0] - started >= 0.1
    retries = [r for r in caplog.records if "cannot reconnect" in r.getMessage()]
    assert [r.levelno for r in retries] == [logging.WARNING, logging.DEBUG, logging.WARNING]


async def test_retrying_within_a_time_raises_the_last_error_once_that_time_is_spent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    tries = 0
    with (
        caplog.at_level(logging.DEBUG, logger="orchestratr"),
        pytest.raises(BackendUnavailable) as caught,
    ):
        async for attempt in retrying(
            "take the lock", initial=0.05, maximum=0.05, within=0.1, level=logging.DEBUG
        ):
            with attempt:
                tries += 1
                raise BackendUnavailable(f"busy {tries}")
    assert 0.1 <= loop.time() - started < 1.0
    assert tries >= 3 and str(caught.value) == f"busy {tries}"  # the last error
    retries = [r for r in caplog.records if "cannot take the lock" in r.getMessage()]
    assert retries and all(r.levelno == logging.DEBUG for r in retries)
