"""``_aio.keep_running`` (a background loop that must never end silently) and
``run_until_signal`` waiting on what a function returns."""

from __future__ import annotations

import asyncio
import logging

import pytest

from orchestratr_core._aio import keep_running, run_until_signal


async def test_keep_running_logs_every_end_of_its_loop_and_starts_it_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = 0
    third = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("broken loop")
        if runs == 2:
            raise asyncio.CancelledError  # raised inside, as a library did once
        if runs == 3:
            return  # a loop that ends by itself is a fault too
        third.set()
        await asyncio.sleep(60)

    with caplog.at_level(logging.ERROR, logger="orchestratr"):
        task = asyncio.ensure_future(keep_running(loop, name="the test loop", pause=0.001))
        await asyncio.wait_for(third.wait(), 5)
        assert not task.done()
        # A real cancellation of the task still ends it.
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert runs == 4
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all("the test loop" in r.getMessage() for r in errors)
    assert "broken loop" in str(errors[0].exc_info[1] if errors[0].exc_info else "")
    assert "stray cancellation" in errors[1].getMessage()
    assert "ended by itself" in errors[2].getMessage()


async def test_run_until_signal_returns_when_what_stopped_returns_is_done() -> None:
    calls: list[str] = []
    served = asyncio.get_running_loop().create_future()

    async def start() -> None:
        asyncio.get_running_loop().call_later(0.05, served.set_result, None)

    async def serving() -> None:
        await served

    async def stop() -> None:
        calls.append("stop")

    await asyncio.wait_for(
        run_until_signal(start, stop, stopped=serving, install_signal_handlers=False), 5
    )
    assert calls == ["stop"]
