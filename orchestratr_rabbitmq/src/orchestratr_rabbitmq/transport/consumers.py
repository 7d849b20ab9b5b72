"""Consumers, one per kind: jobs (the job consumer settles and hands back its own
deliveries; one per pool a server runs), events, commands and the pool registry.
Each is re-attached to every new session; they reach the transport only through
the callbacks of a :class:`Wiring`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aio_pika.abc
import aiormq.abc
from aiormq import spec

from orchestratr_core.errors import (
    ConfigurationError,
    DeadLetter,
    DeliveryLost,
    MalformedMessage,
)
from orchestratr_core.placement import DEFAULT_POOL, Pool
from orchestratr_core.protocol import CancelJob, Command, Event, JobMessage, decode_as
from orchestratr_core.retry import retrying
from orchestratr_core.transport import (
    CommandHandler,
    DeliveryHandler,
    EventHandler,
    JobConsumer,
    PoolHandler,
    Subscription,
)
from orchestratr_core.transport_base import SubscriptionKind, cancel_and_log, spawn
from orchestratr_rabbitmq.settings import Settings
from orchestratr_rabbitmq.topology import Topology
from orchestratr_rabbitmq.transport import dispatch
from orchestratr_rabbitmq.transport.authenticity import Authenticity
from orchestratr_rabbitmq.transport.deliveries import (
    RabbitDelivery,
    delivery_count,
    delivery_tag,
)
from orchestratr_rabbitmq.transport.errors import Quiet, describe
from orchestratr_rabbitmq.transport.session import Session

__all__ = [
    "BrokerSubscription",
    "CommandSubscription",
    "EventSubscription",
    "PoolWatch",
    "RabbitJobConsumer",
    "Wiring",
    "known_consumer_timeout",
]

log = logging.getLogger("orchestratr.transport.rabbitmq")


@dataclass(frozen=True)
class Wiring:
    """What a subscription needs from its transport, as callbacks."""

    settings: Settings
    authenticity: Authenticity
    spawn: Callable[[Coroutine[Any, Any, Any]], object]
    """Start a background task that the transport awaits when it closes."""
    forget: Callable[[BrokerSubscription], None]
    """Stop re-attaching a closed subscription."""
    read_cancellations: Callable[[Session], Awaitable[frozenset[str]]]
    """Read the durable cancellation set on a session."""


def known_consumer_timeout(settings: Settings, topology: Topology) -> float | None:
    """The broker's delivery acknowledgement timeout in seconds, when known."""
    configured = topology.consumer_timeout_ms()
    candidates = [t for t in (settings.consumer_timeout,) if t is not None]
    if configured is not None:
        candidates.append(configured / 1000)
    return min(candidates) if candidates else None


class BrokerSubscription(Subscription):
    """A consumer that is re-attached to every new session, in the core's
    :func:`~orchestratr_core.transport_base.reattach_order`."""

    kind = SubscriptionKind.COMMANDS

    def __init__(self, wiring: Wiring) -> None:
        self.wiring = wiring
        self.session: Session | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.closed = False

    async def attach(self, session: Session) -> None:
        """Start consuming on ``session``."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop consuming; what is unacknowledged goes back to the queue (a command
        queue, made for this connection, is deleted)."""
        if self.closed:
            return
        self.closed = True
        self.wiring.forget(self)
        await self._before_channel_closes()
        if self.session is not None and self.channel is not None:
            await self.session.close_channel(self.channel)

    async def _before_channel_closes(self) -> None:
        """End what runs beside the consumer (nothing, unless a kind says so)."""

    def ended(self, session: Session) -> bool:
        """True once this subscription or ``session`` is over."""
        return self.closed or not session.alive

    def _dead_letter(
        self,
        session: Session,
        channel: aiormq.abc.AbstractChannel,
        message: aiormq.abc.DeliveredMessage,
        queue: str,
        exc: Exception,
    ) -> Awaitable[None]:
        log.warning(
            "dead-lettering a malformed message from %s to %s: %s",
            queue,
            session.topology.dead,
            describe(exc),
        )
        return channel.basic_reject(delivery_tag(message), requeue=False)

    async def _watch_cancel(self, session: Session, what: str) -> aiormq.abc.AbstractChannel:
        assert self.channel is not None
        underlay = await self.channel.get_underlay_channel()

        def cancelled(frame: spec.Basic.Cancel) -> None:
            if not self.closed:
                session.fail(f"the broker cancelled the {what} consumer {frame.consumer_tag}")

        underlay.on_consumer_cancel_callbacks.add(cancelled)
        return underlay


