"""Deliveries handed to a consumer without a task per delivery.

aiormq's channel reader makes a task for every delivery it hands to a consumer
callback (``create_task(consumer(message))``, plus a done callback and two
future-store entries). A job consumer's callback nearly always finishes without
waiting for anything (checks, bookkeeping, the job function's task is made), so
that task is pure cost on a failover's burst: :func:`inline` marks a callback
that aiormq's reader runs at once, in its own step, in a copy of the context
(as a task would), with :func:`run_eagerly`; only a callback that has to wait
(a dead-letter, a hand-back) continues as a task from where it stopped.

:func:`watch` puts this in place on one aiormq channel (our jobs channels; every
other channel, and every callback not marked, is handled by aiormq as before).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import aiormq.abc
from aiormq.channel import Channel
from pamqp import commands as spec

__all__ = ["available", "inline", "own_task", "run_eagerly", "watch"]

log = logging.getLogger("orchestratr.transport.rabbitmq")

InlineCallback = Callable[[aiormq.abc.DeliveredMessage], Coroutine[Any, Any, None]]

_INLINE = "orchestratr_inline"


class _FirstStep:
    """Whether :func:`run_eagerly` is running a callback's first step (in the
    caller's task) right now: steps do not interleave, so one flag serves."""

    running = False


async def own_task() -> None:
    """Leave the caller's step if this runs in :func:`run_eagerly`'s first step, so
    that what follows runs in the callback's own task: a callback must call this
    before anything that binds to the current task (``asyncio.timeout``,
    ``asyncio.current_task()``), which in that first step is the channel reader's.
    Elsewhere it returns at once."""
    if _FirstStep.running:
        await asyncio.sleep(0)


class _Resume:
    """Awaiting this continues ``coro`` (which stopped at ``pending``, the value it
    yielded) in the awaiting task: what ``yield from`` does for a coroutine that
    was already started by hand."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Coroutine[Any, Any, None], pending: Any) -> None:
        self.coro = coro
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, None]:
        coro, pending = self.coro, self.pending
        self.pending = None
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation: the coroutine handles it
                try:
                    pending = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration:
                    return


async def _finish(resume: _Resume) -> None:
    await resume


def _failed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("Consumer callback failed", exc_info=exc)


def run_eagerly(
    coro: Coroutine[Any, Any, None], keep: set[asyncio.Task[None]]
) -> asyncio.Task[None] | None:
    """Run ``coro`` now, in a copy of the current context, until it ends or first
    waits; in the second case a task (kept in ``keep`` until it ends) continues
    it in that context and is returned. What it raises is logged, as aiormq logs
    a failed consumer task. Until it first waits, ``asyncio.current_task()`` is the
    caller's task: see :func:`own_task`."""
    context = contextvars.copy_context()
    _FirstStep.running = True
    try:
        pending = context.run(coro.send, None)
    except StopIteration:
        return None
    except Exception:
        log.exception("Consumer callback failed")
        return None
    finally:
        _FirstStep.running = False
    task = asyncio.get_running_loop().create_task(_finish(_Resume(coro, pending)), context=context)
    keep.add(task)
    task.add_done_callback(keep.discard)
    task.add_done_callback(_failed)
    return task


def inline(callback: InlineCallback) -> InlineCallback:
    """Mark ``callback`` to be run by a :func:`watch`-ed channel's reader at once."""

    async def marked(message: aiormq.abc.DeliveredMessage) -> None:
        await callback(message)

    setattr(marked, _INLINE, callback)
    return marked


def available() -> bool:
    """Whether the installed aiormq has what :func:`watch` replaces (else aiormq's
    own per-delivery tasks are used)."""
    return all(
        callable(getattr(Channel, name, None))
        for name in ("_on_deliver_frame", "_read_content", "_Channel__get_content_header")
    )


_original_on_deliver: Callable[[Channel, spec.Basic.Deliver], Awaitable[None]] = (
    Channel._on_deliver_frame
)


async def _on_deliver_frame(self: Channel, frame: spec.Basic.Deliver) -> None:
    """aiormq's ``Channel._on_deliver_frame`` with inline callbacks run at once."""
    consumer = self.consumers.get(frame.consumer_tag) if frame.consumer_tag else None
    callback = getattr(consumer, _INLINE, None)
    if callback is None:
        await _original_on_deliver(self, frame)
        return
    header = await self._Channel__get_content_header()  # type: ignore[attr-defined]
    message = await self._read_content(frame, header)
    keep: set[asyncio.Task[None]] = self.__dict__.setdefault("_orx_inline_tasks", set())
    run_eagerly(callback(message), keep)


def watch(channel: aiormq.abc.AbstractChannel) -> bool:
    """Run the :func:`inline` callbacks of ``channel`` at once; False (nothing
    changed) if the installed aiormq lacks what that replaces."""
    if not isinstance(channel, Channel) or not available():
        return False
    channel._on_deliver_frame = types.MethodType(_on_deliver_frame, channel)  # type: ignore[method-assign]
    return True
