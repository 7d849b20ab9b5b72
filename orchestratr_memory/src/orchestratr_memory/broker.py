"""An in-process message broker: the model the in-memory transport talks to.

It behaves like the parts of RabbitMQ that OrchestratR relies on, so that the
whole system can be tested fast and faults can be injected precisely:

``jobs`` queue
    Durable and ordered by publish sequence. Each message counts how often it
    was handed out; a delivery carries that count as it was *before* this
    delivery (0 on the first). Each consumer has a prefetch (``0`` pauses it);
    messages go round-robin to the consumers that have free capacity. A held
    message belongs to its connection: when the connection ends (closed,
    crashed, timed out, channel closed) it goes back to the queue at once.
    A message given back (release, or the end of its connection) returns to
    its **original position**, ahead of everything published after it, as
    RabbitMQ's classic queues do; in practice: at the head.

pools
    A job of a kind other than the default, or with placement constraints, is
    published to its **pool**'s own jobs queue (``jobs/<pool key>``), which
    behaves exactly as ``jobs`` does (``jobs`` is the default pool's). A pool is
    registered before its first message (:meth:`BrokerConnection.register_pool`);
    pool watchers get every registered pool when they subscribe and each new one
    as it is registered, so a server consumes exactly the pools it can run.

``events`` queue
    Durable, single active consumer: the consumer that subscribed first
    receives, one event at a time; when it goes the next one takes over.
    Events are ordered by publish sequence, so the events of one publisher
    (indeed of all publishers) keep their order; a rejected event returns to
    its original position, ahead of later ones.

commands
    Every command subscription names a server; a command goes to the
    subscriptions of that server, a broadcast to every subscription. Like
    RabbitMQ's exclusive queues, a subscription ends with its connection, so a
    command for a server that is not connected is dropped.

cancellations
    A durable set of job ids, replaced as a whole, read atomically with
    subscribing to commands.

dead letters
    :attr:`MemoryBroker.dead_letters` collects every message a client rejected:
    malformed, or an event its handler refused for good
    (:class:`~orchestratr_core.errors.DeadLetter`). It keeps the newest
    :data:`DEAD_LETTER_LIMIT` (the oldest are dropped first, as RabbitMQ's
    ``drop-head`` overflow does on ``<ns>.dead``). :meth:`MemoryBroker.inject_raw`
    lets a test put anything on any queue.

The broker keeps everything across :meth:`MemoryBroker.broker_restart`; only
connections are dropped. Brokers are process-global, one per name
(``memory://name``); :meth:`MemoryBroker.get` finds or creates one.

The broker's methods are synchronous and never block: the client side
(:mod:`orchestratr_memory.transport`) models the network between them,
including silent partitions.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

from orchestratr_core.errors import BackendUnavailable

__all__ = [
    "DEAD_LETTER_LIMIT",
    "DEFAULT_BROKER",
    "BrokerConnection",
    "ClientEndpoint",
    "CloseFrame",
    "CommandFrame",
    "DeadLetter",
    "EventFrame",
    "Frame",
    "JobFrame",
    "MemoryBroker",
    "PoolFrame",
    "QueueName",
]

log = logging.getLogger("orchestratr.memory.broker")

DEFAULT_BROKER = "default"
"""The broker that ``memory://`` and ``None`` name."""

DEAD_LETTER_LIMIT = 10_000
"""Most dead letters a broker keeps (the same default as ``<ns>.dead`` on RabbitMQ)."""

QueueName = Literal["jobs", "events"]
"""The two shared queues. Command queues are named ``commands/<server_id>``; the
jobs queue of a pool other than the default one ``jobs/<pool key>``."""


def pool_queue(key: str) -> str:
    """The name of a pool's jobs queue (``jobs`` for the default pool, key ``""``)."""
    return f"jobs/{key}" if key else "jobs"


