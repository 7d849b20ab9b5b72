"""The RabbitMQ transport: jobs held as unacknowledged deliveries, fenced by the client.

One :class:`RabbitMQTransport` owns at most one live :class:`_Session` (one AMQP
connection and its channels). A session dies as a whole: when its connection or any
of its long-lived channels closes, when the broker cancels one of its consumers, or
when the fence watchdog has not had an answer from the broker for ``fence_timeout``
seconds. Dying marks every job delivery of the session lost *first* (synchronously),
then closes the connection and starts a reconnect loop with backoff. aio-pika's
robust connection is deliberately not used: it re-consumes silently after a channel
closes, which runs jobs twice (see ``docs/rabbitmq.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.abc
from aiormq import spec

from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    DeadLetter,
    DeliveryLost,
    MalformedMessage,
    OrchestratrError,
    PermanentBackendError,
    PublishError,
)
from orchestratr_core.metrics import record_reconnect
from orchestratr_core.protocol import (
    CancelJob,
    Command,
    Event,
    JobMessage,
    decode_as,
    encode,
)
from orchestratr_core.signing import SignatureError
from orchestratr_core.transport import (
    CommandHandler,
    Delivery,
    DeliveryHandler,
    EventHandler,
    JobConsumer,
    Subscription,
    Transport,
)
from orchestratr_rabbitmq.settings import Settings
from orchestratr_rabbitmq.topology import BrokerVersion, Topology

__all__ = ["RabbitMQTransport"]

log = logging.getLogger("orchestratr.transport.rabbitmq")


class _Quiet(contextlib.AbstractContextManager[None]):
    """Suppress what a dying connection raises while we tidy up: any error, and a
    ``CancelledError`` that aiormq raises from a cancelled RPC — but never the
    cancellation of the task we run in."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None:
            return False
        if issubclass(exc_type, asyncio.CancelledError):
            task = asyncio.current_task()
            return not (task is not None and task.cancelling())
        return issubclass(exc_type, Exception)


_SNAPSHOT_TYPE = "cancellations"
_SIGNATURE = "x-orchestratr-signature"
_SIGNED_AT = "x-orchestratr-signed-at"
_warned_consumer_timeout: set[str] = set()


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


# -- deliveries ----------------------------------------------------------------------------


class _RabbitDelivery(Delivery):
    """One job delivery held on the jobs channel of one session."""

    def __init__(
        self,
        consumer: _JobConsumer,
        session: _Session,
        channel: aiormq.abc.AbstractChannel,
        delivery_tag: int,
        consumer_tag: str,
        message: JobMessage,
        delivery_count: int,
    ) -> None:
        self._consumer = consumer
        self.session = session
        self.channel = channel
        self.delivery_tag = delivery_tag
        self.consumer_tag = consumer_tag
        self._message = message
        self._delivery_count = delivery_count
        self._lost = asyncio.Event()
        self._lost_at = math.inf
        self.settled = False
        self.renewal: asyncio.TimerHandle | None = None
        self.renew_at = math.inf

    @property
    def message(self) -> JobMessage:
        """The decoded job message."""
        return self._message

    @property
    def delivery_count(self) -> int:
        """Prior deliveries of this message (``x-delivery-count`` / ``x-acquired-count``)."""
        return self._delivery_count

    @property
    def lost(self) -> asyncio.Event:
        """Set when the session that delivered this job died or was fenced."""
        return self._lost

    @property
    def valid_until(self) -> float:
        """Monotonic deadline until which this delivery is certainly ours: the send
        time of the newest fence ping the broker answered plus ``fence_timeout``
        (earlier if the job is due to be handed back before a broker timeout)."""
        if self._lost.is_set():
            return self._lost_at
        return min(self.session.lease_deadline(), self.renew_at)

    def mark_lost(self) -> None:
        """Give the delivery up (idempotent, synchronous)."""
        if self.renewal is not None:
            self.renewal.cancel()
            self.renewal = None
        if not self._lost.is_set():
            self._lost_at = time.monotonic()
        self._lost.set()

    async def ack(self) -> None:
        """Remove the message for good; :class:`DeliveryLost` if it was lost."""
        await self._consumer.settle(self, ack=True)

    async def release(self) -> None:
        """Requeue the message; :class:`DeliveryLost` if it was lost."""
        await self._consumer.settle(self, ack=False)

    def __repr__(self) -> str:
        return (
            f"<RabbitMQ delivery job={self._message.job_id} count={self._delivery_count} "
            f"lost={self._lost.is_set()}>"
        )


def _tag(message: aiormq.abc.DeliveredMessage) -> int:
    tag = getattr(message.delivery, "delivery_tag", None)
    if not isinstance(tag, int):
        raise MalformedMessage("a delivery without a delivery tag")
    return tag


def _delivery_count(message: aiormq.abc.DeliveredMessage, topology: Topology) -> int:
    if not getattr(message.delivery, "redelivered", False):
        # A first delivery: any count header is the publisher's, not the broker's (a
        # forged x-delivery-count would otherwise raise the fence of a replayed job).
        return 0
    headers: dict[str, Any] = dict(message.header.properties.headers or {})
    counts = [
        value
        for key in ("x-delivery-count", "x-acquired-count")
        if isinstance(value := headers.get(key), int) and not isinstance(value, bool)
    ]
    if counts:
        return max(counts)
    if topology.queue_type == "classic":
        # Classic queues keep no count: only "delivered before", a weaker fence.
        return 1 if getattr(message.delivery, "redelivered", False) else 0
    return 0


async def _declare_exchange(
    name: str, kind: str, channel: aiormq.abc.AbstractChannel, *, passive: bool
) -> None:
    await channel.exchange_declare(name, exchange_type=kind, durable=True, passive=passive)


async def _declare_queue(
    name: str, arguments: dict[str, Any], channel: aiormq.abc.AbstractChannel, *, passive: bool
) -> None:
    await channel.queue_declare(name, durable=True, passive=passive, arguments=arguments or None)


async def _delete_if_empty(name: str, channel: aiormq.abc.AbstractChannel) -> None:
    await channel.queue_delete(name, if_empty=True)


async def _bind(queue: str, exchange: str, key: str, channel: aiormq.abc.AbstractChannel) -> None:
    await channel.queue_bind(queue, exchange, routing_key=key)


# -- session -------------------------------------------------------------------------------


