"""Task plumbing shared by the runtimes and the transports.

One way to start a background task (a failure is logged, never lost), one way to
stop a set of them (what they raised is logged, never suppressed), one way to wait
for the first of several awaitables, one way to keep a background loop alive (a
failure is logged and the loop restarts), and one ``run_forever`` shape: start,
run until SIGTERM/SIGINT or until the object stops by itself, then stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

__all__ = [
    "cancel_and_log",
    "handle_signals",
    "keep_running",
    "run_until_signal",
    "spawn",
    "wait_first",
]

log = logging.getLogger("orchestratr")

_T = TypeVar("_T")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def spawn(
    coroutine: Coroutine[Any, Any, _T],
    *,
    name: str,
    logger: logging.Logger = log,
    keep: set[asyncio.Task[Any]] | None = None,
) -> asyncio.Task[_T]:
    """Start ``coroutine`` as a task named ``name`` whose failure is logged.

    With ``keep``, the task is held in that set until it ends (the event loop keeps
    only weak references to tasks).
    """
    task = asyncio.get_running_loop().create_task(coroutine, name=name)

    def done(finished: asyncio.Task[Any]) -> None:
        if keep is not None:
            keep.discard(finished)
        if not finished.cancelled() and (exc := finished.exception()) is not None:
            logger.error("task %s failed: %r", finished.get_name(), exc, exc_info=exc)

    if keep is not None:
        keep.add(task)
    task.add_done_callback(done)
    return task


async def cancel_and_log(
    tasks: Iterable[asyncio.Future[Any]], *, logger: logging.Logger = log
) -> None:
    """Cancel ``tasks``, wait for them all, and log what any of them raised besides
    its cancellation (Procrastinate's ``cancel_and_capture_errors``)."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    results = await asyncio.gather(*pending, return_exceptions=True)
    for task, result in zip(pending, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
            logger.error("task %s ended with %r", name, result, exc_info=result)


async def keep_running(
    loop: Callable[[], Awaitable[object]],
    *,
    name: str,
    logger: logging.Logger = log,
    pause: float = 1.0,
) -> None:
    """Run the background loop ``loop()`` until this task is cancelled: whatever
    ends it otherwise (an exception, a return, a ``CancelledError`` that some
    library raised without this task being cancelled) is logged as an error and
    the loop starts again after ``pause`` seconds.

    For the duties that must never stop silently while the process lives, such
    as a server's heartbeats.
    """
    task = asyncio.current_task()
    while True:
        try:
            await loop()
            logger.error("%s ended by itself; restarting it in %.1f s", name, pause)
        except asyncio.CancelledError:
            if task is None or task.cancelling():
                raise
            # Raised inside, not a cancellation of this task: a fault like any other.
            logger.error(
                "%s ended by a stray cancellation; restarting it in %.1f s",
                name,
                pause,
                exc_info=True,
            )
        except Exception:
            logger.error("%s failed; restarting it in %.1f s", name, pause, exc_info=True)
        await asyncio.sleep(pause)


async def wait_first(*awaitables: Awaitable[Any]) -> set[asyncio.Future[Any]]:
    """Wait until the first of ``awaitables`` is done; cancel (and await) the others.

    Returns the finished ones (more than one may finish at once); their results or
    exceptions are the caller's to read.
    """
    futures: list[asyncio.Future[Any]] = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _cancel_quietly(f for f in futures if not f.done())
    return {f for f in futures if f.done() and not f.cancelled()}


async def _cancel_quietly(futures: Iterable[asyncio.Future[Any]]) -> None:
    pending = list(futures)
    for future in pending:
        future.cancel()
    # Cancelled on purpose: only their cancellation can come back here.
    await asyncio.gather(*pending, return_exceptions=True)


@contextlib.contextmanager
def handle_signals(callback: Callable[[], object], *, install: bool = True) -> Iterator[None]:
    """Call ``callback`` on SIGTERM and SIGINT within the block (when ``install``)."""
    if not install:
        yield
        return
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, callback)
    try:
        yield
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)


async def run_until_signal(
    start: Callable[[], Awaitable[object]],
    stop: Callable[[], Awaitable[object]],
    *,
    stopped: asyncio.Event | Callable[[], Awaitable[object]] | None = None,
    requested: asyncio.Event | None = None,
    install_signal_handlers: bool = True,
) -> None:
    """Start, run until SIGTERM/SIGINT (or ``requested`` is set, or the object
    stops by itself: ``stopped`` is set, or, given as a function, what it returns
    is done), then stop — also when start-up is interrupted.

    A signal works while ``start()`` still waits for its broker or database: the
    start is cancelled and ``stop()`` runs all the same. A failing ``start()``
    raises after ``stop()``.
    """
    requested = requested if requested is not None else asyncio.Event()
    with handle_signals(requested.set, install=install_signal_handlers):
        try:
            starting = asyncio.ensure_future(start())
            done = await wait_first(starting, requested.wait())
            if starting in done:
                starting.result()
                waits: list[Awaitable[Any]] = [requested.wait()]
                if isinstance(stopped, asyncio.Event):
                    waits.append(stopped.wait())
                elif stopped is not None:
                    waits.append(stopped())
                await wait_first(*waits)
        finally:
            await stop()