@dataclass(frozen=True)
class DeadLetter:
    """A message a consumer rejected: it could not be decoded, or (an event) its
    handler raised :class:`~orchestratr_core.errors.DeadLetter`."""

    queue: str
    """``"jobs"``, ``"events"`` or ``"commands/<server_id>"``."""
    payload: bytes
    """The message exactly as it was published."""
    reason: str
    """Why it was rejected (the decoder's or the handler's message)."""


# -- frames: what the broker sends down a connection ---------------------------------------


@dataclass(frozen=True)
class JobFrame:
    """A job message delivered to a consumer; held until settled."""

    consumer_tag: str
    delivery_tag: int
    payload: bytes
    delivery_count: int


@dataclass(frozen=True)
class EventFrame:
    """An event delivered to the active events consumer; held until settled."""

    consumer_tag: str
    delivery_tag: int
    payload: bytes


@dataclass(frozen=True)
class CommandFrame:
    """A command for one subscription (no acknowledgement)."""

    consumer_tag: str
    server_id: str
    payload: bytes


@dataclass(frozen=True)
class CloseFrame:
    """The broker closed the connection (or, if ``channel_only``, its channel)."""

    reason: str
    channel_only: bool = False


@dataclass(frozen=True)
class PoolFrame:
    """A pool was registered (to a pool watcher)."""

    consumer_tag: str
    key: str


Frame = JobFrame | EventFrame | CommandFrame | CloseFrame | PoolFrame
"""Anything the broker pushes to a client."""


class ClientEndpoint(Protocol):
    """The client end of a connection, as the broker sees it."""

    def push(self, frame: Frame) -> None:
        """Take a frame from the broker. Must not block and must not raise."""


# -- broker-side state --------------------------------------------------------------------


@dataclass(eq=False)
class _Stored:
    seq: int
    payload: bytes
    handed_out: int = 0


class _OrderedQueue:
    """Messages ordered by publish sequence: a requeued message regains its place."""

    def __init__(self) -> None:
        self._items: list[_Stored] = []

    def __len__(self) -> int:
        return len(self._items)

    def push(self, message: _Stored) -> None:
        bisect.insort(self._items, message, key=lambda m: m.seq)

    def pop(self) -> _Stored:
        return self._items.pop(0)


@dataclass(eq=False)
class _JobConsumer:
    tag: str
    conn: BrokerConnection
    prefetch: int
    held: set[int] = field(default_factory=set)
    queue: str = "jobs"


@dataclass(eq=False)
class _EventConsumer:
    tag: str
    conn: BrokerConnection
    held: int | None = None


@dataclass(eq=False)
class _CommandConsumer:
    tag: str
    conn: BrokerConnection
    server_id: str


@dataclass(eq=False)
class _Held:
    queue: str
    message: _Stored
    consumer_tag: str


