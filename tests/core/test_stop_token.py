"""StopToken: its waits on the event loop and in threads, without an
asyncio.Event or a threading.Event per token unless a thread waits."""

from __future__ import annotations

import asyncio
import threading
import time

from orchestratr_core import StopToken


async def test_sleep_returns_false_after_its_time_and_true_when_stopped() -> None:
    token = StopToken()
    began = time.monotonic()
    assert await token.sleep(0.05) is False
    assert time.monotonic() - began >= 0.04
    asyncio.get_running_loop().call_later(0.05, token.request_stop, "cancelled")
    began = time.monotonic()
    assert await token.sleep(30) is True
    assert time.monotonic() - began < 1.0
    assert token.reason == "cancelled"
    assert await token.sleep(30) is True  # already stopped: at once
    await token  # and so is waiting for it
    await token.wait()
    assert token.stop_requested and bool(token)


async def test_one_stop_wakes_every_sleeper_and_waiter_and_a_cancelled_one_harms_none() -> None:
    token = StopToken()
    sleepers = [asyncio.create_task(token.sleep(30)) for _ in range(3)]
    waiters = [asyncio.create_task(token.wait()) for _ in range(2)]
    cancelled = asyncio.create_task(token.sleep(30))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.sleep(0.01)
    assert cancelled.cancelled()
    token.request_stop("released")
    token.request_stop("lost")  # the first reason stays
    assert await asyncio.wait_for(asyncio.gather(*sleepers, *waiters), 1.0) == [
        True,
        True,
        True,
        None,
        None,
    ]
    assert token.reason == "released"


async def test_sleep_and_timeouts_leave_nothing_behind_in_the_token() -> None:
    token = StopToken()
    for _ in range(3):
        assert await token.sleep(0.001) is False
    task = asyncio.create_task(token.sleep(30))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.01)
    assert not token._waiters  # no future of an ended sleep is kept


async def test_a_lease_that_ran_out_ends_a_sleep_as_a_stop() -> None:
    deadline = time.monotonic() + 0.05
    token = StopToken(lease=lambda: deadline)
    assert not token
    assert await token.sleep(0.1) is True  # the lease ran out while it slept
    assert token.stop_requested and token.lease_expired and token.reason is None


async def test_a_thread_waiting_on_the_token_is_woken_by_a_stop_on_the_loop() -> None:
    token = StopToken()
    assert token._thread_event is None  # only made once a thread waits
    results: list[tuple[bool, float]] = []

    def blocking() -> None:
        began = time.monotonic()
        results.append((token.wait_sync(30), time.monotonic() - began))

    thread = threading.Thread(target=blocking)
    thread.start()
    await asyncio.sleep(0.05)
    token.request_stop("cancelled")
    await asyncio.to_thread(thread.join, 5)
    [(stopped, waited)] = results
    assert stopped and waited < 5
    assert token.wait_sync(30) is True  # already stopped: at once
    assert StopToken().wait_sync(0.01) is False


async def test_a_stop_racing_the_first_wait_of_a_thread_is_never_missed() -> None:
    """wait_sync creates the threading.Event while request_stop may run: the
    thread must see the stop either way (no lost wake-up)."""
    for _ in range(200):
        token = StopToken()
        barrier = threading.Barrier(2)
        result: list[bool] = []

        def blocking(
            token: StopToken = token,
            barrier: threading.Barrier = barrier,
            result: list[bool] = result,
        ) -> None:
            barrier.wait()
            result.append(token.wait_sync(10))

        thread = threading.Thread(target=blocking)
        thread.start()
        await asyncio.to_thread(barrier.wait)
        token.request_stop("released")
        began = time.monotonic()
        await asyncio.to_thread(thread.join, 10)
        assert result == [True]
        assert time.monotonic() - began < 5
