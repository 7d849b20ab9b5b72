"""Liveness and readiness of a process, for Kubernetes probes and watchdogs.

* ``/healthz`` (liveness): the process *and its event loop* answer -- a loop
  blocked by a job function that never yields fails it, and a restart is the cure.
* ``/readyz`` (readiness): the process can do its work now -- a server holds a
  live broker session (one its fence gave up on is not live); a manager reaches
  the broker and its storage and consumes events. Not ready is not dead: it heals
  by itself when the broker or database comes back.

A server serves both beside ``/metrics`` on its ``--metrics`` port (a thread of
its own, see :func:`orchestratr_core.metrics.start_metrics_server`); a manager
on its ``--http`` port (the web app). Both answer ``200`` with ``ok`` or ``503``
with one line saying why not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["LIVE_TIMEOUT", "HealthProbe", "Verdict"]

LIVE_TIMEOUT = 2.0
"""Seconds the event loop has to run a no-op before ``/healthz`` says it is stuck."""


@dataclass(frozen=True)
class Verdict:
    """One answer of a probe: ``ok`` and the line that says why (or ``"ok"``)."""

    ok: bool
    reason: str = "ok"

    @property
    def status(self) -> int:
        """The HTTP status: 200 or 503."""
        return 200 if self.ok else 503


class HealthProbe:
    """Answers ``/healthz`` and ``/readyz`` for one process from any thread.

    :param loop: the process's event loop (where the runtime runs).
    :param ready: a coroutine function run *on that loop*, returning ``None``
        when ready or one line saying why not.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, ready: Callable[[], Awaitable[str | None]]
    ) -> None:
        self._loop = loop
        self._ready = ready

    def _on_loop(self, coro: Awaitable[str | None], timeout: float) -> str | None:
        async def run() -> str | None:
            return await coro

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return f"the event loop did not answer within {timeout:g}s"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def live(self) -> Verdict:
        """Liveness: the event loop runs a no-op within :data:`LIVE_TIMEOUT`.
        Call it from another thread (never from the loop itself)."""

        async def nothing() -> None:
            return None

        if self._loop.is_closed():
            return Verdict(False, "the event loop is closed")
        reason = self._on_loop(nothing(), LIVE_TIMEOUT)
        return Verdict(reason is None, reason or "ok")

    def ready(self, timeout: float = 5.0) -> Verdict:
        """Readiness: the ``ready`` check, run on the loop (from another thread)."""
        if self._loop.is_closed():
            return Verdict(False, "the event loop is closed")
        reason = self._on_loop(self._ready(), timeout)
        return Verdict(reason is None, reason or "ok")