class BrokerConnection:
    """The broker's side of one client connection (with its one channel).

    A client calls these methods when its frames reach the broker. Every method
    raises :class:`BackendUnavailable` once the connection is closed.
    """

    def __init__(self, broker: MemoryBroker, client: ClientEndpoint, label: str) -> None:
        self.broker = broker
        """The broker this connection belongs to."""
        self.client = client
        """Where the broker sends frames."""
        self.label = label
        """A name for logs."""
        self.open = True
        """False once the connection ended (for any reason)."""
        self._held: dict[int, _Held] = {}

    def __repr__(self) -> str:
        return f"<BrokerConnection {self.label} open={self.open} held={len(self._held)}>"

    def _check(self) -> None:
        if not self.open:
            raise BackendUnavailable("the broker closed this connection")

    @property
    def held(self) -> int:
        """How many deliveries (jobs and events) this connection holds."""
        return len(self._held)

    def publish(self, queue: str, payload: bytes) -> None:
        """Store a message on ``jobs``, a registered pool's ``jobs/<key>`` or
        ``events`` (stored = confirmed)."""
        self._check()
        self.broker._publish(queue, payload)

    def events_waiting(self) -> int:
        """How many events are not yet applied: waiting in ``events``, or handed to
        the active consumer and not yet acknowledged."""
        self._check()
        held = sum(1 for consumer in self.broker._event_consumers if consumer.held is not None)
        return len(self.broker._events) + held

    def register_pool(self, key: str) -> None:
        """Register a pool (idempotent): its queue exists from now on, and every
        pool watcher hears of it."""
        self._check()
        self.broker._register_pool(key)

    def watch_pools(self, tag: str) -> list[str]:
        """Watch pool registrations; returns the pools registered so far (the
        default pool, key ``""``, first)."""
        self._check()
        return self.broker._add_pool_watcher(tag, self)

    def send_command(self, payload: bytes, server_id: str | None) -> None:
        """Route a command to one server's subscriptions, or to all (``None``)."""
        self._check()
        self.broker._route_command(payload, server_id)

    def consume_jobs(self, tag: str, prefetch: int, queue: str = "jobs") -> None:
        """Start a consumer named ``tag`` on a jobs queue (``jobs`` or a registered
        pool's ``jobs/<key>``) holding at most ``prefetch`` messages."""
        self._check()
        if queue not in self.broker._job_queues:
            raise ValueError(f"no queue {queue!r}: register its pool first")
        self.broker._add_job_consumer(
            _JobConsumer(tag=tag, conn=self, prefetch=prefetch, queue=queue)
        )

    def set_prefetch(self, tag: str, prefetch: int) -> None:
        """Change a jobs consumer's prefetch; lowering it revokes nothing."""
        self._check()
        self.broker._set_prefetch(self, tag, prefetch)

    def consume_events(self, tag: str) -> None:
        """Join the events queue's single-active-consumer line."""
        self._check()
        self.broker._add_event_consumer(_EventConsumer(tag=tag, conn=self))

    def consume_commands(self, tag: str, server_id: str) -> frozenset[str]:
        """Subscribe to ``server_id``'s commands and broadcasts, then return the
        cancellation set, atomically (no cancellation can fall in between)."""
        self._check()
        return self.broker._add_command_consumer(
            _CommandConsumer(tag=tag, conn=self, server_id=server_id)
        )

    def cancel(self, tag: str) -> None:
        """Cancel a consumer. Held jobs stay held; an events consumer's held
        event goes back at once so that the next consumer gets it in order."""
        self._check()
        self.broker._cancel(self, tag)

    def ack(self, delivery_tag: int) -> None:
        """Remove a held message for good. Unknown tags are ignored."""
        self._check()
        self.broker._settle(self, delivery_tag, requeue=False)

    def reject(self, delivery_tag: int, *, requeue: bool) -> None:
        """Give a held message back (``requeue``) or drop it."""
        self._check()
        self.broker._settle(self, delivery_tag, requeue=requeue)

    def dead_letter(self, delivery_tag: int, reason: str) -> None:
        """Reject a held message for good (malformed, or refused by its handler):
        it moves to the dead letters."""
        self._check()
        self.broker._settle(self, delivery_tag, requeue=False, dead_letter=reason)

    def dead_letter_command(self, server_id: str, payload: bytes, reason: str) -> None:
        """Record a malformed command (commands are not held, so give the payload)."""
        self._check()
        self.broker._add_dead_letter(f"commands/{server_id}", payload, reason)

    def set_cancellations(self, job_ids: Iterable[str]) -> frozenset[str]:
        """Replace the cancellation set; return the previous one."""
        self._check()
        return self.broker._replace_cancellations(frozenset(job_ids))

    def close(self, reason: str = "closed by client") -> None:
        """End the connection gracefully: held messages go back. Idempotent."""
        self.broker._close_connection(self, reason, notify=False)