SURPLUS_DELAY = 1.0
"""Seconds a delivery beyond the capacity is held (not run) before it is handed
back: its credit stays used meanwhile, so a fleet with no room elsewhere does not
bounce it between the broker and this consumer without pause."""


@dataclass
class _Credit:
    """One live (never cancelled while it holds deliveries) jobs consumer."""

    prefetch: int
    held: int = 0


class RabbitJobConsumer(BrokerSubscription, JobConsumer):
    """Holds at most ``capacity`` job deliveries; settles and hands back its own.

    Credit is changed without ever leaving a delivery under a cancelled consumer:
    RabbitMQ 3.10's quorum queue gives back, when a node dies, only the checked-out
    messages of consumers that were still up, and keeps a cancelled consumer's
    until the queue changes leader (docs/reliability.md, "RabbitMQ cluster"). So
    credit grows by adding consumers (each with its own prefetch) and shrinks by
    cancelling consumers that hold nothing; a delivery beyond the capacity (credit
    a consumer holding jobs could not give up) is handed back, and one that reaches
    an already cancelled consumer is handed back at once."""

    kind = SubscriptionKind.JOBS

    def __init__(
        self, wiring: Wiring, capacity: int, handler: DeliveryHandler, pool: Pool = DEFAULT_POOL
    ):
        super().__init__(wiring)
        self.capacity = capacity
        self.handler = handler
        self.pool = pool
        """The pool whose queue this consumer takes jobs from."""
        self.lock = asyncio.Lock()
        self.underlay: aiormq.abc.AbstractChannel | None = None
        self.consumers: dict[str, _Credit] = {}
        """The live consumers of this session, by tag: the broker may make us hold
        up to the sum of their prefetch counts."""
        self.cancelled: set[str] = set()
        """Tags of this session's cancelled consumers: what still reaches them is
        handed back at once."""
        self.held: dict[int, RabbitDelivery] = {}
        self.stepping = False
        """A step up (:meth:`_step_up`) is on its way."""
        self.renewals: dict[RabbitDelivery, None] = {}
        """Deliveries to hand back before the broker's timeout, earliest first."""
        self.renewal_timer: asyncio.TimerHandle | None = None

    async def attach(self, session: Session) -> None:
        async with self.lock:
            self.session = session
            self.held = {}
            self.consumers = {}
            self.cancelled = set()
            self.stepping = False  # a step up of the old session may never have run
            self.channel = await session.channel("jobs")
            self.underlay = await self._watch_cancel(session, "jobs")
            # Deliveries are handled in the channel reader's step, not a task each
            # (dispatch.py): a failover's burst makes one task per job, the job's.
            dispatch.watch(self.underlay)
            await self._reconcile()

    def _room(self) -> int:
        return 0 if self.closed else self.capacity

    def _budget(self) -> int:
        """What the broker may make us hold: every live consumer's prefetch, and
        what the others (cancelled, or not yet confirmed) still hold."""
        counted = sum(c.held for c in self.consumers.values())
        return sum(c.prefetch for c in self.consumers.values()) + len(self.held) - counted

    def _free(self) -> int:
        """Deliveries the live consumers may still be pushed (their unused credit)."""
        return sum(max(0, c.prefetch - c.held) for c in self.consumers.values())

    async def _reconcile(self) -> None:
        """Keep the credit within the capacity, and grant at most ``prefetch_step``
        deliveries ahead of what is held. RabbitMQ applies ``basic.qos`` to new
        consumers only: credit is added as a new consumer, once the live ones have
        used half a step of theirs (not all of it: a server whose jobs ended left
        a little credit on each consumer, and a failover's burst then waited for a
        round trip after a few deliveries), and taken away by cancelling consumers
        that hold nothing. The step bounds how many unread deliveries can queue
        ahead of a fence ping's answer: a server with room for 20,000 jobs that
        took them in one step fell behind its pings and fenced itself
        (docs/benchmarks.md)."""
        session, underlay = self.session, self.underlay
        if session is None or underlay is None or not session.alive:
            return
        room = self._room()
        budget = self._budget()
        for tag, credit in list(self.consumers.items()):
            if budget <= room:
                break
            if credit.held == 0:
                await underlay.basic_cancel(tag)
                del self.consumers[tag]
                self.cancelled.add(tag)
                budget -= credit.prefetch
        step = self.wiring.settings.prefetch_step
        free = self._free()
        if self.consumers and free > step // 2:
            return  # the live consumers still have credit: step up once half is used
        desired = min(step - free, room - budget)
        if desired <= 0:
            return  # prefetch 0 would mean "unlimited": pause by not consuming
        await underlay.basic_qos(prefetch_count=desired)
        ok = await underlay.basic_consume(
            session.topology.pool_queue(self.pool),
            dispatch.inline(functools.partial(self._on_message, session, underlay)),
            no_ack=False,
            arguments=session.topology.jobs_consumer_arguments(),
        )
        tag = ok.consumer_tag or ""
        # Deliveries may have arrived before consume-ok was read: count them now.
        self.consumers[tag] = _Credit(
            desired, sum(1 for d in self.held.values() if d.consumer_tag == tag)
        )
        self._maybe_step_up()

    def _maybe_step_up(self) -> None:
        if (
            not self.stepping
            and self.consumers
            and self._free() <= self.wiring.settings.prefetch_step // 2
            and self._budget() < self._room()
        ):
            self.stepping = True
            self.wiring.spawn(self._step_up())

    def _drop_held(self, delivery: RabbitDelivery) -> None:
        """A held delivery was settled: it no longer counts against the credit."""
        if self.held.pop(delivery.delivery_tag, None) is not None:
            credit = self.consumers.get(delivery.consumer_tag)
            if credit is not None:
                credit.held -= 1

    async def _step_up(self) -> None:
        """The live consumers used half a step of their credit and there is room:
        consume again."""
        try:
            async with self.lock:
                self.stepping = False
                with Quiet():
                    await self._reconcile()
        finally:
            self.stepping = False

    async def _on_message(
        self,
        session: Session,
        underlay: aiormq.abc.AbstractChannel,
        raw: aiormq.abc.DeliveredMessage,
    ) -> None:
        if not session.alive:
            return  # the old connection is being closed; the broker requeues it
        tag = delivery_tag(raw)
        consumer_tag = getattr(raw.delivery, "consumer_tag", None) or ""
        try:
            self.wiring.authenticity.verify(raw)
            message = decode_as(raw.body, JobMessage)
        except MalformedMessage as exc:
            with Quiet():
                await self._dead_letter(
                    session, underlay, raw, session.topology.pool_queue(self.pool), exc
                )
            return
        delivery = RabbitDelivery(
            self,
            session,
            underlay,
            tag,
            consumer_tag,
            message,
            delivery_count(raw, session.topology),
        )
        self.held[tag] = delivery
        session.deliveries.add(delivery)
        credit = self.consumers.get(consumer_tag)
        if credit is not None:
            credit.held += 1
            if not self.stepping:
                self._maybe_step_up()
        if consumer_tag in self.cancelled or len(self.held) > self._room():
            # Never run what a cancelled consumer got (it would stay checked out to
            # that consumer), nor more than the capacity.
            delay = 0.0 if consumer_tag in self.cancelled else SURPLUS_DELAY
            delivery.mark_lost()
            session.deliveries.discard(delivery)
            self.wiring.spawn(self._requeue(delivery, delay))
            return
        self._schedule_renewal(delivery)
        try:
            await self.handler(delivery)
        except Exception:
            log.exception("job delivery handler raised; releasing job %s", message.job_id)
            with contextlib.suppress(DeliveryLost):
                await delivery.release()

    async def settle(self, delivery: RabbitDelivery, ack: bool) -> None:
        """Ack or requeue, then wait for a round trip on the same channel so that the
        broker has certainly processed it before we return."""
        # Called from a delivery's callback (a duplicate dropped, a job handed back),
        # this may run in the channel reader's step: the bound below is the task's.
        await dispatch.own_task()
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
                async with delivery.session.bounded(self.wiring.settings.publish_timeout):
                    if ack:
                        await channel.basic_ack(delivery.delivery_tag)
                    else:
                        await channel.basic_reject(delivery.delivery_tag, requeue=True)
                    # The broker may push the next delivery before the round trip
                    # below returns: this one no longer counts against the capacity.
                    self._drop_held(delivery)
                    # A round trip (qos applies to consumers made later only).
                    await channel.basic_qos(prefetch_count=1)
            except Exception as exc:
                delivery.mark_lost()
                raise DeliveryLost(
                    f"job {delivery.message.job_id}: the RabbitMQ channel failed while "
                    f"settling ({describe(exc)}); the broker requeues the message"
                ) from None
            delivery.settled = True
            delivery.cancel_renewal()
            self._drop_held(delivery)
            delivery.session.deliveries.discard(delivery)
            await self._after_settle(delivery)

    async def _after_settle(self, delivery: RabbitDelivery) -> None:
        """Bring the credit back within the capacity; close the channel of a closed
        consumer once it holds nothing."""
        if delivery.session is not self.session:
            return
        with Quiet():
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
                log.debug("set_capacity deferred: %s", describe(exc))

    async def close(self) -> None:
        """Stop consuming; held deliveries stay valid. Consumers that hold nothing
        are cancelled now, the others once they do (what reaches them meanwhile is
        handed back), and the channel is closed when nothing is held."""
        async with self.lock:
            if self.closed:
                return
            self.closed = True
            self.wiring.forget(self)
            with Quiet():
                await self._reconcile()
            if not self.held and self.channel is not None and self.session is not None:
                await self.session.close_channel(self.channel)

    def _schedule_renewal(self, delivery: RabbitDelivery) -> None:
        """Hand a job back (lost first, then requeued) before the broker's
        acknowledgement timeout can tear it away, when we know that timeout. One
        timer serves every delivery (they share the timeout, so they come due in
        the order they came): no timer, closure or context per held job."""
        timeout = known_consumer_timeout(self.wiring.settings, delivery.session.topology)
        if timeout is None:
            return
        # The broker checks about once a minute, so expiry comes between `timeout`
        # and `timeout + 60s`; a quarter of the timeout (at most 2 min) is our margin.
        after = timeout - min(0.25 * timeout, 120.0)
        delivery.renew_at = time.monotonic() + after
        self.renewals[delivery] = None
        if self.renewal_timer is None:
            self._arm_renewals()

    def forget_renewal(self, delivery: RabbitDelivery) -> None:
        """``delivery`` was settled or lost: no hand-back for it."""
        self.renewals.pop(delivery, None)
        delivery.renew_at = math.inf

    def _arm_renewals(self) -> None:
        self.renewal_timer = None
        if self.renewals:
            first = next(iter(self.renewals))
            self.renewal_timer = asyncio.get_running_loop().call_later(
                max(0.0, first.renew_at - time.monotonic()), self._renew_due
            )

    def _renew_due(self) -> None:
        now = time.monotonic()
        while self.renewals:
            delivery = next(iter(self.renewals))
            if delivery.renew_at > now:
                break
            del self.renewals[delivery]
            if delivery.lost.is_set() or delivery.settled:
                continue
            log.info(
                "job %s held near the broker's acknowledgement timeout (%.0fs): handing it back",
                delivery.message.job_id,
                known_consumer_timeout(self.wiring.settings, delivery.session.topology) or 0.0,
            )
            delivery.mark_lost()
            delivery.session.deliveries.discard(delivery)
            self.wiring.spawn(self._requeue(delivery))
        self._arm_renewals()

    async def _requeue(self, delivery: RabbitDelivery, delay: float = 0.0) -> None:
        """Hand a delivery that is no longer run back to the queue after ``delay``."""
        if delay > 0:
            await asyncio.sleep(delay)
        async with self.lock:
            if delivery.settled or not delivery.session.alive:
                return
            try:
                await delivery.channel.basic_reject(delivery.delivery_tag, requeue=True)
            except Exception as exc:
                log.debug("handing job %s back failed: %s", delivery.message.job_id, describe(exc))
                return
            delivery.settled = True
            self._drop_held(delivery)
            await self._after_settle(delivery)


