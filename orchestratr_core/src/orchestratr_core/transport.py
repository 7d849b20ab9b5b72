"""The transport contract: what a message broker backend must do.

A transport plugin returns a :class:`Transport` from the
``orchestratr_make_transport`` hook. One ``Transport`` object is one logical
connection of one process (a server or a manager). Every method is a coroutine;
every method may raise :class:`~orchestratr_core.errors.BackendUnavailable`
when the broker cannot be reached (the caller retries with backoff) or
:class:`~orchestratr_core.errors.PermanentBackendError` when retrying cannot help.

The semantics below are what the core relies on for its invariants; the
conformance suite (``orchestratr_core.testing``) checks each of them.

Jobs
    A durable queue of :class:`~orchestratr_core.protocol.JobMessage`. A server
    *holds* a delivery, unacknowledged, for as long as it runs the job. The broker
    must never hand one message to two consumers at once while the first
    consumer's channel lives, and must give a held message back to the queue
    when that channel, connection or consumer ends (crash, partition detected,
    consumer cancelled). Job messages never expire and are never dropped for
    being redelivered too often.

Fencing
    Every delivery carries ``delivery_count``: how many times the broker handed
    this message out before (0 on the first delivery). It must grow on every
    new delivery of the same message. The core combines it with the message's
    generation into the job's fencing token. A broker without a per-message
    count (RabbitMQ classic queues) reports 0 on the first delivery and 1 on
    every later one; such a backend must document the weaker fence.

Loss
    When the channel, connection or consumer through which a delivery came is
    lost, *or the transport can no longer be sure it is alive* (no traffic from
    the broker for longer than its fence timeout), the transport must set
    :attr:`Delivery.lost` for every delivery that came through it, **before**
    the broker could have handed the message to someone else. The server stops
    those jobs at once. The transport then reconnects by itself, with backoff,
    and consumes again; jobs come back only as new deliveries. No client can
    promise this when the broker itself tears a delivery away (RabbitMQ's
    ``consumer_timeout``): a backend must configure the broker so that it never
    times out a held delivery, or hand deliveries back before it would.

Pools
    A job message is delivered in its *pool* (:class:`~orchestratr_core.placement.Pool`:
    its kind and canonical constraints; :attr:`JobMessage.pool`), and a server
    consumes each pool it can run with :meth:`Transport.consume_pool`, so that a
    job is only ever delivered to a server that runs its kind and satisfies its
    constraints. The default pool is the jobs queue of :meth:`consume_jobs`.
    :meth:`Transport.publish_job` registers a pool durably before its first
    message; :meth:`Transport.watch_pools` tells a server every registered pool
    and then each new one, without polling. Each pool's queue keeps every
    guarantee above (fencing, loss, no expiry, dead letters).

Cancellations
    A durable set of cancelled job ids, written by managers
    (:meth:`Transport.set_cancellations`) and read by servers when they
    subscribe to commands (:meth:`Transport.consume_commands`), *before* their
    first job delivery. Additions reach live servers as :class:`CancelJob`
    commands.

Events
    Server -> manager messages on one queue. Events published by one transport
    object are delivered in publish order. Several managers may subscribe, but
    only one consumes at a time (single active consumer), so that every event
    is handled once and in order; when it goes away another takes over. If the
    handler raises, the event is handed to the handler again, in order, with
    backoff; nothing newer is delivered meanwhile -- except when it raises
    :class:`~orchestratr_core.errors.DeadLetter`: the handler says the event can
    never be handled (the storage refused its values), so the transport
    dead-letters it (as it does a malformed message, with one warning line
    carrying the exception's message), never hands it to any handler again,
    and delivers the next event. This is what keeps one poisoned event from
    halting a manager.

Malformed messages
    Anything on any queue that :func:`orchestratr_core.protocol.decode` rejects
    is dead-lettered (or dropped where the broker has no dead-letter facility)
    with one warning log line; the consumer keeps running. ``decode`` raises
    nothing but :class:`~orchestratr_core.errors.MalformedMessage`, whatever
    the bytes.

Authenticity
    A transport whose messages cross process boundaries should accept a fleet
    key (:mod:`orchestratr_core.signing`): sign what it publishes, and treat a
    message without a valid authenticator as malformed (never act on it). An
    in-process transport (the memory one) need not.

Dead letters
    Whatever a transport dead-letters is kept for inspection in a *bounded*
    place (RabbitMQ: ``<ns>.dead``, 10,000 messages; memory: the broker's
    ``dead_letters``, as many), the oldest dropped first, so that a flood of bad
    messages cannot fill the broker.
"""