class _Session:
    """Two AMQP connections that live and die together: ``connection`` consumes (jobs,
    commands, events, the fence pings) and ``publisher`` publishes. RabbitMQ blocks a
    connection that publishes during a memory or disk alarm; keeping consumers off it
    keeps the fence answered, so an alarm never looks like a partition."""

    def __init__(
        self,
        transport: RabbitMQTransport,
        connection: aio_pika.abc.AbstractConnection,
        publisher: aio_pika.abc.AbstractConnection,
        topology: Topology,
        generation: int,
        started: float,
    ) -> None:
        self.transport = transport
        self.settings = transport.settings
        self.connection = connection
        self.publisher = publisher
        self.topology = topology
        self.generation = generation
        self.alive = True
        self.reason = ""
        """Why the session died (empty while alive)."""
        self.deliveries: set[_RabbitDelivery] = set()
        self.control: aio_pika.abc.AbstractChannel | None = None
        self._ping: aio_pika.abc.AbstractChannel | None = None
        self._watched: set[aiormq.abc.AbstractChannel] = set()
        self._loop = asyncio.get_running_loop()
        self._last_ok = started
        # The same instant on time.monotonic(), which job code compares leases with
        # (the loop's clock may be another one).
        self._last_ok_monotonic = time.monotonic() - (self._loop.time() - started)
        self._deadline: asyncio.TimerHandle | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._declare_channel: aio_pika.abc.AbstractChannel | None = None
        self._failed_at = math.inf
        self._waits: dict[asyncio.Task[Any] | None, asyncio.Timeout] = {}
        self.mismatched: set[str] = set()
        """Queues that exist with other arguments than this version declares."""

    @staticmethod
    def underlay(connection: aio_pika.abc.AbstractConnection) -> aiormq.abc.AbstractConnection:
        """The aiormq connection under an aio-pika one."""
        transport = getattr(connection, "transport", None)
        if transport is None:
            raise BackendUnavailable("the RabbitMQ connection is closed")
        underlay: aiormq.abc.AbstractConnection = transport.connection
        return underlay

    async def open(self) -> None:
        """Open channels, declare the namespace, start the watchdog."""
        for what, connection in (("connection", self.connection), ("publishing", self.publisher)):
            self.underlay(connection).closing.add_done_callback(
                functools.partial(self._on_connection_closed, what)
            )
        self._arm(self._last_ok, self._last_ok_monotonic)
        await self._declare()
        self.control = await self.channel("control", publisher_confirms=True)
        self._ping = await self.channel("ping")
        self._pinger = asyncio.create_task(self._ping_loop(), name="orchestratr-rabbitmq-fence")

    async def channel(
        self, what: str, *, publisher_confirms: bool = False
    ) -> aio_pika.abc.AbstractChannel:
        """Open a long-lived channel whose closure kills the session (publishing
        channels on the publishing connection, the others on the consuming one)."""
        connection = self.publisher if publisher_confirms else self.connection
        channel = await connection.channel(
            publisher_confirms=publisher_confirms, on_return_raises=publisher_confirms
        )
        underlay = await channel.get_underlay_channel()
        self._watched.add(underlay)
        underlay.closing.add_done_callback(
            functools.partial(self._on_channel_closed, what, underlay)
        )
        return channel

    async def close_channel(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """Close a long-lived channel on purpose (its held messages are requeued)."""
        with _Quiet():
            underlay = await channel.get_underlay_channel()
            self._watched.discard(underlay)
        with _Quiet():
            await channel.close()

    async def _declare(self) -> None:
        """Declare the namespace. What this broker user may not configure (a server or
        web user under least privilege, ``docs/deployment.md``) must exist already: it
        is checked passively instead (a manager declared it)."""
        t = self.topology
        try:
            for name, kind in (
                (t.dead_letter_exchange, "fanout"),
                (t.commands_exchange, "direct"),
                (t.broadcast_exchange, "fanout"),
                (t.jobs_exchange, "direct"),
                (t.events_exchange, "direct"),
                (t.cancellations_exchange, "direct"),
            ):
                await self._ensure(
                    "exchange",
                    name,
                    functools.partial(_declare_exchange, name, kind, passive=False),
                    functools.partial(_declare_exchange, name, kind, passive=True),
                )
            await self._ensure_dead()
            for name, arguments in (
                (t.cancellations_lock, {"x-queue-type": "classic"}),
                (t.jobs, t.jobs_arguments()),
                (t.events, t.events_arguments()),
                (t.cancellations, t.cancellations_arguments()),
            ):
                await self._ensure(
                    "queue",
                    name,
                    functools.partial(_declare_queue, name, arguments, passive=False),
                    functools.partial(_declare_queue, name, {}, passive=True),
                )
            for queue, exchange, key in (
                (t.dead, t.dead_letter_exchange, "#"),
                *((q, x, q) for q, x in t.bindings()),
            ):
                # A binding cannot be checked passively: a user who may not make it
                # relies on a manager having made it.
                await self._declaring(
                    functools.partial(_bind, queue, exchange, key), refused_ok=True
                )
        finally:
            if self._declare_channel is not None:
                with _Quiet():
                    await self._declare_channel.close()
                self._declare_channel = None

    async def _ensure_dead(self) -> None:
        """``<ns>.dead`` with its length limit. An older version declared it without
        one, and arguments cannot change: such a queue is replaced while it is empty
        (``if_empty`` makes the delete atomic), else used as it is with a warning
        naming the commands that bound it."""
        t = self.topology
        declare = functools.partial(_declare_queue, t.dead, t.dead_arguments(), passive=False)
        check = functools.partial(_declare_queue, t.dead, {}, passive=True)
        error = await self._declaring(declare)
        if error is None:
            return
        if isinstance(error, aiormq.exceptions.ChannelPreconditionFailed):
            refused = await self._declaring(functools.partial(_delete_if_empty, t.dead))
            if refused is None and await self._declaring(declare) is None:
                log.info("replaced the unbounded queue %s (empty) by a bounded one", t.dead)
                return
            log.warning(
                "queue %s has no length limit (declared by an older version) and "
                "cannot be replaced now (%s; it holds messages or we may not delete "
                "it): inspect and purge it, or bound it with a policy "
                "(docs/rabbitmq.md, 'Dead letters')",
                t.dead,
                _describe(refused or error),
            )
            declare = check  # use it as it is
        await self._ensure("queue", t.dead, declare, check)

    async def _declaring(
        self,
        step: Callable[[aiormq.abc.AbstractChannel], Awaitable[Any]],
        *,
        refused_ok: bool = False,
    ) -> aiormq.exceptions.AMQPChannelError | None:
        """Run one declaration; return the channel error that closed the channel
        (``ACCESS_REFUSED``, ``PRECONDITION_FAILED``, ``NOT_FOUND``), which reopens."""
        if self._declare_channel is None or self._declare_channel.is_closed:
            self._declare_channel = await self.connection.channel(publisher_confirms=False)
        underlay = await self._declare_channel.get_underlay_channel()
        try:
            await step(underlay)
        except (
            aiormq.exceptions.ChannelAccessRefused,
            aiormq.exceptions.ChannelPreconditionFailed,
            aiormq.exceptions.ChannelNotFoundEntity,
        ) as exc:
            self._declare_channel = None
            if refused_ok and isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
                return None
            return exc
        return None

    async def _ensure(
        self,
        kind: str,
        name: str,
        declare: Callable[[aiormq.abc.AbstractChannel], Awaitable[Any]],
        check: Callable[[aiormq.abc.AbstractChannel], Awaitable[Any]],
    ) -> None:
        error = await self._declaring(declare)
        if error is None:
            return
        if isinstance(error, aiormq.exceptions.ChannelPreconditionFailed):
            # Declared earlier with other arguments (another broker version, another
            # queue_type): use it as it is rather than refuse to start.
            log.warning(
                "%s %s exists with other arguments than this version asks for (%s); "
                "using it as it is",
                kind,
                name,
                _describe(error),
            )
            self.mismatched.add(name)
        elif not isinstance(error, aiormq.exceptions.ChannelAccessRefused):
            raise error
        if await self._declaring(check) is not None:
            raise PermanentBackendError(
                f"RabbitMQ at {self.settings.host}: the {kind} {name!r} does not exist and "
                f"broker user {self.settings.user or 'guest'!r} may not declare it; start a "
                "manager (whose user may configure the namespace) first (docs/deployment.md)"
            )

    async def exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        """The publishing handle of an exchange ('' is the default exchange)."""
        if self.control is None:
            raise BackendUnavailable("the RabbitMQ session is not open")
        if name == "":
            return self.control.default_exchange
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self.control.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    @contextlib.asynccontextmanager
    async def bounded(self, seconds: float) -> AsyncIterator[None]:
        """Bound a wait on the broker by ``seconds`` and by this session's life: when
        the session fails (the fence, a closed connection or channel), the wait ends
        at once with :class:`TimeoutError`, so a caller can retry on the next session
        rather than wait for the dead one to be torn down."""
        if not self.alive:
            raise BackendUnavailable(f"RabbitMQ at {self.settings.host}: connection lost")
        task = asyncio.current_task()
        if task in self._waits:  # inside an outer bound of this task: that one holds
            yield
            return
        cancelling = task.cancelling() if task is not None else 0
        async with asyncio.timeout(seconds) as deadline:
            self._waits[task] = deadline
            try:
                yield
            except asyncio.CancelledError:
                # aiormq cancels the confirm futures of a connection it closes: that
                # is the session ending, not our caller being cancelled.
                if task is None or task.cancelling() > cancelling:
                    raise
                raise TimeoutError from None
            finally:
                del self._waits[task]

    # -- the fence ----------------------------------------------------------------

    def _arm(self, sent: float, sent_monotonic: float) -> None:
        """A round trip that started at ``sent`` succeeded: the broker heard from us at
        or after ``sent``, so it cannot drop us before ``sent + 2 * heartbeat``."""
        if not self.alive or sent < self._last_ok:
            return
        self._last_ok = sent
        self._last_ok_monotonic = sent_monotonic
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._loop.call_at(sent + self.settings.fence_timeout, self._fence)

    def lease_deadline(self) -> float:
        """When the fence will give this session up unless the broker answers again."""
        if not self.alive:
            return self._failed_at
        return self._last_ok_monotonic + self.settings.fence_timeout

    def _fence(self) -> None:
        self.fail(
            f"no answer from the broker for {self.settings.fence_timeout:g}s "
            f"(fence timeout; heartbeat {self.settings.heartbeat}s)"
        )

    async def _ping_loop(self) -> None:
        assert self._ping is not None
        try:
            underlay = await self._ping.get_underlay_channel()
            while self.alive:
                sent, sent_monotonic = self._loop.time(), time.monotonic()
                await underlay.basic_qos(prefetch_count=1, timeout=self.settings.fence_timeout)
                self._arm(sent, sent_monotonic)
                await asyncio.sleep(
                    max(0.0, sent + self.settings.ping_interval - self._loop.time())
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of the ping means the session is gone
            self.fail(f"fence ping failed: {_describe(exc)}")

    # -- death ----------------------------------------------------------------------

    def _on_connection_closed(self, what: str, future: asyncio.Future[Any]) -> None:
        exc = None if future.cancelled() else future.exception()
        self.fail(f"{what} closed: {_describe(exc)}")

    def _on_channel_closed(
        self, what: str, channel: aiormq.abc.AbstractChannel, future: asyncio.Future[Any]
    ) -> None:
        if channel not in self._watched:
            return
        exc = None if future.cancelled() else future.exception()
        self.fail(f"{what} channel closed by the broker: {_describe(exc)}")

    def fail(self, reason: str, *, expected: bool = False) -> None:
        """Declare the session dead: every delivery is lost *now*, then reconnect."""
        if not self.alive:
            return
        self.alive = False
        self.reason = reason
        self._failed_at = time.monotonic()
        held = list(self.deliveries)
        for delivery in held:
            delivery.mark_lost()
        self.deliveries.clear()
        if self._deadline is not None:
            self._deadline.cancel()
        if self._pinger is not None and self._pinger is not asyncio.current_task():
            self._pinger.cancel()
        for wait in self._waits.values():
            if not wait.expired():  # one that timed out already ends by itself
                wait.reschedule(self._loop.time())  # end every wait on the broker now
        if expected:
            log.debug("RabbitMQ session %d closed (%s)", self.generation, reason)
        else:
            log.warning(
                "RabbitMQ session lost: %s; %d held job(s) marked lost; reconnecting",
                reason,
                len(held),
            )
        self.transport._session_failed(self, expected=expected)

    async def shutdown(self) -> None:
        """Close the connection (its held messages go back to the queue)."""
        for connection in (self.connection, self.publisher):
            with _Quiet():
                await asyncio.wait_for(connection.close(), timeout=5)


# -- subscriptions -------------------------------------------------------------------------


class _Subscription(Subscription):
    """A consumer that is re-attached to every new session, in ``order``."""

    order = 0

    def __init__(self, transport: RabbitMQTransport) -> None:
        self.transport = transport
        self.session: _Session | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.closed = False

    async def attach(self, session: _Session) -> None:
        """Start consuming on ``session``."""
        raise NotImplementedError

    def ended(self, session: _Session) -> bool:
        """True once this subscription or ``session`` is over."""
        return self.closed or not session.alive

    def _dead_letter(
        self,
        channel: aiormq.abc.AbstractChannel,
        message: aiormq.abc.DeliveredMessage,
        queue: str,
        exc: Exception,
    ) -> Awaitable[None]:
        log.warning(
            "dead-lettering a malformed message from %s to %s: %s",
            queue,
            self.transport.topology_name("dead"),
            _describe(exc),
        )
        return channel.basic_reject(_tag(message), requeue=False)

    async def _watch_cancel(self, session: _Session, what: str) -> aiormq.abc.AbstractChannel:
        assert self.channel is not None
        underlay = await self.channel.get_underlay_channel()

        def cancelled(frame: spec.Basic.Cancel) -> None:
            if not self.closed:
                session.fail(f"the broker cancelled the {what} consumer {frame.consumer_tag}")

        underlay.on_consumer_cancel_callbacks.add(cancelled)
        return underlay


class _JobConsumer(_Subscription, JobConsumer):
    order = 2

    def __init__(self, transport: RabbitMQTransport, capacity: int, handler: DeliveryHandler):
        super().__init__(transport)
        self.capacity = capacity
        self.handler = handler
        self.lock = asyncio.Lock()
        self.underlay: aiormq.abc.AbstractChannel | None = None
        self.tag: str | None = None
        self.prefetch = 0
        self.current = 0
        """Deliveries of the current consumer (``tag``) still held: the broker's
        credit for it is ``prefetch - current``."""
        self.held: dict[int, _RabbitDelivery] = {}

    async def attach(self, session: _Session) -> None:
        async with self.lock:
            self.session = session
            self.held = {}
            self.tag = None
            self.prefetch = 0
            self.current = 0
            self.channel = await session.channel("jobs")
            self.underlay = await self._watch_cancel(session, "jobs")
            await self._reconcile()

    async def _reconcile(self) -> None:
        """Never let the broker push more than the capacity, and grant at most
        ``prefetch_step`` deliveries ahead of what is held. RabbitMQ applies
        ``basic.qos`` to new consumers only, so another credit needs a new consumer;
        held deliveries stay held, those of cancelled consumers too. The step bounds
        how many unread deliveries can queue ahead of a fence ping's answer: a server
        with room for 20,000 jobs that took them in one step fell behind its pings and
        fenced itself (docs/benchmarks.md)."""
        session, underlay = self.session, self.underlay
        if self.closed or session is None or underlay is None or not session.alive:
            return
        if self.tag is not None:
            # The current consumer may hold up to its prefetch (settling gives the
            # credit back), so `others + prefetch` is what the broker may make us
            # hold. Keep the consumer while that fits and it still has credit, or
            # while it fills the capacity exactly.
            others = len(self.held) - self.current
            if others + self.prefetch <= self.capacity and (
                self.current < self.prefetch or others + self.prefetch == self.capacity
            ):
                return
            await underlay.basic_cancel(self.tag)
            self.tag = None
            self.prefetch = 0
            self.current = 0
        desired = min(self.transport.settings.prefetch_step, self.capacity - len(self.held))
        if desired <= 0:
            return  # prefetch 0 would mean "unlimited": pause by not consuming
        await underlay.basic_qos(prefetch_count=desired)
        ok = await underlay.basic_consume(
            session.topology.jobs,
            functools.partial(self._on_message, session, underlay),
            no_ack=False,
            arguments=session.topology.jobs_consumer_arguments(),
        )
        self.tag = ok.consumer_tag
        self.prefetch = desired
        # Deliveries may have arrived before consume-ok was read: count them now.
        self.current = sum(1 for d in self.held.values() if d.consumer_tag == self.tag)
        self._maybe_step_up()

    def _maybe_step_up(self) -> None:
        if self.current >= self.prefetch and len(self.held) < self.capacity:
            self.transport._spawn(self._step_up())

    def _drop_held(self, delivery: _RabbitDelivery) -> None:
        """A held delivery was settled: it no longer counts against the credit."""
        if self.held.pop(delivery.delivery_tag, None) is not None and (
            delivery.consumer_tag == self.tag
        ):
            self.current -= 1

    async def _step_up(self) -> None:
        """The current consumer used up its credit and there is room: consume again."""
        async with self.lock:
            with _Quiet():
                await self._reconcile()

    async def _on_message(
        self,
        session: _Session,
        underlay: aiormq.abc.AbstractChannel,
        raw: aiormq.abc.DeliveredMessage,
    ) -> None:
        if not session.alive:
            return  # the old connection is being closed; the broker requeues it
        tag = _tag(raw)
        consumer_tag = getattr(raw.delivery, "consumer_tag", None) or ""
        try:
            self.transport.verify(raw)
            message = decode_as(raw.body, JobMessage)
        except MalformedMessage as exc:
            with _Quiet():
                await self._dead_letter(underlay, raw, session.topology.jobs, exc)
            return
        delivery = _RabbitDelivery(
            self,
            session,
            underlay,
            tag,
            consumer_tag,
            message,
            _delivery_count(raw, session.topology),
        )
        self.held[tag] = delivery
        session.deliveries.add(delivery)
        if self.tag is not None and consumer_tag == self.tag:
            self.current += 1
            if self.current == self.prefetch:
                self._maybe_step_up()
        self.transport._schedule_renewal(delivery)
        if self.closed:
            with contextlib.suppress(DeliveryLost):
                await delivery.release()
            return
        try:
            await self.handler(delivery)
        except Exception:
            log.exception("job delivery handler raised; releasing job %s", message.job_id)
            with contextlib.suppress(DeliveryLost):
                await delivery.release()

    async def settle(self, delivery: _RabbitDelivery, *, ack: bool) -> None:
        """Ack or requeue, then wait for a round trip on the same channel so that the
        broker has certainly processed it before we return."""
        async with self.lock:
            if delivery.lost.is_set() or not delivery.session.alive:
                delivery.mark_lost()
                raise DeliveryLost(
                    f"job {delivery.message.job_id}: its RabbitMQ channel is gone; "
                    "the broker has requeued the message"
                )
            if delivery.settled:
                raise RuntimeError(f"delivery of job {delivery.message.job_id} already settled")
            channel = delivery.channel
            try:
                async with delivery.session.bounded(self.transport.settings.publish_timeout):
                    if ack:
                        await channel.basic_ack(delivery.delivery_tag)
                    else:
                        await channel.basic_reject(delivery.delivery_tag, requeue=True)
                    await channel.basic_qos(prefetch_count=max(self.prefetch, 1))
            except Exception as exc:
                delivery.mark_lost()
                raise DeliveryLost(
                    f"job {delivery.message.job_id}: the RabbitMQ channel failed while "
                    f"settling ({_describe(exc)}); the broker requeues the message"
                ) from None
            delivery.settled = True
            if delivery.renewal is not None:
                delivery.renewal.cancel()
                delivery.renewal = None
            self._drop_held(delivery)
            delivery.session.deliveries.discard(delivery)
            if delivery.session is self.session:
                with _Quiet():
                    await self._reconcile()
                if self.closed and not self.held and self.channel is not None:
                    await delivery.session.close_channel(self.channel)

    async def set_capacity(self, capacity: int) -> None:
        """Hold at most ``capacity`` deliveries (0 pauses)."""
        if capacity < 0:
            raise ConfigurationError(f"capacity must be >= 0, got {capacity}")
        async with self.lock:
            self.capacity = capacity
            try:
                await self._reconcile()
            except Exception as exc:  # the session is dying; the next one uses the new value
                log.debug("set_capacity deferred: %s", _describe(exc))

    async def close(self) -> None:
        """Cancel the consumer; held deliveries stay valid."""
        async with self.lock:
            if self.closed:
                return
            self.closed = True
            self.transport._forget(self)
            if self.tag is not None and self.underlay is not None:
                with _Quiet():
                    await self.underlay.basic_cancel(self.tag)
                self.tag = None
            if not self.held and self.channel is not None and self.session is not None:
                await self.session.close_channel(self.channel)


class _EventSubscription(_Subscription):
    order = 1

    def __init__(self, transport: RabbitMQTransport, handler: EventHandler) -> None:
        super().__init__(transport)
        self.handler = handler
        self.tag: str | None = None
        self.underlay: aiormq.abc.AbstractChannel | None = None
        self.publishers: dict[str, str] = {}
        """server id -> the broker user its first event came from"""

    def check_publisher(self, raw: aiormq.abc.DeliveredMessage, event: Event) -> None:
        """Refuse an event naming a server whose earlier events came from another
        broker user (``user_id`` is validated by the broker): one server's
        credentials cannot speak for another server."""
        user = raw.header.properties.user_id or ""
        pinned = self.publishers.setdefault(event.server_id, user)
        if pinned != user:
            raise MalformedMessage(
                f"a {event.TYPE} event names server {event.server_id}, whose events come "
                f"from broker user {pinned!r}, but was published by {user!r}"
            )

    async def attach(self, session: _Session) -> None:
        self.session = session
        self.channel = await session.channel("events")
        underlay = await self._watch_cancel(session, "events")
        self.underlay = underlay
        # One unacknowledged event at a time: nothing newer arrives while a failed
        # event is retried, and a dead consumer's event goes back to the head.
        await underlay.basic_qos(prefetch_count=1)
        ok = await underlay.basic_consume(
            session.topology.events,
            functools.partial(self._on_message, session, underlay),
            no_ack=False,
        )
        self.tag = ok.consumer_tag

    async def _on_message(
        self,
        session: _Session,
        underlay: aiormq.abc.AbstractChannel,
        raw: aiormq.abc.DeliveredMessage,
    ) -> None:
        if not session.alive or self.closed:
            return
        tag = _tag(raw)
        try:
            self.transport.verify(raw)
            event = decode_as(raw.body, Event)
            self.check_publisher(raw, event)
        except MalformedMessage as exc:
            with _Quiet():
                await self._dead_letter(underlay, raw, session.topology.events, exc)
            return
        # Retried here while we keep holding it: with one unacknowledged event the
        # broker sends nothing newer, so order holds. (A quorum queue on 3.10 puts a
        # rejected message *behind* later ones; only a dead consumer's messages go
        # back to the head.)
        delay = 0.05
        while True:
            try:
                await self.handler(event)
            except DeadLetter as exc:
                # Refused for good by the handler: to <ns>.dead, and on to the next event.
                log.warning(
                    "dead-lettering a %s event from %s to %s: %s",
                    event.TYPE,
                    session.topology.events,
                    self.transport.topology_name("dead"),
                    exc,
                )
                with _Quiet():
                    await underlay.basic_reject(tag, requeue=False)
                return
            except Exception as exc:
                log.warning(
                    "event handler raised (%s); the %s event is redelivered in %.1fs",
                    _describe(exc),
                    event.TYPE,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                if self.ended(session):
                    return  # the broker gives it to the next consumer, at the head
                continue
            break
        with _Quiet():
            await underlay.basic_ack(tag)

    async def close(self) -> None:
        """Stop consuming; an unacknowledged event goes back to the queue."""
        if self.closed:
            return
        self.closed = True
        self.transport._forget(self)
        if self.session is not None and self.channel is not None:
            await self.session.close_channel(self.channel)


@dataclass
class _Inbound:
    """A command for the handler (with what acknowledges it), or a marker whose
    ``handled`` future completes when everything before it was handled."""

    command: Command | None
    channel: aiormq.abc.AbstractChannel | None = None
    tag: int = 0
    handled: asyncio.Future[None] | None = None


class _CommandSubscription(_Subscription):
    order = 0

    def __init__(self, transport: RabbitMQTransport, server_id: str, handler: CommandHandler):
        super().__init__(transport)
        self.server_id = server_id
        self.handler = handler
        self.known: set[str] = set()
        self.queue: asyncio.Queue[_Inbound] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.snapshot: frozenset[str] = frozenset()

    async def attach(self, session: _Session) -> None:
        t = session.topology
        self.session = session
        self.channel = await session.channel("commands")
        underlay = await self._watch_cancel(session, "commands")
        name = t.command_queue(self.server_id)
        await underlay.queue_declare(
            name,
            exclusive=True,
            auto_delete=True,
            durable=False,
            arguments=t.command_queue_arguments(),
        )
        await underlay.queue_bind(name, t.commands_exchange, routing_key=self.server_id)
        await underlay.queue_bind(name, t.broadcast_exchange, routing_key="")
        await underlay.basic_qos(prefetch_count=100)
        await underlay.basic_consume(
            name, functools.partial(self._on_message, session, underlay, name), no_ack=False
        )
        # Subscribed to broadcasts first, then the snapshot: no cancellation can fall
        # between the two.
        snapshot = await self.transport._read_cancellations(session)
        reattached = self.worker is not None
        if self.worker is None:
            self.worker = asyncio.create_task(self._work(), name="orchestratr-rabbitmq-commands")
        if reattached:
            # Broadcasts sent while we were disconnected were lost with our old queue:
            # hand those ids over now, and wait until the handler has seen them, so
            # that they precede every job delivery of the new session.
            for job_id in sorted(snapshot - self.known):
                self.queue.put_nowait(_Inbound(CancelJob(job_id=job_id)))
            handled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.queue.put_nowait(_Inbound(None, handled=handled))
            assert self.worker is not None
            await asyncio.wait({handled, self.worker}, return_when=asyncio.FIRST_COMPLETED)
        self.known |= snapshot
        self.snapshot = snapshot

    async def _on_message(
        self,
        session: _Session,
        underlay: aiormq.abc.AbstractChannel,
        queue: str,
        raw: aiormq.abc.DeliveredMessage,
    ) -> None:
        if not session.alive or self.closed:
            return
        tag = _tag(raw)
        try:
            self.transport.verify(raw, max_age=self.transport.settings.signature_max_age)
            command = decode_as(raw.body, Command)
        except MalformedMessage as exc:
            with _Quiet():
                await self._dead_letter(underlay, raw, queue, exc)
            return
        self.queue.put_nowait(_Inbound(command, underlay, tag))

    async def _work(self) -> None:
        while True:
            item = await self.queue.get()
            command, underlay, tag = item.command, item.channel, item.tag
            if item.handled is not None:
                if not item.handled.done():
                    item.handled.set_result(None)
                continue
            if command is None:
                continue
            if isinstance(command, CancelJob):
                self.known.add(command.job_id)
            try:
                await self.handler(command)
            except Exception:
                # A command is advice; the durable state (cancellation set, storage)
                # is authoritative, so a failing handler must not block the queue.
                log.exception("command handler raised on %s; command dropped", command.TYPE)
            if underlay is not None:
                with _Quiet():
                    await underlay.basic_ack(tag)

    async def close(self) -> None:
        """Stop receiving commands; the per-connection queue is deleted."""
        if self.closed:
            return
        self.closed = True
        self.transport._forget(self)
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker
        if self.session is not None and self.channel is not None:
            await self.session.close_channel(self.channel)


# -- the transport -------------------------------------------------------------------------


class RabbitMQTransport(Transport):
    """OrchestratR's transport on RabbitMQ.

    :param url: ``amqp://`` or ``amqps://`` URL; default ``ORCHESTRATR_RABBITMQ_URL``
        or ``amqp://guest:guest@localhost:5672/``.
    :param options: see :class:`~orchestratr_rabbitmq.settings.Settings`:
        ``namespace`` (``"orchestratr"``), ``queue_type`` (``"quorum"`` or
        ``"classic"``), ``heartbeat`` (3 s), ``fence_timeout`` (1.5 x heartbeat),
        ``consumer_timeout`` (the broker's, if known), ``connect_attempts``...
    """

    def __init__(self, url: str | None = None, **options: Any) -> None:
        self.settings = Settings.build(url, options)
        self._session: _Session | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self._connected = False
        self._generation = 0
        self._subscriptions: list[_Subscription] = []
        self._reconnector: asyncio.Task[None] | None = None
        self._cancel_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self.version: BrokerVersion | None = None
        """The broker's version, known after :meth:`connect`."""
        self.topology: Topology | None = None
        """Names and arguments in use, known after :meth:`connect`."""

    def __repr__(self) -> str:
        return f"<RabbitMQTransport {self.settings!r}>"

    def topology_name(self, what: str) -> str:
        """The full name of a queue or exchange of this namespace (``"jobs"``, ``"dead"``...)."""
        return f"{self.settings.namespace}.{what}"

    @property
    def connected(self) -> bool:
        """True while a session is live."""
        return self._session is not None and self._session.alive

    # -- connecting -------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (retrying a few times with backoff), detect the version, declare."""
        if self.connected:
            return
        self._closed = False
        attempts = self.settings.connect_attempts
        delay = self.settings.reconnect_delay
        for attempt in range(1, attempts + 1):
            try:
                session = await self._open_session()
            except BackendUnavailable as exc:
                if attempt == attempts:
                    raise
                log.warning(
                    "%s; retrying in %.1fs (attempt %d of %d)", exc, delay, attempt, attempts
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_delay)
                continue
            if not session.alive:  # died between opening and now: try again
                if attempt == attempts:
                    raise BackendUnavailable(f"RabbitMQ at {self.settings.host}: connection lost")
                continue
            self._install(session)
            self._connected = True
            return

    async def _open_session(self) -> _Session:
        s = self.settings
        started = asyncio.get_running_loop().time()
        name = s.connection_name or f"orchestratr {s.namespace}"
        connection = await self._connect_one(name)
        try:
            publisher = await self._connect_one(f"{name} (publish)")
        except BaseException:
            with _Quiet():
                await connection.close()
            raise
        version = BrokerVersion.from_server_properties(
            _Session.underlay(connection).server_properties
        )
        if not version.known:
            log.warning("the broker did not report its version; assuming RabbitMQ 3.10 rules")
        self._generation += 1
        topology = Topology(s.namespace, s.queue_type, version, s.dead_letter_limit)
        session = _Session(self, connection, publisher, topology, self._generation, started)
        try:
            await session.open()
            if topology.cancellations in session.mismatched:
                await self._snapshot(session, write=None, recreate=True)
        except Exception as exc:
            session.fail(f"setting up failed: {_describe(exc)}", expected=True)
            await session.shutdown()
            if isinstance(exc, OrchestratrError):
                raise
            if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
                raise PermanentBackendError(
                    f"RabbitMQ at {s.host} refused access to the {s.namespace!r} queues: "
                    f"{_describe(exc)}"
                ) from None
            raise BackendUnavailable(
                f"RabbitMQ at {s.host}: declaring the {s.namespace!r} namespace failed "
                f"({_describe(exc)})"
            ) from None
        self.version = version
        self.topology = topology
        log.info(
            "connected to RabbitMQ %s at %s (vhost %r, namespace %r, %s queues, heartbeat %ds, "
            "fence %.1fs%s)",
            version,
            s.host,
            s.vhost,
            s.namespace,
            s.queue_type,
            s.heartbeat,
            s.fence_timeout,
            f", signed with key {s.signer.current.key_id}" if s.signer else "",
        )
        return session

    async def _connect_one(self, name: str) -> aio_pika.abc.AbstractConnection:
        s = self.settings
        try:
            return await aio_pika.connect(
                s.connection_url(),
                timeout=s.connect_timeout,
                ssl_context=s.ssl_context,
                client_properties={"connection_name": name},
            )
        except Exception as exc:
            raise self._classify(exc) from None

    def _classify(self, exc: BaseException) -> OrchestratrError:
        s = self.settings
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(s.url)
        user = unquote(parts.username or "guest")
        text = _describe(exc)
        if parts.password:
            text = text.replace(unquote(parts.password), "***").replace(parts.password, "***")
        if (
            isinstance(
                exc,
                aiormq.exceptions.ProbableAuthenticationError
                | aiormq.exceptions.AuthenticationError,
            )
            or "ACCESS_REFUSED" in text
        ):
            return PermanentBackendError(
                f"RabbitMQ at {s.host} refused the login of user {user!r} (ACCESS_REFUSED): "
                "check the user name and password"
            )
        if isinstance(exc, aiormq.exceptions.ConnectionNotAllowed) or (
            isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in text
        ):
            return PermanentBackendError(
                f"RabbitMQ at {s.host} refused access to virtual host {s.vhost!r} (NOT_ALLOWED): "
                f"it does not exist or user {user!r} has no permissions on it"
            )
        if isinstance(exc, ConnectionError | OSError | TimeoutError | aiormq.exceptions.AMQPError):
            reason = text
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {s.connect_timeout:g}s"
            elif isinstance(exc, OSError) and exc.strerror:
                reason = exc.strerror
            elif isinstance(exc, aiormq.exceptions.AMQPConnectionError) and len(exc.args) >= 2:
                reason = str(exc.args[1])
            return BackendUnavailable(f"RabbitMQ at {s.host} cannot be reached: {reason}")
        return BackendUnavailable(f"RabbitMQ at {s.host}: {type(exc).__name__}: {text}")

    def _install(self, session: _Session) -> None:
        self._session = session
        self._ready.set()

    def _session_failed(self, session: _Session, *, expected: bool) -> None:
        if self._session is session:
            self._session = None
            self._ready.clear()
        self._spawn(session.shutdown())
        if expected or self._closed or not self._connected:
            return
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.get_running_loop().create_task(
                self._reconnect(), name="orchestratr-rabbitmq-reconnect"
            )

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reconnect(self) -> None:
        delay = self.settings.reconnect_delay
        last_error = ""
        while not self._closed:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            if self._stopped():
                return
            try:
                session = await self._open_session()
            except OrchestratrError as exc:
                if str(exc) != last_error:
                    log.warning("reconnecting to RabbitMQ: %s; retrying with backoff", exc)
                    last_error = str(exc)
                delay = min(delay * 2, self.settings.reconnect_max_delay)
                continue
            try:
                for sub in sorted(self._subscriptions, key=lambda s: s.order):
                    if not sub.closed:
                        await sub.attach(session)
            except Exception as exc:
                session.fail(f"re-subscribing failed: {_describe(exc)}", expected=True)
                log.warning("re-subscribing after reconnect failed: %s; retrying", _describe(exc))
                delay = min(delay * 2, self.settings.reconnect_max_delay)
                continue
            if not session.alive:
                continue
            if self._stopped():
                session.fail("transport closed", expected=True)
                return
            self._install(session)
            log.info("reconnected to RabbitMQ (session %d)", session.generation)
            record_reconnect("rabbitmq")
            return

    async def _live(self) -> _Session:
        if self._closed:
            raise BackendUnavailable("the RabbitMQ transport is closed")
        if not self._connected:
            raise BackendUnavailable("the RabbitMQ transport is not connected: call connect()")
        session = self._session
        if session is not None and session.alive:
            return session
        try:
            await asyncio.wait_for(self._ready.wait(), timeout=self.settings.publish_timeout)
        except TimeoutError:
            raise BackendUnavailable(
                f"RabbitMQ at {self.settings.host} is unreachable; reconnecting in the background"
            ) from None
        session = self._session
        if session is None or not session.alive:
            raise BackendUnavailable(f"RabbitMQ at {self.settings.host}: connection lost")
        return session

    async def close(self) -> None:
        """Close subscriptions and the connection; held jobs return to the queue."""
        self._closed = True
        if self._reconnector is not None:
            self._reconnector.cancel()
            with contextlib.suppress(BaseException):
                await self._reconnector
        for sub in list(self._subscriptions):
            with _Quiet():
                await sub.close()
        session = self._session
        self._session = None
        self._ready.clear()
        if session is not None:
            session.fail("transport closed", expected=True)
            await session.shutdown()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._connected = False

    def _stopped(self) -> bool:
        return self._closed

    def _forget(self, sub: _Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(sub)

    # -- authenticity ---------------------------------------------------------------------

    def verify(self, raw: aiormq.abc.DeliveredMessage, *, max_age: float | None = None) -> None:
        """With a signing key, raise :class:`SignatureError` unless ``raw`` carries a
        valid authenticator for its body, exchange, routing key, ``user_id`` and
        signing time (and, with ``max_age``, was signed that recently)."""
        signer = self.settings.signer
        if signer is None:
            return
        properties = raw.header.properties
        headers: dict[str, Any] = dict(properties.headers or {})
        user = properties.user_id or ""
        signed_at = headers.get(_SIGNED_AT)
        context = (
            getattr(raw.delivery, "exchange", "") or "",
            getattr(raw.delivery, "routing_key", "") or "",
            user,
            str(signed_at),
        )
        origin = f"published by broker user {user!r}" if user else "publisher not identified"
        try:
            signer.verify(headers.get(_SIGNATURE), raw.body, context)
        except SignatureError as exc:
            raise SignatureError(f"{exc}; {origin}") from None
        if max_age is not None:
            age = time.time() - signed_at if isinstance(signed_at, int) else math.inf
            if not -max_age <= age <= max_age:
                raise SignatureError(
                    f"signed {age:.0f}s ago, beyond signature_max_age ({max_age:g}s): "
                    f"a replay?; {origin}"
                )

    # -- publishing ---------------------------------------------------------------------

    async def _publish(
        self,
        exchange_name: str,
        routing_key: str,
        body: bytes,
        kind: str,
        *,
        drop_unroutable: bool = False,
        session: _Session | None = None,
    ) -> None:
        if session is None:
            session = await self._live()
        user = self.settings.user
        headers: dict[str, Any] = {}
        signer = self.settings.signer
        if signer is not None:
            signed_at = int(time.time())
            headers[_SIGNED_AT] = signed_at
            headers[_SIGNATURE] = signer.sign(
                body, (exchange_name, routing_key, user or "", str(signed_at))
            )
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            type=kind,
            app_id="orchestratr",
            # Validated by the broker (it refuses another user's name): receivers
            # can tell which broker user published a message.
            user_id=user,
            headers=headers or None,
        )
        where = exchange_name or routing_key
        try:
            async with session.bounded(self.settings.publish_timeout):
                exchange = await session.exchange(exchange_name)
                await exchange.publish(message, routing_key, mandatory=True)
        except aiormq.exceptions.PublishError:
            if drop_unroutable:
                log.debug("no queue bound for %s %r; dropped", kind, routing_key)
                return
            raise PublishError(
                f"RabbitMQ could not route the {kind} message to {where!r}: "
                "the queue does not exist (was the namespace deleted?)"
            ) from None
        except aiormq.exceptions.DeliveryError:
            raise PublishError(f"RabbitMQ refused to store the {kind} message (nack)") from None
        except TimeoutError:
            if not session.alive:
                raise PublishError(
                    f"the RabbitMQ connection was lost before the broker confirmed the "
                    f"{kind} message ({session.reason})"
                ) from None
            raise PublishError(
                f"RabbitMQ did not confirm the {kind} message within "
                f"{self.settings.publish_timeout:g}s"
            ) from None
        except OrchestratrError:
            raise
        except Exception as exc:
            raise PublishError(f"publishing the {kind} message failed: {_describe(exc)}") from None

    async def publish_job(self, message: JobMessage) -> None:
        """Publish a job durably to ``<ns>.jobs``; returns once confirmed."""
        assert isinstance(message, JobMessage)
        await self._publish(
            self.topology_name("jobs.in"), self.topology_name("jobs"), encode(message), "job"
        )

    async def publish_event(self, event: Event) -> None:
        """Publish an event to ``<ns>.events``; returns once confirmed."""
        await self._publish(
            self.topology_name("events.in"), self.topology_name("events"), encode(event), event.TYPE
        )

    async def send_command(self, command: Command, server_id: str | None = None) -> None:
        """Send to one server (dropped if it is gone) or to all live servers."""
        if server_id is None:
            await self._publish(
                self.topology_name("broadcast"),
                "",
                encode(command),
                command.TYPE,
                drop_unroutable=True,
            )
        else:
            await self._publish(
                self.topology_name("commands"),
                server_id,
                encode(command),
                command.TYPE,
                drop_unroutable=True,
            )

    async def set_cancellations(self, job_ids: Collection[str]) -> None:
        """Replace the durable cancellation set, broadcasting each id the stored set
        lacked. Both happen under the set's lock, broadcasts first: a server that
        subscribes meanwhile waits for the lock, so it either got the broadcast or
        reads the new set; and whoever stores an id is the one who broadcast it."""
        async with self._cancel_lock:
            session = await self._live()
            try:
                await self._snapshot(session, write=frozenset(job_ids))
            except OrchestratrError:
                raise
            except Exception as exc:
                raise PublishError(
                    f"replacing the cancellation set failed: {_describe(exc)}"
                ) from None

    async def _read_cancellations(self, session: _Session) -> frozenset[str]:
        try:
            return await self._snapshot(session, write=None)
        except PublishError as exc:  # a read puts the set back with a confirmed publish
            raise BackendUnavailable(f"reading the cancellation set failed: {exc}") from None

    async def _snapshot(
        self, session: _Session, write: frozenset[str] | None, *, recreate: bool = False
    ) -> frozenset[str]:
        """Read (``write=None``) or replace the cancellation set, under the lock.

        The lock is an exclusive consumer on ``<ns>.cancellations.lock``: the broker
        lets only one exist and drops it with its channel, also when its holder dies.
        Holding it, we take *every* message of the set queue and keep the newest.
        A writer (manager, web) then **publishes** the new set (confirmed: it is in
        the queue) and acks what it took. A reader (a server, whose broker user may
        not write the set) requeues what it took and keeps the lock until the queue
        holds it again: a quorum queue applies a requeue asynchronously, and the
        next holder must not find the queue empty.
        An empty queue counts as "no set" only if the marker exchange
        ``<ns>.cancellations.written`` does not exist; otherwise a message is still
        on its way back (a reader died mid-read) and we wait for it.
        """
        try:
            # Its own deadline counts between attempts; this one ends it with the session.
            async with session.bounded(
                self.settings.snapshot_timeout + self.settings.publish_timeout
            ):
                return await self._snapshot_attempts(session, write, recreate)
        except TimeoutError:
            raise BackendUnavailable(
                f"RabbitMQ at {self.settings.host}: the cancellation set could not be "
                f"{'read' if write is None else 'replaced'} "
                f"({session.reason or 'no answer'}); retry"
            ) from None

    async def _snapshot_attempts(
        self, session: _Session, write: frozenset[str] | None, recreate: bool
    ) -> frozenset[str]:
        t = session.topology
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.snapshot_timeout
        pause = 0.005
        while True:
            channel = await session.connection.channel(publisher_confirms=False)
            try:
                underlay = await channel.get_underlay_channel()
                try:
                    await underlay.basic_consume(t.cancellations_lock, _ignore, exclusive=True)
                except (
                    aiormq.exceptions.ChannelAccessRefused,
                    aiormq.exceptions.ChannelLockedResource,
                ):
                    result = None
                else:
                    result = await self._snapshot_locked(session, underlay, write, recreate)
            finally:
                with _Quiet():
                    await channel.close()
            if result is not None:
                return result
            if loop.time() > deadline:
                raise BackendUnavailable(
                    "the cancellation set stayed locked or in transit for over "
                    f"{self.settings.snapshot_timeout:g}s; retry"
                )
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, 0.25)

    async def _snapshot_locked(
        self,
        session: _Session,
        underlay: aiormq.abc.AbstractChannel,
        write: frozenset[str] | None,
        recreate: bool,
    ) -> frozenset[str] | None:
        """One attempt under the lock; ``None``: retry (the set is in transit)."""
        t = session.topology
        taken: list[tuple[int, frozenset[str], int]] = []
        while True:
            raw = await underlay.basic_get(t.cancellations, no_ack=False)
            if not isinstance(raw.delivery, spec.Basic.GetOk):
                break
            tag = _tag(raw)
            try:
                self.verify(raw)
                written, ids = _parse_snapshot(raw.body)
            except MalformedMessage as exc:
                log.warning(
                    "dead-lettering a malformed cancellation set from %s to %s: %s",
                    t.cancellations,
                    t.dead,
                    exc,
                )
                await underlay.basic_reject(tag, requeue=False)
                continue
            taken.append((written, ids, tag))
        taken.sort(key=lambda item: item[0])
        current = (taken[-1][0], taken[-1][1]) if taken else None
        if current is None and write is None and not recreate:
            if await self._marker_exists(session):
                return None  # written before, so it is on its way back: wait
            return frozenset()
        if write is None and not recreate:
            assert current is not None
            # A read writes nothing (a server's user may not publish the set): hand
            # back what we took and keep the lock until the queue holds it again, so
            # that the next holder finds it (a quorum queue requeues asynchronously).
            for _, _, tag in taken:
                await underlay.basic_reject(tag, requeue=True)
            await self._returned(underlay, t.cancellations, len(taken))
            return current[1]
        stored = current[1] if current else frozenset()
        if recreate:
            # Declared by an older version with x-max-length, which makes a quorum queue
            # drop a newer set while the old one is held: rebuild it, keeping the set.
            log.warning(
                "recreating %s with the current arguments; the cancellation set is kept",
                t.cancellations,
            )
            await underlay.queue_delete(t.cancellations)
            await underlay.queue_declare(
                t.cancellations, durable=True, arguments=t.cancellations_arguments()
            )
            await underlay.queue_bind(
                t.cancellations, t.cancellations_exchange, routing_key=t.cancellations
            )
            session.mismatched.discard(t.cancellations)
            taken = []  # deleted with the queue
            if current is None:
                return frozenset()
        keep = stored if write is None else write
        # Idempotent, and cheap next to the publish: marks "a set exists" for readers.
        await underlay.exchange_declare(
            t.cancellations_marker, exchange_type="fanout", durable=True
        )
        if write is not None:
            await asyncio.gather(
                *(
                    self._publish(
                        t.broadcast_exchange,
                        "",
                        encode(CancelJob(job_id=job_id)),
                        CancelJob.TYPE,
                        drop_unroutable=True,
                        session=session,
                    )
                    for job_id in sorted(write - stored)
                )
            )
        version = current[0] if current and write is None else time.time_ns()
        if current is not None and write is not None:
            version = max(version, current[0] + 1)
        body = json.dumps(
            {"v": 1, "type": _SNAPSHOT_TYPE, "written": version, "job_ids": sorted(keep)},
            separators=(",", ":"),
        ).encode()
        await self._publish(
            t.cancellations_exchange, t.cancellations, body, _SNAPSHOT_TYPE, session=session
        )
        for _, _, tag in taken:
            await underlay.basic_ack(tag)
        await underlay.basic_qos(prefetch_count=1)  # a round trip: the acks are processed
        return keep

    async def _returned(self, underlay: aiormq.abc.AbstractChannel, queue: str, count: int) -> None:
        """Wait (bounded by ``snapshot_timeout``) until ``queue`` holds ``count``
        ready messages again; past that the next reader waits for them instead."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.snapshot_timeout
        pause = 0.002
        while True:
            ok = await underlay.queue_declare(queue, passive=True)
            if (ok.message_count or 0) >= count or loop.time() > deadline:
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    async def _marker_exists(self, session: _Session) -> bool:
        channel = await session.connection.channel(publisher_confirms=False)
        try:
            await channel.declare_exchange(session.topology.cancellations_marker, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            with _Quiet():
                await channel.close()
        return True

    # -- consuming -------------------------------------------------------------------------

    async def _subscribe(self, sub: _Subscription) -> _Session:
        session = await self._live()
        try:
            await sub.attach(session)
        except OrchestratrError:
            raise
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise PermanentBackendError(
                f"RabbitMQ at {self.settings.host}: broker user "
                f"{self.settings.user or 'guest'!r} may not consume what this role needs "
                f"({_describe(exc)}); see docs/deployment.md, 'Broker permissions by role'"
            ) from None
        except Exception as exc:
            raise BackendUnavailable(
                f"subscribing on RabbitMQ at {self.settings.host} failed: {_describe(exc)}"
            ) from None
        self._subscriptions.append(sub)
        return session

    async def consume_events(self, handler: EventHandler) -> Subscription:
        """Consume ``<ns>.events`` (single active consumer, one event at a time)."""
        sub = _EventSubscription(self, handler)
        await self._subscribe(sub)
        return sub

    async def consume_commands(
        self, server_id: str, handler: CommandHandler
    ) -> tuple[Subscription, frozenset[str]]:
        """Bind a per-connection queue to the server's routing key and the broadcast
        exchange, then read the cancellation set."""
        if not server_id:
            raise ConfigurationError("server_id must not be empty")
        sub = _CommandSubscription(self, server_id, handler)
        await self._subscribe(sub)
        return sub, sub.snapshot

    async def consume_jobs(self, capacity: int, handler: DeliveryHandler) -> JobConsumer:
        """Consume ``<ns>.jobs`` holding at most ``capacity`` deliveries."""
        if capacity < 0:
            raise ConfigurationError(f"capacity must be >= 0, got {capacity}")
        sub = _JobConsumer(self, capacity, handler)
        session = await self._subscribe(sub)
        self._warn_consumer_timeout(session.topology)
        return sub

    # -- the acknowledgement timeout -----------------------------------------------------------

    def _known_consumer_timeout(self) -> float | None:
        configured = self.topology.consumer_timeout_ms() if self.topology else None
        candidates = [t for t in (self.settings.consumer_timeout,) if t is not None]
        if configured is not None:
            candidates.append(configured / 1000)
        return min(candidates) if candidates else None

    def _schedule_renewal(self, delivery: _RabbitDelivery) -> None:
        """Hand a job back (lost first, then requeued) before the broker's
        acknowledgement timeout can tear it away, when we know that timeout."""
        timeout = self._known_consumer_timeout()
        if timeout is None:
            return
        # The broker checks about once a minute, so expiry comes between `timeout`
        # and `timeout + 60s`; a quarter of the timeout (at most 2 min) is our margin.
        after = timeout - min(0.25 * timeout, 120.0)
        delivery.renew_at = time.monotonic() + after

        def renew() -> None:
            delivery.renewal = None
            if delivery.lost.is_set() or delivery.settled:
                return
            log.info(
                "job %s held for %.0fs, near the broker's acknowledgement timeout "
                "(%.0fs): handing it back",
                delivery.message.job_id,
                after,
                timeout,
            )
            consumer = delivery._consumer
            delivery.mark_lost()
            delivery.session.deliveries.discard(delivery)
            self._spawn(_requeue(consumer, delivery))

        delivery.renewal = asyncio.get_running_loop().call_later(after, renew)

    def _warn_consumer_timeout(self, topology: Topology) -> None:
        version = topology.version
        if topology.consumer_timeout_configurable or str(version) in _warned_consumer_timeout:
            return
        _warned_consumer_timeout.add(str(version))
        if self.settings.consumer_timeout is not None:
            log.info(
                "RabbitMQ %s: jobs are handed back before the broker's consumer_timeout "
                "(%gs, as configured)",
                version,
                self.settings.consumer_timeout,
            )
            return
        log.warning(
            "RabbitMQ %s has only a broker-wide delivery acknowledgement timeout "
            "(consumer_timeout, default 30 min): a job held longer is stopped and restarted. "
            "Disable it with `[{rabbit, [{consumer_timeout, undefined}]}].` in advanced.config, "
            "or set `consumer_timeout = <ms>` in rabbitmq.conf and pass "
            "consumer_timeout=<seconds> to the transport",
            version,
        )


async def _requeue(consumer: _JobConsumer, delivery: _RabbitDelivery) -> None:
    async with consumer.lock:
        if delivery.settled or not delivery.session.alive:
            return
        try:
            await delivery.channel.basic_reject(delivery.delivery_tag, requeue=True)
        except Exception as exc:
            log.debug("handing job %s back failed: %s", delivery.message.job_id, _describe(exc))
            return
        delivery.settled = True
        consumer._drop_held(delivery)
        if delivery.session is consumer.session:
            with _Quiet():
                await consumer._reconcile()


async def _ignore(_: aiormq.abc.DeliveredMessage) -> None:
    """The lock queue never holds messages."""


def _parse_snapshot(body: bytes) -> tuple[int, frozenset[str]]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("type") != _SNAPSHOT_TYPE:
        raise MalformedMessage("not a cancellation set")
    version = data.get("v")
    if not isinstance(version, int) or version != 1:
        raise MalformedMessage(f"unsupported cancellation set version {version!r}")
    written, ids = data.get("written"), data.get("job_ids")
    if not isinstance(written, int) or not isinstance(ids, list):
        raise MalformedMessage("cancellation set without 'written' or 'job_ids'")
    if not all(isinstance(i, str) for i in ids):
        raise MalformedMessage("cancellation set with a non-string job id")
    return written, frozenset(ids)