EVENTS_PREFETCH = 64
"""Events the broker may send ahead of the one being applied. They wait, in
order, in the consumer's own queue: the handler still sees one event at a time
(a failed one is retried while the later ones wait), but the next event is
already here when one is acknowledged, instead of a broker round trip later. With
one at a time, a manager on a loaded machine applied at most one event per
round trip -- fewer than a thousand servers' heartbeats (500 a second)."""


class EventSubscription(BrokerSubscription):
    """Consumes the events queue in order: up to :data:`EVENTS_PREFETCH`
    unacknowledged events, applied one at a time by one worker."""

    kind = SubscriptionKind.EVENTS

    def __init__(self, wiring: Wiring, handler: EventHandler) -> None:
        super().__init__(wiring)
        self.handler = handler
        self.tag: str | None = None
        self.underlay: aiormq.abc.AbstractChannel | None = None
        self.publishers: dict[str, str] = {}
        """server id -> the broker user its first event came from"""
        self.inbox: asyncio.Queue[
            tuple[Session, aiormq.abc.AbstractChannel, aiormq.abc.DeliveredMessage] | None
        ] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.applying = False

    @property
    def held(self) -> int:
        """Events delivered to this consumer and not yet acknowledged (waiting in
        its queue or being applied): waiting events the queue's count leaves out."""
        return self.inbox.qsize() + (1 if self.applying else 0)

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

    async def attach(self, session: Session) -> None:
        self.session = session
        self.channel = await session.channel("events")
        underlay = await self._watch_cancel(session, "events")
        self.underlay = underlay
        if self.worker is None:
            self.worker = spawn(self._work(), name="orchestratr-rabbitmq-events", logger=log)
        # Several unacknowledged events, applied in order by one worker: nothing
        # later is applied while a failed event is retried, and a dead consumer's
        # events go back to the head of the queue, in order.
        await underlay.basic_qos(prefetch_count=EVENTS_PREFETCH)
        ok = await underlay.basic_consume(
            session.topology.events,
            functools.partial(self._on_message, session, underlay),
            no_ack=False,
        )
        self.tag = ok.consumer_tag

    async def _on_message(
        self,
        session: Session,
        underlay: aiormq.abc.AbstractChannel,
        raw: aiormq.abc.DeliveredMessage,
    ) -> None:
        # One task per delivery, started in the order of the deliveries: queued
        # before anything awaits, so the worker sees them in that order.
        if session.alive and not self.closed:
            self.inbox.put_nowait((session, underlay, raw))

    async def _work(self) -> None:
        while True:
            item = await self.inbox.get()
            if item is None:
                return
            session, underlay, raw = item
            if self.ended(session):
                continue  # the broker gives it to the next consumer, at the head
            self.applying = True
            try:
                await self._apply(session, underlay, raw)
            except Exception:
                log.exception("applying an event failed; the broker redelivers it")
            finally:
                self.applying = False

    async def _before_channel_closes(self) -> None:
        # The worker finishes the event it applies (if any) and ends; what waits
        # goes back to the queue with the channel.
        self.inbox.put_nowait(None)

    async def _apply(
        self,
        session: Session,
        underlay: aiormq.abc.AbstractChannel,
        raw: aiormq.abc.DeliveredMessage,
    ) -> None:
        tag = delivery_tag(raw)
        try:
            self.wiring.authenticity.verify(raw)
            event = decode_as(raw.body, Event)
            self.check_publisher(raw, event)
        except MalformedMessage as exc:
            with Quiet():
                await self._dead_letter(session, underlay, raw, session.topology.events, exc)
            return
        # Retried here while we keep holding it: the later events wait in the
        # inbox, so order holds. (A quorum queue on 3.10 puts a rejected message
        # *behind* later ones; only a dead consumer's messages go back to the head.)
        refused: DeadLetter | None = None
        async with contextlib.aclosing(
            retrying(
                f"handle a {event.TYPE} event (it is redelivered)",
                initial=0.05,
                maximum=5.0,
                retry_on=(Exception,),
                logger=log,
            )
        ) as attempts:
            async for attempt in attempts:
                if attempt.number > 1 and self.ended(session):
                    return  # the broker gives it to the next consumer, at the head
                with attempt:
                    try:
                        await self.handler(event)
                    except DeadLetter as exc:
                        refused = exc
        if refused is not None:
            # Refused for good by the handler: to <ns>.dead, and on to the next event.
            log.warning(
                "dead-lettering a %s event from %s to %s: %s",
                event.TYPE,
                session.topology.events,
                session.topology.dead,
                refused,
            )
            with Quiet():
                await underlay.basic_reject(tag, requeue=False)
            return
        with Quiet():
            await underlay.basic_ack(tag)