class MemoryBroker:
    """A named, process-global in-memory broker. See the module docstring."""

    _registry: ClassVar[dict[str, MemoryBroker]] = {}

    def __init__(self, name: str = DEFAULT_BROKER, dead_letter_limit: int = DEAD_LETTER_LIMIT):
        self.name = name
        """The name this broker is registered under."""
        self.dead_letters: deque[DeadLetter] = deque(maxlen=dead_letter_limit)
        """The newest ``dead_letter_limit`` messages rejected, oldest first (inspect in tests)."""
        self._seq = itertools.count()
        self._tags = itertools.count(1)
        self._jobs = _OrderedQueue()
        self._events = _OrderedQueue()
        self._job_queues: dict[str, _OrderedQueue] = {"jobs": self._jobs}
        self._pool_watchers: list[tuple[str, BrokerConnection]] = []
        self._cancellations: frozenset[str] = frozenset()
        self._connections: set[BrokerConnection] = set()
        self._job_consumers: list[_JobConsumer] = []
        self._next_consumer = 0
        self._event_consumers: list[_EventConsumer] = []
        self._command_consumers: list[_CommandConsumer] = []
        self._up = True
        self._dispatching = False
        self._dispatch_again = False

    def __repr__(self) -> str:
        return (
            f"<MemoryBroker {self.name!r} jobs={len(self._jobs)} events={len(self._events)} "
            f"connections={len(self._connections)}>"
        )

    # -- registry -----------------------------------------------------------------------

    @classmethod
    def get(
        cls, name: str | None = None, dead_letter_limit: int = DEAD_LETTER_LIMIT
    ) -> MemoryBroker:
        """The broker called ``name`` (``None``/empty: ``"default"``), created on first
        use (keeping at most ``dead_letter_limit`` dead letters)."""
        key = name or DEFAULT_BROKER
        broker = cls._registry.get(key)
        if broker is None:
            broker = cls._registry[key] = cls(key, dead_letter_limit)
        return broker

    @classmethod
    def reset(cls, name: str | None = None) -> None:
        """Forget the broker called ``name`` (``None``: every broker), for tests.
        Transports already connected keep talking to the forgotten instance."""
        if name is None:
            cls._registry.clear()
        else:
            cls._registry.pop(name or DEFAULT_BROKER, None)

    # -- inspection and fault injection (tests) -----------------------------------------

    @property
    def is_up(self) -> bool:
        """False while the broker is down during :meth:`broker_restart`."""
        return self._up

    @property
    def cancellations(self) -> frozenset[str]:
        """The durable cancellation set."""
        return self._cancellations

    @property
    def connections(self) -> int:
        """How many connections are open."""
        return len(self._connections)

    def depth(self, queue: str) -> int:
        """How many messages wait in ``queue`` (not counting held ones)."""
        return len(self._queue(queue))

    @property
    def pools(self) -> list[str]:
        """The keys of the registered pools (``""``: the default pool), in order."""
        return [""] + [name.removeprefix("jobs/") for name in self._job_queues if name != "jobs"]

    def held(self, queue: str = "jobs") -> int:
        """How many messages of ``queue`` are held by consumers right now."""
        return sum(1 for c in self._connections for h in c._held.values() if h.queue == queue)

    def inject_raw(self, queue: str, payload: bytes) -> None:
        """Put raw bytes on a queue, bypassing the codec (malformed, foreign or
        newer-version messages). ``queue`` is ``"jobs"``, ``"events"``,
        ``"commands"`` (broadcast) or ``"commands/<server_id>"``."""
        if queue in self._job_queues or queue == "events":
            self._publish(queue, payload)
        elif queue == "commands":
            self._route_command(payload, None)
        elif queue.startswith("commands/") and queue != "commands/":
            self._route_command(payload, queue.removeprefix("commands/"))
        else:
            raise ValueError(
                f"unknown queue {queue!r}: use 'jobs', 'events', 'commands' or 'commands/<server>'"
            )

    def broker_restart(self, downtime: float = 0.0) -> None:
        """Restart the broker: every connection drops at once (held messages go
        back), everything durable stays. For ``downtime`` seconds the broker then
        refuses connections; clients reconnect with backoff. Needs a running loop
        when ``downtime > 0``."""
        log.warning("broker %r restarting (down for %.2f s)", self.name, downtime)
        for conn in list(self._connections):
            self._close_connection(conn, "CONNECTION_FORCED - broker restart", notify=True)
        if downtime > 0:
            self._up = False
            asyncio.get_running_loop().call_later(downtime, self._come_up)

    def _come_up(self) -> None:
        self._up = True
        log.info("broker %r is up again", self.name)

    # -- connections --------------------------------------------------------------------

    def connect(self, client: ClientEndpoint, label: str) -> BrokerConnection:
        """Open a connection for ``client``. Raises :class:`BackendUnavailable`
        while the broker is down."""
        if not self._up:
            raise BackendUnavailable(f"memory broker {self.name!r} is restarting")
        conn = BrokerConnection(self, client, label)
        self._connections.add(conn)
        return conn

    def _close_connection(self, conn: BrokerConnection, reason: str, *, notify: bool) -> None:
        """End a connection: drop its consumers, tell the client (``notify``),
        then give its held messages back. The client hears of it first, so it
        fences its jobs before anyone else can receive them."""
        self._close(conn, reason, notify=notify, channel_only=False)

    def close_channel(self, conn: BrokerConnection, reason: str) -> None:
        """Close the connection's channel from the broker side (as on a consumer
        timeout): like a dropped connection, but the client reopens at once."""
        self._close(conn, reason, notify=True, channel_only=True)

    def _close(
        self, conn: BrokerConnection, reason: str, *, notify: bool, channel_only: bool
    ) -> None:
        if not conn.open:
            return
        conn.open = False
        self._connections.discard(conn)
        self._job_consumers = [c for c in self._job_consumers if c.conn is not conn]
        self._pool_watchers = [w for w in self._pool_watchers if w[1] is not conn]
        self._event_consumers = [c for c in self._event_consumers if c.conn is not conn]
        self._command_consumers = [c for c in self._command_consumers if c.conn is not conn]
        if notify:
            conn.client.push(CloseFrame(reason, channel_only=channel_only))
        held = sorted(conn._held.values(), key=lambda h: h.message.seq)
        conn._held.clear()
        for item in held:
            self._queue(item.queue).push(item.message)
        log.info(
            "connection %s closed (%s); %d held message(s) back in their queues",
            conn.label,
            reason,
            len(held),
        )
        self._dispatch()

    # -- queues -------------------------------------------------------------------------

    def _queue(self, queue: str) -> _OrderedQueue:
        if queue == "events":
            return self._events
        found = self._job_queues.get(queue)
        if found is None:
            raise BackendUnavailable(f"no queue {queue!r} (its pool was never registered)")
        return found

    def _register_pool(self, key: str) -> None:
        name = pool_queue(key)
        if name in self._job_queues:
            return
        self._job_queues[name] = _OrderedQueue()
        for tag, conn in self._pool_watchers:
            conn.client.push(PoolFrame(tag, key))

    def _add_pool_watcher(self, tag: str, conn: BrokerConnection) -> list[str]:
        self._pool_watchers.append((tag, conn))
        return self.pools

    def _publish(self, queue: str, payload: bytes) -> None:
        self._queue(queue).push(_Stored(seq=next(self._seq), payload=bytes(payload)))
        self._dispatch()

    def _route_command(self, payload: bytes, server_id: str | None) -> None:
        targets = [
            c for c in self._command_consumers if server_id is None or c.server_id == server_id
        ]
        if not targets:
            log.debug("command for %s dropped: no subscriber", server_id or "every server")
        for consumer in targets:
            consumer.conn.client.push(CommandFrame(consumer.tag, consumer.server_id, payload))

    def _add_job_consumer(self, consumer: _JobConsumer) -> None:
        self._job_consumers.append(consumer)
        self._dispatch()

    def _set_prefetch(self, conn: BrokerConnection, tag: str, prefetch: int) -> None:
        for consumer in self._job_consumers:
            if consumer.conn is conn and consumer.tag == tag:
                consumer.prefetch = prefetch
        self._dispatch()

    def _add_event_consumer(self, consumer: _EventConsumer) -> None:
        self._event_consumers.append(consumer)
        self._dispatch()

    def _add_command_consumer(self, consumer: _CommandConsumer) -> frozenset[str]:
        self._command_consumers.append(consumer)
        return self._cancellations

    def _cancel(self, conn: BrokerConnection, tag: str) -> None:
        self._job_consumers = [
            c for c in self._job_consumers if not (c.conn is conn and c.tag == tag)
        ]
        self._pool_watchers = [w for w in self._pool_watchers if w != (tag, conn)]
        self._command_consumers = [
            c for c in self._command_consumers if not (c.conn is conn and c.tag == tag)
        ]
        for consumer in [c for c in self._event_consumers if c.conn is conn and c.tag == tag]:
            self._event_consumers.remove(consumer)
            if consumer.held is not None:
                self._settle(conn, consumer.held, requeue=True)
        self._dispatch()

    def _settle(
        self,
        conn: BrokerConnection,
        delivery_tag: int,
        *,
        requeue: bool,
        dead_letter: str | None = None,
    ) -> None:
        item = conn._held.pop(delivery_tag, None)
        if item is None:
            return  # already given back (its consumer or channel went away)
        for job_consumer in self._job_consumers:
            job_consumer.held.discard(delivery_tag)
        for event_consumer in self._event_consumers:
            if event_consumer.held == delivery_tag:
                event_consumer.held = None
        if dead_letter is not None:
            self._add_dead_letter(item.queue, item.message.payload, dead_letter)
        elif requeue:
            self._queue(item.queue).push(item.message)
        self._dispatch()

    def _add_dead_letter(self, queue: str, payload: bytes, reason: str) -> None:
        self.dead_letters.append(DeadLetter(queue=queue, payload=payload, reason=reason))
        log.warning("dead-lettered a message on %s (%d bytes): %s", queue, len(payload), reason)

    def _replace_cancellations(self, job_ids: frozenset[str]) -> frozenset[str]:
        previous, self._cancellations = self._cancellations, job_ids
        return previous

    # -- dispatch -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand out what can be handed out. Re-entrant calls (a client settling
        synchronously inside a push) just ask the running loop to go round again."""
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            while True:
                self._dispatch_again = False
                self._dispatch_jobs()
                self._dispatch_events()
                if not self._dispatch_again:
                    return
        finally:
            self._dispatching = False

    def _next_job_consumer(self, queue: str) -> _JobConsumer | None:
        consumers = self._job_consumers
        for offset in range(len(consumers)):
            index = (self._next_consumer + offset) % len(consumers)
            consumer = consumers[index]
            if consumer.queue == queue and len(consumer.held) < consumer.prefetch:
                self._next_consumer = index + 1
                return consumer
        return None

    def _dispatch_jobs(self) -> None:
        for name, queue in self._job_queues.items():
            self._dispatch_queue(name, queue)

    def _dispatch_queue(self, name: str, queue: _OrderedQueue) -> None:
        while queue:
            consumer = self._next_job_consumer(name)
            if consumer is None:
                return
            message = queue.pop()
            count = message.handed_out
            message.handed_out += 1
            tag = next(self._tags)
            consumer.held.add(tag)
            consumer.conn._held[tag] = _Held(name, message, consumer.tag)
            consumer.conn.client.push(JobFrame(consumer.tag, tag, message.payload, count))

    def _dispatch_events(self) -> None:
        if not self._events or not self._event_consumers:
            return
        active = self._event_consumers[0]
        if active.held is not None:
            return
        message = self._events.pop()
        message.handed_out += 1
        tag = next(self._tags)
        active.held = tag
        active.conn._held[tag] = _Held("events", message, active.tag)
        active.conn.client.push(EventFrame(active.tag, tag, message.payload))