from __future__ import annotations

import abc
import asyncio
import math
from collections.abc import Awaitable, Callable, Collection
from typing import ClassVar

from orchestratr_core.errors import ConfigurationError
from orchestratr_core.placement import DEFAULT_POOL, Pool
from orchestratr_core.protocol import Command, Event, JobMessage

__all__ = [
    "CommandHandler",
    "Delivery",
    "DeliveryHandler",
    "EventHandler",
    "JobConsumer",
    "PoolHandler",
    "Subscription",
    "Transport",
]


class Delivery(abc.ABC):
    """One job message held by a server."""

    @property
    @abc.abstractmethod
    def message(self) -> JobMessage:
        """The decoded job message."""

    @property
    @abc.abstractmethod
    def delivery_count(self) -> int:
        """How many times this message was delivered before this delivery (0 = first)."""

    @property
    @abc.abstractmethod
    def lost(self) -> asyncio.Event:
        """Set when this delivery is no longer ours: its channel, connection or
        consumer is gone or can no longer be trusted. Once set it stays set."""

    @property
    def valid_until(self) -> float:
        """A :func:`time.monotonic` deadline until which this delivery is certainly
        still ours: the last sign of life from the broker plus the fence timeout.
        Once it has passed, the transport sets :attr:`lost` (at its next check).
        Job code reads it through its stop token, so a process that was frozen
        (SIGSTOP, a long GC pause, a suspended VM) stops before doing one more step
        with a message the broker may have given away. Default: no deadline."""
        return math.inf

    @abc.abstractmethod
    async def ack(self) -> None:
        """Remove the message from the queue for good (job completed, cancelled,
        or superseded by another copy). Raises :class:`DeliveryLost` if the
        delivery was lost (the message is then back in the queue). Returns once
        the ack is sent: if the connection is lost before the broker processed
        it, the message is delivered again — the cancellation set makes that
        harmless. Settling a delivery twice raises :class:`RuntimeError`."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the message back to the queue so that another server takes it.
        The next delivery of it has a larger ``delivery_count``. Raises
        :class:`DeliveryLost` if the delivery was lost (it is back already)."""


DeliveryHandler = Callable[[Delivery], Awaitable[None]]
CommandHandler = Callable[[Command], Awaitable[None]]
EventHandler = Callable[[Event], Awaitable[None]]
PoolHandler = Callable[[Pool], Awaitable[None]]


class Subscription(abc.ABC):
    """A running consumer. :meth:`close` stops it; held messages are unaffected."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop consuming. Idempotent."""


class _NoSubscription(Subscription):
    """What :meth:`Transport.watch_pools` returns when nothing is watched."""

    async def close(self) -> None:
        """Nothing to stop."""


class JobConsumer(Subscription):
    """The server's consumer on the jobs queue."""

    @abc.abstractmethod
    async def set_capacity(self, capacity: int) -> None:
        """Hold at most ``capacity`` unacknowledged deliveries at once (prefetch).
        0 pauses delivery without giving back what is held. Lowering it below
        what is held never revokes a delivery."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop receiving new deliveries (cancel the consumer). Deliveries
        already held stay held and valid until acked or released; only a broker
        that cannot keep them after a consumer cancel may mark them lost.
        Deliveries received but not yet passed to the handler are released."""