@dataclass
class _Inbound:
    """A command for the handler (with what acknowledges it), or a marker whose
    ``handled`` future completes when everything before it was handled."""

    command: Command | None
    channel: aiormq.abc.AbstractChannel | None = None
    tag: int = 0
    handled: asyncio.Future[None] | None = None


class CommandSubscription(BrokerSubscription):
    """A per-connection command queue bound to one server id and the broadcasts."""

    kind = SubscriptionKind.COMMANDS

    def __init__(self, wiring: Wiring, server_id: str, handler: CommandHandler):
        super().__init__(wiring)
        self.server_id = server_id
        self.handler = handler
        self.known: set[str] = set()
        self.queue: asyncio.Queue[_Inbound] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.snapshot: frozenset[str] = frozenset()

    async def attach(self, session: Session) -> None:
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
        snapshot = await self.wiring.read_cancellations(session)
        reattached = self.worker is not None
        if self.worker is None:
            self.worker = spawn(self._work(), name="orchestratr-rabbitmq-commands", logger=log)
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
        session: Session,
        underlay: aiormq.abc.AbstractChannel,
        queue: str,
        raw: aiormq.abc.DeliveredMessage,
    ) -> None:
        if not session.alive or self.closed:
            return
        tag = delivery_tag(raw)
        try:
            self.wiring.authenticity.verify(raw, max_age=self.wiring.settings.signature_max_age)
            command = decode_as(raw.body, Command)
        except MalformedMessage as exc:
            with Quiet():
                await self._dead_letter(session, underlay, raw, queue, exc)
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
                with Quiet():
                    await underlay.basic_ack(tag)

    async def _before_channel_closes(self) -> None:
        if self.worker is not None:
            await cancel_and_log([self.worker], logger=log)


