# Over 600 lines on purpose: the reference transport, read top to bottom as one file.
"""The in-memory reference transport: a client of :class:`~orchestratr_memory.broker.MemoryBroker`.

One :class:`MemoryTransport` is one connection of one process. Between it and
the broker sits a modelled network link, so that the faults OrchestratR must
survive can be injected precisely, in real asyncio time:

* :meth:`MemoryTransport.crash` -- the process dies (``kill -9``): the broker
  gives every held message back at once; the transport is dead.
* :meth:`MemoryTransport.partition` / :meth:`MemoryTransport.heal` -- a silent
  partition: nothing flows, nothing is closed. The client notices the silence
  after ``fence_timeout`` seconds and marks every delivery lost; the broker
  notices after ``broker_timeout`` seconds (or at heal, when the client's close
  reaches it) and only then requeues -- so the client always fences first.
  The client retries connecting with backoff and consumes again after heal.
* :meth:`MemoryTransport.expire_consumer_timeout` -- RabbitMQ's
  ``consumer_timeout``: the broker closes the channel; the deliveries are lost,
  their messages go back (and are delivered again with a larger count) and the
  client re-consumes at once, as aio-pika's robust channel does.
* :meth:`MemoryBroker.broker_restart <orchestratr_memory.broker.MemoryBroker.broker_restart>`
  -- every connection drops; clients reconnect with backoff.

Messages never leave the process, so nothing outside it can forge one: this
transport neither signs nor checks messages, and ignores a fleet signing key
(``orchestratr_core.signing``, ``docs/deployment.md``).

URL: ``memory://<broker name>?fence_timeout=0.5&broker_timeout=1``; keyword
options override the query. Options (seconds): ``fence_timeout`` (1.5),
``broker_timeout`` (3.0, must be larger than ``fence_timeout``),
``reconnect_delay`` (0.05, first backoff), ``reconnect_max_delay`` (1.0),
``event_retry_delay`` (0.05, before an event whose handler raised is redelivered).

Handlers: job deliveries and commands go to their handlers one at a time, in
the order the broker sent them (one queue for both, so a :class:`CancelJob`
sent before a job's delivery is always handled first); each events
subscription awaits its handler for one event at a time. A job handler that
raises is logged and its delivery stays held; an event handler that raises gets
the event again after ``event_retry_delay``.

A second ``ack``/``release`` of one delivery raises :class:`RuntimeError` (a bug
in the caller, as in aio-pika). After a reconnect the transport restores its
consumers in this order: commands
(reading the cancellation set again and delivering a :class:`CancelJob` for
every id added while it was away), events, jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    DeadLetter,
    DeliveryLost,
    MalformedMessage,
    PermanentBackendError,
    PublishError,
)
from orchestratr_core.options import check_known, coerce, merge, split_query
from orchestratr_core.placement import DEFAULT_POOL, Pool
from orchestratr_core.protocol import (
    CancelJob,
    Command,
    Event,
    JobMessage,
    decode_as,
    encode,
)
from orchestratr_core.retry import retrying
from orchestratr_core.transport import (
    CommandHandler,
    Delivery,
    DeliveryHandler,
    EventHandler,
    JobConsumer,
    PoolHandler,
    Subscription,
    Transport,
)
from orchestratr_core.transport_base import (
    SubscriptionKind,
    cancel_and_log,
    reattach_order,
    spawn,
)
from orchestratr_memory.broker import (
    BrokerConnection,
    CloseFrame,
    CommandFrame,
    EventFrame,
    Frame,
    JobFrame,
    MemoryBroker,
    PoolFrame,
    pool_queue,
)

__all__ = ["DEFAULT_OPTIONS", "MemoryDelivery", "MemoryTransport"]

log = logging.getLogger("orchestratr.memory.transport")

DEFAULT_OPTIONS: dict[str, float] = {
    "fence_timeout": 1.5,
    "broker_timeout": 3.0,
    "reconnect_delay": 0.05,
    "reconnect_max_delay": 1.0,
    "event_retry_delay": 0.05,
}
"""Every option :class:`MemoryTransport` takes, with its default (seconds)."""

_T = TypeVar("_T")
_ids = itertools.count(1)


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"
    CRASHED = "crashed"


def _parse_options(url: str | None, options: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """Broker name and validated timings from the URL and keyword options."""
    name = ""
    merged: dict[str, Any] = {}
    if url is not None:
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigurationError(f"bad memory transport URL: {exc}") from None
        if parts.scheme.lower() != "memory":
            raise ConfigurationError(
                f"the memory transport takes memory:// URLs, not {parts.scheme or 'no'} scheme"
            )
        name = parts.netloc or parts.path.strip("/")
        merged = split_query(url)[1]
    merged = merge(merged, options)
    check_known(merged, DEFAULT_OPTIONS, "memory transport")
    values = dict(DEFAULT_OPTIONS)
    for key, raw in merged.items():
        values[key] = coerce(key, raw, float, unit="seconds")
        if values[key] < 0 or (values[key] == 0 and key != "event_retry_delay"):
            raise ConfigurationError(f"option {key} must be > 0")
    if values["fence_timeout"] >= values["broker_timeout"]:
        raise ConfigurationError(
            "fence_timeout must be smaller than broker_timeout: a partitioned client must "
            "stop its jobs before the broker can give them to another server"
        )
    if values["reconnect_max_delay"] < values["reconnect_delay"]:
        raise ConfigurationError("reconnect_max_delay must be >= reconnect_delay")
    return name, values


class _Link:
    """One connection across the modelled network.

    Frames in both directions go straight through while the network is up,
    wait in a buffer while it is partitioned (delivered in order at heal), and
    are dropped once either side has given the connection up.
    """

    def __init__(self, transport: MemoryTransport, number: int) -> None:
        self.transport = transport
        self.label = f"{transport.label}#{number}"
        self.alive = True
        self.conn: BrokerConnection | None = None
        self.deliveries: set[MemoryDelivery] = set()
        self.consumers: dict[str, _Consumer] = {}
        self._to_broker: deque[
            tuple[Callable[[BrokerConnection], Any], asyncio.Future[Any] | None, bool]
        ] = deque()
        self._to_client: deque[Frame] = deque()
        self._flushing = False

    @property
    def _blocked(self) -> bool:
        return self.transport.partitioned or self._flushing

    # ClientEndpoint
    def push(self, frame: Frame) -> None:
        """A frame from the broker."""
        if not self.alive:
            return
        if self._blocked:
            self._to_client.append(frame)
            return
        self.transport._receive(self, frame)

    def send(self, op: Callable[[BrokerConnection], object]) -> None:
        """A one-way frame to the broker (ack, reject, cancel, qos)."""
        if not self.alive:
            return
        if self._blocked:
            self._to_broker.append((op, None, False))
            return
        self._run(op)

    async def call(self, op: Callable[[BrokerConnection], _T], *, publish: bool = False) -> _T:
        """A frame that the broker answers (publish with confirm, declare, consume)."""
        if not self.alive:
            raise BackendUnavailable("not connected to the memory broker")
        if not self._blocked:
            assert self.conn is not None
            return op(self.conn)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._to_broker.append((op, future, publish))
        return cast(_T, await future)

    def _run(self, op: Callable[[BrokerConnection], object]) -> None:
        assert self.conn is not None
        with contextlib.suppress(BackendUnavailable):
            op(self.conn)

    def flush(self) -> None:
        """The network is back: deliver what waited, in order, each direction FIFO.
        Frames to the broker go first so that a consumer cancelled during the
        partition is cancelled before its stale deliveries are looked at."""
        self._flushing = True
        try:
            while self.alive and (self._to_broker or self._to_client):
                if self._to_broker:
                    op, future, _ = self._to_broker.popleft()
                    assert self.conn is not None
                    try:
                        result = op(self.conn)
                    except BackendUnavailable as exc:
                        if future is not None and not future.done():
                            future.set_exception(exc)
                    else:
                        if future is not None and not future.done():
                            future.set_result(result)
                else:
                    # Still "flushing": what this frame makes us send waits its turn.
                    self.transport._receive(self, self._to_client.popleft())
        finally:
            self._flushing = False

    def kill(self, reason: str) -> None:
        """Give the connection up (client side): every delivery through it is lost
        now, waiting calls fail, buffered frames are dropped."""
        if not self.alive:
            return
        self.alive = False
        for delivery in list(self.deliveries):
            delivery._lose()
        self.deliveries.clear()
        for _, future, publish in self._to_broker:
            if future is not None and not future.done():
                error: Exception = (
                    PublishError(f"not confirmed by the broker: connection lost ({reason})")
                    if publish
                    else BackendUnavailable(f"connection lost ({reason})")
                )
                future.set_exception(error)
        self._to_broker.clear()
        self._to_client.clear()


class MemoryDelivery(Delivery):
    """A job message held through one :class:`MemoryTransport` connection."""

    def __init__(
        self, link: _Link, delivery_tag: int, message: JobMessage, delivery_count: int
    ) -> None:
        self._link = link
        self._tag = delivery_tag
        self._message = message
        self._count = delivery_count
        self._lost = asyncio.Event()
        self._settled = False

    def __repr__(self) -> str:
        return (
            f"<MemoryDelivery job_id={self._message.job_id} count={self._count} "
            f"lost={self._lost.is_set()} settled={self._settled}>"
        )

    @property
    def message(self) -> JobMessage:
        """The decoded job message."""
        return self._message

    @property
    def delivery_count(self) -> int:
        """How many times the message was handed out before this delivery."""
        return self._count

    @property
    def lost(self) -> asyncio.Event:
        """Set when the connection or channel that delivered it is gone or silent."""
        return self._lost

    @property
    def settled(self) -> bool:
        """True once acked or released."""
        return self._settled

    @property
    def valid_until(self) -> float:
        """No deadline while the network is up; during a partition, the moment the
        client gives the connection up (partition start + ``fence_timeout``)."""
        since = self._link.transport.partitioned_since
        if since is None:
            return math.inf
        return since + float(self._link.transport.options["fence_timeout"])

    def _lose(self) -> None:
        if not self._settled:
            self._lost.set()

    def _settle(self, action: str) -> None:
        if self._lost.is_set():
            raise DeliveryLost(
                f"delivery of job {self._message.job_id} was lost; its message is back in the queue"
            )
        if self._settled:
            raise RuntimeError(f"delivery of job {self._message.job_id} was already settled")
        self._settled = True
        self._link.deliveries.discard(self)
        tag = self._tag
        if action == "ack":
            self._link.send(lambda conn: conn.ack(tag))
        else:
            self._link.send(lambda conn: conn.reject(tag, requeue=True))

    async def ack(self) -> None:
        """Remove the message for good. Raises :class:`DeliveryLost` if it was lost."""
        self._settle("ack")

    async def release(self) -> None:
        """Give the message back (its next delivery has a larger count).
        Raises :class:`DeliveryLost` if it was lost."""
        self._settle("release")


class _Consumer:
    """Client-side consumer state; survives reconnects (restored on each new link, in
    the core's :func:`~orchestratr_core.transport_base.reattach_order`)."""

    kind = SubscriptionKind.COMMANDS

    def __init__(self, transport: MemoryTransport) -> None:
        self.transport = transport
        self.tag = ""
        self.link: _Link | None = None
        self.closed = False

    def attach(self, link: _Link) -> None:
        self.tag = f"{link.label}.{next(_ids)}"
        self.link = link
        link.consumers[self.tag] = self

    def restore(self, link: _Link) -> None:
        raise NotImplementedError

    async def _cancel(self) -> None:
        self.closed = True
        self.transport._consumers = [c for c in self.transport._consumers if c is not self]
        link = self.link
        if link is not None and link.alive:
            tag = self.tag
            link.send(lambda conn: conn.cancel(tag))
            link.consumers.pop(tag, None)


class _MemoryJobConsumer(_Consumer, JobConsumer):
    kind = SubscriptionKind.JOBS

    def __init__(
        self,
        transport: MemoryTransport,
        capacity: int,
        handler: DeliveryHandler,
        queue: str = "jobs",
    ) -> None:
        super().__init__(transport)
        self.capacity = capacity
        self.handler = handler
        self.queue = queue

    def register(self, conn: BrokerConnection) -> None:
        conn.consume_jobs(self.tag, self.capacity, self.queue)

    def restore(self, link: _Link) -> None:
        self.attach(link)
        assert link.conn is not None
        self.register(link.conn)

    async def set_capacity(self, capacity: int) -> None:
        """Change the prefetch live; 0 pauses; nothing held is revoked."""
        _check_capacity(capacity)
        self.capacity = capacity
        link = self.link
        if not self.closed and link is not None and link.alive:
            tag = self.tag
            link.send(lambda conn: conn.set_prefetch(tag, capacity))
        # Otherwise the value is applied when the consumer is restored.

    async def close(self) -> None:
        """Cancel the consumer; held deliveries stay held and valid."""
        if not self.closed:
            await self._cancel()


class _EventSubscription(_Consumer, Subscription):
    kind = SubscriptionKind.EVENTS

    def __init__(self, transport: MemoryTransport, handler: EventHandler) -> None:
        super().__init__(transport)
        self.handler = handler
        self.queue: asyncio.Queue[tuple[_Link, int, Event]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def register(self, conn: BrokerConnection) -> None:
        conn.consume_events(self.tag)

    def restore(self, link: _Link) -> None:
        self.attach(link)
        assert link.conn is not None
        self.register(link.conn)

    def start(self) -> None:
        self.task = spawn(self._run(), name=f"orchestratr-memory-events-{self.tag}", logger=log)

    async def _run(self) -> None:
        retry_delay = self.transport.options["event_retry_delay"]
        while not self.closed:
            link, tag, event = await self.queue.get()
            if not link.alive or self.closed:
                continue
            try:
                await self.handler(event)
            except DeadLetter as exc:
                link.send(_dead_letter(tag, str(exc)))  # the broker logs the warning
            except Exception:
                log.exception("event handler raised; the event will be delivered again")
                await asyncio.sleep(retry_delay)
                link.send(_requeue(tag))
            else:
                link.send(_ack(tag))

    async def close(self) -> None:
        """Leave the events queue; the held event (if any) goes to the next consumer."""
        if self.closed:
            return
        await self._cancel()
        task = self.task
        if task is not None and task is not asyncio.current_task():
            await cancel_and_log([task], logger=log)
        # Closed from inside its own handler: the loop ends when the handler returns.


class _CommandSubscription(_Consumer, Subscription):
    kind = SubscriptionKind.COMMANDS

    def __init__(self, transport: MemoryTransport, server_id: str, handler: CommandHandler) -> None:
        super().__init__(transport)
        self.server_id = server_id
        self.handler = handler
        self.known: set[str] = set()

    def restore(self, link: _Link) -> None:
        self.attach(link)
        assert link.conn is not None
        snapshot = link.conn.consume_commands(self.tag, self.server_id)
        missed = sorted(snapshot - self.known)
        self.known |= snapshot
        for job_id in missed:
            self.transport._inbox.put_nowait(_CommandItem(self, CancelJob(job_id=job_id)))
        if missed:
            log.info("%d cancellation(s) added while disconnected, delivered now", len(missed))

    async def close(self) -> None:
        """Stop receiving commands."""
        if not self.closed:
            await self._cancel()


class _PoolWatch(_Consumer, Subscription):
    kind = SubscriptionKind.POOLS

    def __init__(self, transport: MemoryTransport, handler: PoolHandler) -> None:
        super().__init__(transport)
        self.handler = handler

    def restore(self, link: _Link) -> None:
        self.attach(link)
        assert link.conn is not None
        for key in link.conn.watch_pools(self.tag):
            self.transport._inbox.put_nowait(_PoolItem(self, key))

    async def close(self) -> None:
        """Stop hearing of new pools."""
        if not self.closed:
            await self._cancel()


@dataclass(frozen=True)
class _PoolItem:
    watch: _PoolWatch
    key: str


def _pool_of_key(key: str) -> Pool:
    return Pool.from_key(key) if key else DEFAULT_POOL


@dataclass(frozen=True)
class _JobItem:
    consumer: _MemoryJobConsumer
    delivery: MemoryDelivery


@dataclass(frozen=True)
class _CommandItem:
    subscription: _CommandSubscription
    command: Command


def _ack(tag: int) -> Callable[[BrokerConnection], None]:
    return lambda conn: conn.ack(tag)


def _dead_letter(tag: int, reason: str) -> Callable[[BrokerConnection], None]:
    return lambda conn: conn.dead_letter(tag, reason)


def _requeue(tag: int) -> Callable[[BrokerConnection], None]:
    return lambda conn: conn.reject(tag, requeue=True)


def _check_capacity(capacity: int) -> None:
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
        raise ConfigurationError(f"capacity must be an integer >= 0, not {capacity!r}")


class MemoryTransport(Transport):
    """The in-memory transport. See the module docstring for URL, options and faults."""

    process_local = True

    def __init__(self, url: str | None = None, **options: Any) -> None:
        name, values = _parse_options(url, options)
        self.options: dict[str, float] = values
        """The effective timing options (seconds)."""
        self.broker = MemoryBroker.get(name)
        """The broker this transport talks to."""
        self.label = f"{self.broker.name}/{next(_ids)}"
        """A name for logs."""
        self.partitioned = False
        self.partitioned_since: float | None = None
        """True while :meth:`partition` is in effect."""
        self._state = _State.NEW
        self._link: _Link | None = None
        self._links = itertools.count(1)
        self._consumers: list[_Consumer] = []
        self._inbox: asyncio.Queue[_JobItem | _CommandItem | _PoolItem] = asyncio.Queue()
        self._healed = asyncio.Event()
        self._healed.set()
        self._connected = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self._reconnecting: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<MemoryTransport {self.label} {self._state.value}>"

    @property
    def fence_timeout(self) -> float:
        """Seconds of silence after which this client gives its deliveries up."""
        return self.options["fence_timeout"]

    @property
    def broker_timeout(self) -> float:
        """Seconds of silence after which the broker drops this connection."""
        return self.options["broker_timeout"]

    @property
    def is_connected(self) -> bool:
        """True while a connection to the broker is up (as far as the client knows)."""
        return self._link is not None and self._link.alive

    @property
    def connected(self) -> bool:
        """:attr:`is_connected` (the contract's name)."""
        return self.is_connected

    async def wait_connected(self) -> None:
        """Return once the transport is connected (again)."""
        await self._connected.wait()

    # -- lifecycle ----------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect. Raises :class:`BackendUnavailable` while the broker is
        unreachable (partitioned or restarting). Idempotent."""
        if self._state is _State.OPEN:
            return
        self._require_alive()
        self._open_link()
        self._state = _State.OPEN
        self._spawn(self._run_inbox(), "inbox")

    async def close(self) -> None:
        """Close: deliveries are marked lost and their messages go back. Idempotent."""
        if self._state in (_State.CLOSED, _State.CRASHED):
            return
        self._state = _State.CLOSED
        self._drop_link("transport closed", graceful=True)
        subscriptions = [c for c in self._consumers if isinstance(c, _EventSubscription)]
        for consumer in self._consumers:
            consumer.closed = True
        self._consumers.clear()
        tasks = [*self._tasks, *(s.task for s in subscriptions if s.task is not None)]
        if self._reconnecting is not None:
            tasks.append(self._reconnecting)
        # Closed from inside a handler: that task ends by itself when the handler returns.
        await cancel_and_log(
            [task for task in tasks if task is not asyncio.current_task()], logger=log
        )

    # -- fault injection (tests) ----------------------------------------------------------

    def crash(self) -> None:
        """Die abruptly, like ``kill -9``: every delivery is lost, the broker
        requeues at once (unless partitioned: then it notices by its timeout),
        and the transport cannot be used again."""
        if self._state in (_State.CLOSED, _State.CRASHED):
            return
        self._state = _State.CRASHED
        log.warning("transport %s crashed", self.label)
        self._drop_link("process died", graceful=True)
        current = asyncio.current_task()
        for consumer in self._consumers:
            consumer.closed = True
            if isinstance(consumer, _EventSubscription) and consumer.task not in (None, current):
                consumer.task.cancel()
        self._consumers.clear()
        for task in self._tasks:
            if task is not current:  # crashed from inside a handler: it ends on return
                task.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()

    def partition(self) -> None:
        """Cut the network silently: nothing flows, nothing is closed."""
        if self.partitioned:
            return
        self.partitioned = True
        self.partitioned_since = time.monotonic()
        self._healed.clear()
        log.warning("transport %s partitioned from the broker", self.label)
        link = self._link
        if link is not None and link.alive:
            spawn(
                self._watch_partition(link),
                name=f"orchestratr-memory-partition-{self.label}",
                logger=log,
                keep=self._watchers,
            )

    def heal(self) -> None:
        """End the partition: what waited is delivered, in order."""
        if not self.partitioned:
            return
        self.partitioned = False
        self.partitioned_since = None
        self._healed.set()
        log.warning("transport %s healed", self.label)
        link = self._link
        if link is not None and link.alive:
            link.flush()

    def expire_consumer_timeout(self) -> None:
        """The broker's ``consumer_timeout`` fires: it closes this connection's
        channel. Held messages go back with a larger count, the deliveries are
        lost, and the client re-consumes at once (robust channel)."""
        link = self._require_link()
        assert link.conn is not None
        self.broker.close_channel(
            link.conn, "PRECONDITION_FAILED - delivery acknowledgement timed out"
        )

    async def _watch_partition(self, link: _Link) -> None:
        """Both ends' heartbeat timers during a partition: the client gives the
        connection up after ``fence_timeout``, the broker after ``broker_timeout``
        (or at heal, when the client's close finally reaches it)."""
        fence = self.options["fence_timeout"]
        try:
            await asyncio.wait_for(self._healed.wait(), fence)
        except TimeoutError:
            self._link_lost(link, f"no traffic from the broker for {fence:g} s")
            try:
                await asyncio.wait_for(self._healed.wait(), self.options["broker_timeout"] - fence)
            except TimeoutError:
                reason = "missed heartbeats"
            else:
                reason = "the client's close arrived when the partition healed"
        else:
            if link.alive:
                return  # healed in time: the connection carries on
            reason = "the client's close arrived when the partition healed"
        if link.conn is not None:
            self.broker._close_connection(link.conn, reason, notify=False)

    # -- the connection -------------------------------------------------------------------

    def _is_open(self) -> bool:
        return self._state is _State.OPEN

    def _require_alive(self) -> None:
        if self._state is _State.CLOSED:
            raise PermanentBackendError("this memory transport is closed")
        if self._state is _State.CRASHED:
            raise PermanentBackendError("this memory transport crashed")

    def _require_link(self) -> _Link:
        self._require_alive()
        if self._state is _State.NEW:
            raise BackendUnavailable("not connected yet: call connect() first")
        link = self._link
        if link is None or not link.alive:
            raise BackendUnavailable(
                f"connection to memory broker {self.broker.name!r} lost; reconnecting"
            )
        return link

    def _open_link(self) -> None:
        if self.partitioned:
            raise BackendUnavailable(f"memory broker {self.broker.name!r} unreachable")
        link = _Link(self, next(self._links))
        link.conn = self.broker.connect(link, link.label)
        self._link = link
        self._connected.set()

    def _drop_link(self, reason: str, *, graceful: bool) -> None:
        link, self._link = self._link, None
        self._connected.clear()
        if link is None or not link.alive:
            return
        link.kill(reason)  # fence first ...
        if graceful and not self.partitioned and link.conn is not None:
            link.conn.close(reason)  # ... then the broker requeues

    def _link_lost(self, link: _Link, reason: str, *, at_once: bool = False) -> None:
        if link is not self._link or not link.alive:
            return
        log.warning("transport %s lost its connection (%s); reconnecting", self.label, reason)
        self._drop_link(reason, graceful=False)
        if self._state is _State.OPEN:
            self._reconnecting = spawn(
                self._reconnect(at_once),
                name=f"orchestratr-memory-reconnect-{self.label}",
                logger=log,
            )

    async def _reconnect(self, at_once: bool) -> None:
        async for attempt in retrying(
            f"reconnect to memory broker {self.broker.name!r}",
            initial=self.options["reconnect_delay"],
            maximum=self.options["reconnect_max_delay"],
            logger=log,
            wait_first=not at_once,
            quiet_repeats=True,
        ):
            if not self._is_open():
                return
            with attempt:
                self._open_link()
        link = self._link
        assert link is not None
        for consumer in reattach_order(self._consumers):
            if link.alive:
                consumer.restore(link)
        log.info("transport %s reconnected after %d attempt(s)", self.label, attempt.number)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        spawn(coro, name=f"orchestratr-memory-{name}-{self.label}", logger=log, keep=self._tasks)

    # -- frames from the broker -------------------------------------------------------------

    def _receive(self, link: _Link, frame: Frame) -> None:
        if isinstance(frame, CloseFrame):
            self._link_lost(link, frame.reason, at_once=frame.channel_only)
            return
        consumer = link.consumers.get(frame.consumer_tag)
        if isinstance(frame, JobFrame):
            tag = frame.delivery_tag
            if not isinstance(consumer, _MemoryJobConsumer) or consumer.closed:
                link.send(lambda conn: conn.reject(tag, requeue=True))
                return
            try:
                message = decode_as(frame.payload, JobMessage)
            except MalformedMessage as exc:
                reason = str(exc)
                link.send(lambda conn: conn.dead_letter(tag, reason))
                return
            delivery = MemoryDelivery(link, tag, message, frame.delivery_count)
            link.deliveries.add(delivery)
            self._inbox.put_nowait(_JobItem(consumer, delivery))
        elif isinstance(frame, EventFrame):
            tag = frame.delivery_tag
            if not isinstance(consumer, _EventSubscription) or consumer.closed:
                link.send(lambda conn: conn.reject(tag, requeue=True))
                return
            try:
                event = decode_as(frame.payload, Event)
            except MalformedMessage as exc:
                reason = str(exc)
                link.send(lambda conn: conn.dead_letter(tag, reason))
                return
            consumer.queue.put_nowait((link, tag, event))
        elif isinstance(frame, PoolFrame):
            if isinstance(consumer, _PoolWatch) and not consumer.closed:
                self._inbox.put_nowait(_PoolItem(consumer, frame.key))
        elif isinstance(frame, CommandFrame):
            if not isinstance(consumer, _CommandSubscription) or consumer.closed:
                return
            try:
                command = decode_as(frame.payload, Command)
            except MalformedMessage as exc:
                server_id, payload, reason = frame.server_id, frame.payload, str(exc)
                link.send(lambda conn: conn.dead_letter_command(server_id, payload, reason))
                return
            if isinstance(command, CancelJob):
                consumer.known.add(command.job_id)
            self._inbox.put_nowait(_CommandItem(consumer, command))

    async def _run_inbox(self) -> None:
        """Hand job deliveries and commands to their handlers, one at a time, in
        the order the broker sent them."""
        while self._is_open():
            item = await self._inbox.get()
            if not self._is_open():
                return
            if isinstance(item, _JobItem):
                delivery = item.delivery
                if delivery.lost.is_set() or delivery.settled:
                    continue  # its channel went away before we got to it
                if item.consumer.closed:
                    await delivery.release()
                    continue
                try:
                    await item.consumer.handler(delivery)
                except Exception:
                    log.exception(
                        "job delivery handler raised; the delivery stays held job_id=%s",
                        delivery.message.job_id,
                    )
            elif isinstance(item, _PoolItem):
                if item.watch.closed:
                    continue
                try:
                    await item.watch.handler(_pool_of_key(item.key))
                except Exception:
                    log.exception("pool handler raised on pool %r", item.key)
            else:
                if item.subscription.closed:
                    continue
                try:
                    await item.subscription.handler(item.command)
                except Exception:
                    log.exception("command handler raised on %s", item.command.TYPE)

    # -- manager side -------------------------------------------------------------------

    async def publish_job(self, message: JobMessage) -> None:
        """Store a job message in its pool's queue (registering the pool first when
        it is new); returns once the broker has it."""
        payload = encode(message)
        pool = message.pool
        if pool.is_default:
            await self._require_link().call(
                lambda conn: conn.publish("jobs", payload), publish=True
            )
            return
        key = pool.key

        def publish(conn: BrokerConnection) -> None:
            conn.register_pool(key)
            conn.publish(pool_queue(key), payload)

        await self._require_link().call(publish, publish=True)

    async def send_command(self, command: Command, server_id: str | None = None) -> None:
        """Send a command to one server or, with ``server_id=None``, to all."""
        payload = encode(command)
        await self._require_link().call(
            lambda conn: conn.send_command(payload, server_id), publish=True
        )

    async def set_cancellations(self, job_ids: Collection[str]) -> None:
        """Replace the cancellation set and broadcast a :class:`CancelJob` for every
        id that was not in it -- one atomic step at the broker."""
        wanted = frozenset(job_ids)

        def replace(conn: BrokerConnection) -> None:
            previous = conn.set_cancellations(wanted)
            for job_id in sorted(wanted - previous):
                conn.send_command(encode(CancelJob(job_id=job_id)), None)

        await self._require_link().call(replace, publish=True)

    async def events_backlog(self) -> int | None:
        """How many events are not yet applied (waiting, or held by the consumer)."""
        return await self._require_link().call(lambda conn: conn.events_waiting())

    async def consume_events(self, handler: EventHandler) -> Subscription:
        """Join the events queue (single active consumer)."""
        link = self._require_link()
        subscription = _EventSubscription(self, handler)
        subscription.attach(link)
        self._consumers.append(subscription)
        subscription.start()
        try:
            await link.call(subscription.register)
        except BaseException:
            await subscription.close()
            raise
        return subscription

    # -- server side --------------------------------------------------------------------

    async def publish_event(self, event: Event) -> None:
        """Publish an event; events of this transport keep their order."""
        payload = encode(event)
        await self._require_link().call(lambda conn: conn.publish("events", payload), publish=True)

    async def consume_commands(
        self, server_id: str, handler: CommandHandler
    ) -> tuple[Subscription, frozenset[str]]:
        """Subscribe to ``server_id``'s commands and broadcasts; return the
        subscription and the cancellation set read right after subscribing."""
        link = self._require_link()
        subscription = _CommandSubscription(self, server_id, handler)
        subscription.attach(link)
        self._consumers.append(subscription)
        try:
            snapshot = await link.call(
                lambda conn: conn.consume_commands(subscription.tag, server_id)
            )
        except BaseException:
            await subscription.close()
            raise
        subscription.known |= snapshot
        return subscription, snapshot

    async def consume_jobs(self, capacity: int, handler: DeliveryHandler) -> JobConsumer:
        """Consume the jobs queue holding at most ``capacity`` deliveries."""
        return await self.consume_pool(DEFAULT_POOL, capacity, handler)

    async def watch_pools(self, handler: PoolHandler) -> Subscription:
        """Name every registered pool to ``handler`` (the default one first), then
        each new one as the broker registers it (through the inbox, in order with
        deliveries and commands); after a reconnect, all of them again."""
        link = self._require_link()
        watch = _PoolWatch(self, handler)
        watch.attach(link)
        self._consumers.append(watch)
        try:
            keys = await link.call(lambda conn: conn.watch_pools(watch.tag))
        except BaseException:
            await watch.close()
            raise
        for key in keys:
            await handler(_pool_of_key(key))
        return watch

    async def consume_pool(
        self, pool: Pool, capacity: int, handler: DeliveryHandler
    ) -> JobConsumer:
        """Consume one pool's queue holding at most ``capacity`` deliveries."""
        _check_capacity(capacity)
        link = self._require_link()
        queue = "jobs" if pool.is_default else pool_queue(pool.key)
        consumer = _MemoryJobConsumer(self, capacity, handler, queue)
        consumer.attach(link)
        self._consumers.append(consumer)
        try:
            await link.call(consumer.register)
        except BaseException:
            await consumer.close()
            raise
        return consumer