class Transport(abc.ABC):
    """One process's connection to the broker. See the module docstring."""

    process_local: ClassVar[bool] = False
    """True when the broker lives inside this process (the memory transport):
    no server in another process ever sees what it publishes."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and declare what is needed. Raises :class:`PermanentBackendError`
        at once for wrong credentials or a missing vhost, and
        :class:`BackendUnavailable` when the broker cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close everything. Held deliveries are marked lost and go back to the
        queue. Idempotent."""

    @property
    def connected(self) -> bool:
        """True while this transport holds a live session with the broker (one its
        fence has given up on is not live). Readiness probes (``/readyz``) read it;
        a transport that cannot tell answers True."""
        return True

    def crash(self) -> Awaitable[None] | None:
        """Die at once, as ``kill -9`` of the process would: no goodbye, every held
        delivery lost (idempotent). Called by :meth:`OrchestratedServer.kill`
        (tests, the demo) before it closes the transport; it may return an
        awaitable, which is awaited. The default does nothing: the close that
        follows gives the deliveries back."""
        return None

    # -- manager side -----------------------------------------------------------

    @abc.abstractmethod
    async def publish_job(self, message: JobMessage) -> None:
        """Publish a job message durably to its pool (``message.pool``; a transport
        without pools takes only the default pool's messages and raises
        :class:`~orchestratr_core.errors.ConfigurationError` for others), registering
        the pool first if it is new. Returns only after the broker confirmed
        it stored the message; raises :class:`PublishError` otherwise. Publishing
        the same message twice is allowed (the core fences duplicates)."""

    @abc.abstractmethod
    async def send_command(self, command: Command, server_id: str | None = None) -> None:
        """Send a command to one server (``server_id``) or to every live server
        (``None``). A command for a server that is gone may be dropped."""

    @abc.abstractmethod
    async def set_cancellations(self, job_ids: Collection[str]) -> None:
        """Replace the durable cancellation set with ``job_ids`` and broadcast a
        :class:`CancelJob` to live servers for each id not in the previous set
        (as stored by the broker, or as last written by this transport;
        broadcasting an id again is harmless). Confirmed before it returns."""

    @abc.abstractmethod
    async def consume_events(self, handler: EventHandler) -> Subscription:
        """Consume server events. The handler is awaited for one event at a time
        per consumer; if it raises, the event is redelivered later -- unless it
        raises :class:`~orchestratr_core.errors.DeadLetter`: then the event is
        dead-lettered with one warning line and the next one is delivered."""

    async def events_backlog(self) -> int | None:
        """How many events are not yet applied: waiting in the events queue, or
        taken by a consumer of this transport and not yet acknowledged (the one
        being applied included) -- the manager's leader reads it
        (:mod:`orchestratr_core.frontier`).
        ``None``: this transport cannot tell (the default). May raise
        :class:`~orchestratr_core.errors.OrchestratrError` when the broker does
        not answer."""
        return None

    # -- server side ------------------------------------------------------------

    @abc.abstractmethod
    async def publish_event(self, event: Event) -> None:
        """Publish an event to the managers, confirmed. Events of this transport
        object keep their order."""

    @abc.abstractmethod
    async def consume_commands(
        self, server_id: str, handler: CommandHandler
    ) -> tuple[Subscription, frozenset[str]]:
        """Subscribe to the commands for ``server_id`` and to broadcasts, then
        read the durable cancellation set. Returns the subscription and that
        set; every cancellation added later arrives as a :class:`CancelJob`.
        When the transport reconnects by itself it reads the set again and
        delivers a :class:`CancelJob` for every id added while it was away,
        before any new job delivery. The set holds every job that must never
        run again (cancelled, and completed ones too). If the handler raises,
        the error is logged and the command dropped: the durable set is
        authoritative, and the manager repeats stop commands on the next
        heartbeat that shows the job."""

    @abc.abstractmethod
    async def consume_jobs(self, capacity: int, handler: DeliveryHandler) -> JobConsumer:
        """Start consuming the jobs queue with at most ``capacity`` held deliveries.
        The handler is called once per delivery and should return quickly (the
        server starts the job in a task). Deliveries that fail to decode are
        dead-lettered and never reach the handler."""

    async def consume_pool(
        self, pool: Pool, capacity: int, handler: DeliveryHandler
    ) -> JobConsumer:
        """:meth:`consume_jobs` for one pool's queue: only messages of ``pool`` are
        delivered through it. The pool must be registered (:meth:`watch_pools`
        named it) unless it is the default pool. This default serves the default
        pool only (a backend without pools)."""
        if pool.is_default:
            return await self.consume_jobs(capacity, handler)
        raise ConfigurationError(
            f"{type(self).__name__} does not route job kinds or placement constraints "
            f"(pool {pool.key!r})"
        )

    async def watch_pools(self, handler: PoolHandler) -> Subscription:
        """Call ``handler`` with every registered pool (the default pool always
        among them), then with each pool registered later, as it is registered.
        After a reconnect the registered pools are named again: the handler must
        be idempotent. This default names only the default pool."""
        await handler(DEFAULT_POOL)
        return _NoSubscription()