class PoolWatch(BrokerSubscription):
    """Reads the pool registry (the stream ``<ns>.pools``) from its first entry and
    then each pool as it is appended, and names each to the handler (which must
    be idempotent: a pool may be appended more than once, and every session reads
    the stream again)."""

    kind = SubscriptionKind.POOLS

    def __init__(self, wiring: Wiring, handler: PoolHandler) -> None:
        super().__init__(wiring)
        self.handler = handler

    async def attach(self, session: Session) -> None:
        self.session = session
        self.channel = None
        self.wiring.spawn(self._name(DEFAULT_POOL))
        if session.registry.is_set():
            await self._follow(session)
        else:
            # Being declared in the background (session.py, _declare_registry): the
            # default pool runs meanwhile, and no other pool's job is published before
            # the registry exists and names it.
            self.wiring.spawn(self._follow_when_declared(session))

    async def _follow_when_declared(self, session: Session) -> None:
        while not await session.wait_registry(60.0):
            if self.ended(session):
                return
        if self.ended(session):
            return
        try:
            await self._follow(session)
        except Exception as exc:
            if not self.ended(session):
                session.fail(f"following the pool registry failed: {describe(exc)}")

    async def _follow(self, session: Session) -> None:
        self.channel = await session.channel("pools")
        if self.closed:
            await session.close_channel(self.channel)
            return
        underlay = await self._watch_cancel(session, "pools")
        await underlay.basic_qos(prefetch_count=200)  # a stream consumer needs a prefetch
        await underlay.basic_consume(
            session.topology.pools,
            functools.partial(self._on_message, session, underlay),
            no_ack=False,
            arguments={"x-stream-offset": "first"},
        )

    async def _on_message(
        self,
        session: Session,
        underlay: aiormq.abc.AbstractChannel,
        raw: aiormq.abc.DeliveredMessage,
    ) -> None:
        if not session.alive or self.closed:
            return
        with Quiet():
            await underlay.basic_ack(delivery_tag(raw))
        try:
            self.wiring.authenticity.verify(raw)
            pool = Pool.from_key(raw.body.decode("utf-8"))
        except Exception as exc:  # a stream keeps what it got: skip, never act on it
            log.warning("ignoring an unreadable entry of %s: %s", session.topology.pools, exc)
            return
        self.wiring.spawn(self._name(pool))

    async def _name(self, pool: Pool) -> None:
        await self.handler(pool)
