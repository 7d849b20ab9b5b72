"""How a job function is executed: the runner contract, the stop token, and the
two built-in runners (asyncio task for coroutine functions, a thread for blocking
functions). :func:`default_runner` is asked last through the
``orchestratr_make_runner`` hook, so a third party can supply its own runner."""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, Protocol

from orchestratr_core.job import JobArgument

__all__ = [
    "AsyncJobRunner",
    "Heartbeat",
    "JobRunner",
    "StopToken",
    "ThreadJobRunner",
    "UpdatableHeartbeat",
    "default_runner",
]


class Heartbeat(Protocol):
    """``heartbeat()``: record that the job is alive. Cheap (sets a timestamp);
    callable from the event loop or from a job thread. Awaiting its result is not
    needed.

    ``heartbeat(checkpoint="...")`` also records a checkpoint (a string of at most
    64 KiB; :class:`~orchestratr_core.errors.InvalidJobInput` above): it travels
    to the manager with the server's next heartbeat, and the job's next owner
    finds the latest one that arrived in ``arg.checkpoint``
    (:mod:`orchestratr_core.lifecycle`)."""

    def __call__(self, checkpoint: str | None = None) -> None:
        """Record liveness, and ``checkpoint`` when given."""


class UpdatableHeartbeat(Heartbeat, Protocol):
    """The ``heartbeat`` a job function marked
    :func:`~orchestratr_core.lifecycle.updatable` receives: a :class:`Heartbeat`
    that also brings the job's new arguments while it runs (``client.update``
    without a restart).

    * ``heartbeat.argument`` — the latest :class:`JobArgument` (the one the
      function was called with until an update arrives); cheap, poll it from the
      event loop or a job thread;
    * ``async for arg in heartbeat.updates():`` — each newer argument as it
      arrives, ending when the job is told to stop."""

    @property
    def argument(self) -> JobArgument:
        """The latest argument of this copy."""

    def updates(self) -> AsyncIterator[JobArgument]:
        """Each newer argument as it arrives, until the job is told to stop."""


_THREAD_EVENT_LOCK = threading.Lock()
"""Orders creating a token's threading.Event against :meth:`StopToken.request_stop`."""


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


class StopToken:
    """Tells a job to stop, cooperatively.

    * ``token.stop_requested`` (or ``bool(token)``) — poll it;
    * ``await token`` or ``await token.wait()`` — sleep until stop is requested;
    * ``await token.sleep(5)`` — sleep up to 5 s; returns True if stop was requested;
    * ``token.wait_sync(timeout)`` — for blocking jobs in a thread.

    Safe to use from the event loop and from job threads.
    """

    # A server holds one token per running job, so a token is kept small: no
    # asyncio.Event (its deque alone is ~600 bytes), a plain future per waiting
    # coroutine, and a threading.Event only once a thread waits (wait_sync).
    __slots__ = ("_lease", "_loop", "_reason", "_stopped", "_thread_event", "_waiters")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        lease: Callable[[], float] | None = None,
    ) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._stopped = False
        self._reason: str | None = None
        self._lease = lease
        self._waiters: list[asyncio.Future[bool]] | None = None
        self._thread_event: threading.Event | None = None

    @property
    def stop_requested(self) -> bool:
        """True once the job has been told to stop — or once the server can no
        longer be sure the job is still its own (its lease on the job message ran
        out, e.g. after the process was frozen), even before it was told."""
        if self._stopped:
            return True
        return self._lease is not None and time.monotonic() > self._lease()

    @property
    def lease_expired(self) -> bool:
        """True if the job's lease ran out (see :attr:`stop_requested`)."""
        return self._lease is not None and time.monotonic() > self._lease()

    @property
    def reason(self) -> str | None:
        """Why the job is told to stop (a :class:`StopReason` value), once it is."""
        return self._reason

    def __bool__(self) -> bool:
        return self.stop_requested

    def request_stop(self, reason: str) -> None:
        """Ask the job to stop. Called by the server on its event loop."""
        with _THREAD_EVENT_LOCK:
            if self._stopped:
                return
            self._reason = reason  # before the flag: a thread that sees it sees the reason
            self._stopped = True
            thread_event = self._thread_event
        if thread_event is not None:
            thread_event.set()
        waiters, self._waiters = self._waiters, None
        for future in waiters or ():
            _resolve(future, True)

    async def wait(self) -> None:
        """Return when stop is requested."""
        if self._stopped:
            return
        future = self._add_waiter()
        try:
            await future
        finally:
            self._remove_waiter(future)

    def __await__(self) -> Generator[Any, None, None]:
        return self.wait().__await__()

    async def sleep(self, seconds: float) -> bool:
        """Sleep ``seconds`` or until stop is requested; True if stop was requested."""
        # One future and one timer per sleep: no task (asyncio.wait_for) and no
        # exception (asyncio.timeout) -- an idle server with thousands of jobs
        # spends most of its CPU waking their sleeps.
        if self._stopped:
            return True
        future = self._add_waiter()
        timer = self._loop.call_later(seconds, _resolve, future, False)
        try:
            return await future or self.stop_requested
        finally:
            timer.cancel()
            self._remove_waiter(future)

    def wait_sync(self, timeout: float | None = None) -> bool:
        """Blocking wait for threads; True if stop was requested."""
        thread_event = self._thread_event
        if thread_event is None:
            with _THREAD_EVENT_LOCK:
                thread_event = self._thread_event
                if thread_event is None:
                    thread_event = self._thread_event = threading.Event()
                    if self._stopped:
                        thread_event.set()
        return thread_event.wait(timeout) or self.stop_requested

    def _add_waiter(self) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = self._loop.create_future()
        if self._waiters is None:
            self._waiters = [future]
        else:
            self._waiters.append(future)
        return future

    def _remove_waiter(self, future: asyncio.Future[bool]) -> None:
        waiters = self._waiters
        if waiters is not None:
            with contextlib.suppress(ValueError):
                waiters.remove(future)


