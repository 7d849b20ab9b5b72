"""Job deliveries handled in the channel reader's step (``transport/dispatch.py``):
a callback runs at once and continues as a task only if it waits, in a context of
its own; on the real broker a server taking jobs makes one task per job, not two."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from orchestratr_core import OrchestratedServer, ServerOptions
from orchestratr_rabbitmq import RabbitMQTransport
from orchestratr_rabbitmq.transport import dispatch
from tests.support.cluster import eventually, idle_job, job_message

MakeTransport = Callable[..., RabbitMQTransport]

_tag: contextvars.ContextVar[str] = contextvars.ContextVar("tag", default="none")


async def test_a_callback_that_does_not_wait_runs_to_its_end_at_once() -> None:
    ran: list[str] = []

    async def callback() -> None:
        _tag.set("inside")  # a callback's context is its own, as a task's is
        ran.append(_tag.get())

    keep: set[asyncio.Task[None]] = set()
    assert dispatch.run_eagerly(callback(), keep) is None
    assert ran == ["inside"]
    assert _tag.get() == "none"
    assert not keep


async def test_a_callback_that_waits_continues_as_a_task_in_its_context() -> None:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[int] = loop.create_future()
    second: asyncio.Future[int] = loop.create_future()
    seen: list[Any] = []

    async def callback() -> None:
        _tag.set("mine")
        seen.append(await first)
        await asyncio.sleep(0)  # a bare yield, too
        try:
            await second
        except ValueError as exc:
            seen.append((str(exc), _tag.get()))

    keep: set[asyncio.Task[None]] = set()
    task = dispatch.run_eagerly(callback(), keep)
    assert task is not None and task in keep
    assert seen == []
    first.set_result(7)
    await asyncio.sleep(0.01)
    assert seen == [7]
    second.set_exception(ValueError("boom"))
    await asyncio.wait_for(task, 1)
    assert seen == [7, ("boom", "mine")]
    assert not keep
    assert _tag.get() == "none"


async def test_a_callback_binds_to_its_own_task_after_own_task() -> None:
    """Before its first wait a callback runs in the caller's task; ``own_task``
    moves it to its own, so that a timeout or a session's bound on a settle
    cancels the callback, never the channel reader."""
    seen: list[asyncio.Task[Any] | None] = []

    async def callback() -> None:
        seen.append(asyncio.current_task())
        await dispatch.own_task()
        seen.append(asyncio.current_task())
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)

    me = asyncio.current_task()
    task = dispatch.run_eagerly(callback(), set())
    assert task is not None
    await asyncio.wait([task])
    assert seen == [me, task]
    assert isinstance(task.exception(), TimeoutError)
    assert not me.cancelling() if me is not None else True
    await dispatch.own_task()  # outside a callback's first step: returns at once
    assert asyncio.current_task() is me


async def test_cancelling_the_continuation_reaches_the_callback() -> None:
    cleaned: list[bool] = []

    async def callback() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    task = dispatch.run_eagerly(callback(), set())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


async def test_a_failing_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def at_once() -> None:
        raise RuntimeError("at once")

    async def later() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("later")

    with caplog.at_level(logging.ERROR, logger="orchestratr.transport.rabbitmq"):
        assert dispatch.run_eagerly(at_once(), set()) is None
        task = dispatch.run_eagerly(later(), set())
        assert task is not None
        await asyncio.wait([task])
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("Consumer callback failed") == 2
    assert [str(r.exc_info[1]) for r in caplog.records if r.exc_info] == ["at once", "later"]


JOBS = 400


@pytest.mark.rabbitmq
async def test_a_server_taking_jobs_makes_one_task_per_job(make_transport: MakeTransport) -> None:
    """Counted, not timed: every task the event loop makes while a server takes
    JOBS queued jobs. aiormq alone makes one per delivery on top of the job's own."""
    publisher = make_transport()
    await publisher.connect()
    await asyncio.gather(*(publisher.publish_job(job_message(i)) for i in range(JOBS)))
    loop = asyncio.get_running_loop()
    made = 0
    default = loop.get_task_factory()

    def counting(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Future[Any]:
        nonlocal made
        made += 1
        if default is not None:
            return default(loop, coro, **kwargs)  # type: ignore[arg-type]
        return asyncio.Task(coro, loop=loop, **kwargs)

    server = OrchestratedServer(
        idle_job,
        transport=make_transport(),
        name="dispatch",
        max_workers=JOBS,
        options=ServerOptions(heartbeat_interval=30.0),
    )
    loop.set_task_factory(counting)  # type: ignore[arg-type]
    try:
        await server.start()
        await eventually(lambda: len(server.running()) == JOBS, 60.0, 0.02, "all running")
        taken = made
    finally:
        loop.set_task_factory(default)
        await server.kill()
        await publisher.close()
    # One task per job, plus the server's and the transport's own (about 130 here,
    # connecting included): a task per delivery would make it 2 x JOBS and more.
    assert taken < JOBS + JOBS // 2, f"{taken} tasks for {JOBS} jobs"