class JobRunner(abc.ABC):
    """Executes one job function invocation."""

    @abc.abstractmethod
    async def run(
        self, func: Callable[..., Any], arg: JobArgument, token: StopToken, heartbeat: Heartbeat
    ) -> None:
        """Run ``func(arg, token, heartbeat)`` to its end and return, or raise what it
        raised. The server cancels the awaiting task to stop a job hard; a runner
        whose function cannot be interrupted (a thread) returns from ``run`` at
        once on cancellation and reports it through :meth:`abandoned`."""

    def abandoned(self) -> int:
        """How many invocations were left running after a hard stop (threads)."""
        return 0

    def resize(self, max_workers: int) -> None:  # noqa: B027 - optional hook
        """Called once by the server with how many jobs it runs at once (a thread
        runner sizes its pool to it); the default ignores it."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (thread pools) when the server stops."""


class AsyncJobRunner(JobRunner):
    """Runs a coroutine function on the server's event loop."""

    async def run(
        self, func: Callable[..., Any], arg: JobArgument, token: StopToken, heartbeat: Heartbeat
    ) -> None:
        result = func(arg, token, heartbeat)
        if inspect.isawaitable(result):
            await result


class ThreadJobRunner(JobRunner):
    """Runs a blocking function in a dedicated thread pool, off the event loop.

    The pool is created with ``max_workers`` threads by the server, so that
    blocking jobs never queue behind each other (asyncio's default executor is
    much smaller). A thread cannot be killed: a blocking job that ignores its
    token after the grace period is *abandoned* — the server stops waiting for
    it, reports it, and keeps its worker slot taken until the thread really ends.
    """

    def __init__(self, max_workers: int = 1) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="orchestratr-job"
        )
        self._abandoned = 0
        self._lock = threading.Lock()

    def resize(self, max_workers: int) -> None:
        """Use a pool of ``max_workers`` threads (called by the server before any job)."""
        self._pool.shutdown(wait=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="orchestratr-job"
        )

    async def run(
        self, func: Callable[..., Any], arg: JobArgument, token: StopToken, heartbeat: Heartbeat
    ) -> None:
        loop = asyncio.get_running_loop()
        # Copy the context so that the job's log lines carry its job fields.
        context = contextvars.copy_context()
        future = loop.run_in_executor(self._pool, context.run, func, arg, token, heartbeat)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if not future.done():
                with self._lock:
                    self._abandoned += 1
                future.add_done_callback(self._done_abandoned)
            raise

    def _done_abandoned(self, _: Awaitable[Any]) -> None:
        with self._lock:
            self._abandoned -= 1

    def abandoned(self) -> int:
        with self._lock:
            return self._abandoned

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def default_runner(func: Callable[..., Any]) -> JobRunner:
    """The core's choice (asked last, through ``orchestratr_make_runner``): coroutine
    functions as tasks, anything else in a thread."""
    target: object = func if inspect.isroutine(func) else type(func).__call__
    if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(target):
        return AsyncJobRunner()
    return ThreadJobRunner()
