"""The session: two AMQP connections that live and die together, the namespace they
declare, and the fence watchdog that gives every job up before the broker can."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika.abc
import aiormq
import aiormq.abc

from orchestratr_core.errors import BackendUnavailable, PermanentBackendError
from orchestratr_core.placement import Pool
from orchestratr_core.transport_base import spawn
from orchestratr_rabbitmq.settings import Settings
from orchestratr_rabbitmq.topology import Topology
from orchestratr_rabbitmq.transport.deliveries import RabbitDelivery
from orchestratr_rabbitmq.transport.errors import Quiet, describe

__all__ = ["Session"]

log = logging.getLogger("orchestratr.transport.rabbitmq")


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


class Session:
    """Two AMQP connections that live and die together: ``connection`` consumes (jobs,
    commands, events, the fence pings) and ``publisher`` publishes. RabbitMQ blocks a
    connection that publishes during a memory or disk alarm; keeping consumers off it
    keeps the fence answered, so an alarm never looks like a partition."""

    def __init__(
        self,
        settings: Settings,
        on_failed: Callable[[Session, bool], None],
        connection: aio_pika.abc.AbstractConnection,
        publisher: aio_pika.abc.AbstractConnection,
        topology: Topology,
        generation: int,
        started: float,
        side_connection: Callable[[int], Awaitable[aio_pika.abc.AbstractConnection]] | None = None,
        node: int = 0,
    ) -> None:
        self.settings = settings
        self._side_connection = side_connection
        self._node = node
        self._on_failed = on_failed
        self.connection = connection
        self.publisher = publisher
        self.topology = topology
        self.generation = generation
        self.alive = True
        self.reason = ""
        """Why the session died (empty while alive)."""
        self.deliveries: set[RabbitDelivery] = set()
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
        self.pools_ready: set[Pool] = set()
        """Pools whose queue this session declared and registered."""
        self.registry = asyncio.Event()
        """Set once the pool registry ``<ns>.pools`` (a stream) is known to exist."""
        self.ended = asyncio.Event()
        """Set when the session dies."""
        self._registry_task: asyncio.Task[None] | None = None

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
        self._pinger = spawn(self._ping_loop(), name="orchestratr-rabbitmq-fence", logger=log)
        self._registry_task = spawn(
            self._declare_registry(), name="orchestratr-rabbitmq-registry", logger=log
        )

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
        with Quiet():
            underlay = await channel.get_underlay_channel()
            self._watched.discard(underlay)
        with Quiet():
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
                with Quiet():
                    await self._declare_channel.close()
                self._declare_channel = None

    async def wait_registry(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the pool registry to exist; False if it does
        not yet (or the session ended first)."""
        if self.registry.is_set():
            return True
        waits = [
            asyncio.ensure_future(self.registry.wait()),
            asyncio.ensure_future(self.ended.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self.registry.is_set() and self.alive

    async def _declare_registry(self) -> None:
        """Declare the pool registry ``<ns>.pools`` in the background, on a
        connection of its own, until it exists.

        A stream needs RabbitMQ's stream coordinator, which after a node restart
        may answer ``coordinator_unavailable`` for a while: the declaration then
        hangs up to 30 s and ends with a connection error (``INTERNAL_ERROR``).
        On the session's own connections that killed the session (and a manager's
        first connect with it). Here it only delays what needs the registry: a
        new pool's first publish waits for it (:meth:`wait_registry`) and the
        servers follow it once it exists; the default pool never needs it. Each
        attempt is bounded; the next one tries the next node of the URL."""
        t = self.topology
        count = len(self.settings.nodes)
        attempt = 0
        pause = self.settings.reconnect_delay
        while self.alive:
            node = (self._node + attempt) % count
            attempt += 1
            try:
                async with asyncio.timeout(
                    self.settings.connect_timeout + 2 * self.settings.fence_timeout
                ):
                    error = await self._declare_registry_on(node)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = describe(exc) or type(exc).__name__
            if error is None:
                self.registry.set()
                return
            level = logging.INFO if attempt == 1 else logging.WARNING
            log.log(
                level,
                "the pool registry %s could not be declared on %s (%s); pools other than "
                "the default wait for it, retrying",
                t.pools,
                self.settings.nodes[node],
                error,
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, self.settings.reconnect_max_delay)

    async def _declare_registry_on(self, node: int) -> str | None:
        """One attempt on node number ``node``; ``None`` when the registry exists."""
        t = self.topology
        if self._side_connection is None:
            connection = self.connection
            owned = False
        else:
            connection = await self._side_connection(node)
            owned = True
        try:
            for passive in (False, True):
                channel = await connection.channel(publisher_confirms=False)
                try:
                    underlay = await channel.get_underlay_channel()
                    await _declare_queue(
                        t.pools, {} if passive else t.pools_arguments(), underlay, passive=passive
                    )
                    return None
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    log.warning(
                        "queue %s exists with other arguments than this version asks for "
                        "(%s); using it as it is",
                        t.pools,
                        describe(exc),
                    )
                    self.mismatched.add(t.pools)
                    return None
                except aiormq.exceptions.ChannelAccessRefused:
                    continue  # may not declare it: check that a manager did
                except aiormq.exceptions.ChannelNotFoundEntity:
                    return (
                        f"it does not exist and broker user {self.settings.user or 'guest'!r} "
                        "may not declare it; a manager declares it"
                    )
                finally:
                    with Quiet():
                        await channel.close()
            return "refused"
        finally:
            if owned:
                with Quiet():
                    await asyncio.wait_for(connection.close(), timeout=5)

    async def declare_pool(self, pool: Pool) -> None:
        """Declare a pool's jobs queue (the jobs queue's arguments: quorum, no
        delivery limit, the consumer timeout, dead letters) and bind it to the jobs
        exchange under its own name. Raises :class:`PermanentBackendError` when this
        broker user may not declare it and it does not exist."""
        t = self.topology
        name = t.pool_queue(pool)
        try:
            await self._ensure(
                "queue",
                name,
                functools.partial(_declare_queue, name, t.jobs_arguments(), passive=False),
                functools.partial(_declare_queue, name, {}, passive=True),
            )
            error = await self._declaring(functools.partial(_bind, name, t.jobs_exchange, name))
            if error is not None:
                raise error
        finally:
            if self._declare_channel is not None:
                with Quiet():
                    await self._declare_channel.close()
                self._declare_channel = None

    async def _ensure_dead(self) -> None:
        """``<ns>.dead`` with its length limit, of the namespace's queue type. An older
        version declared it without a limit, or as a classic queue (one node), and
        arguments cannot change: such a queue is replaced while it is empty
        (``if_empty`` makes the delete atomic), else used as it is with a warning
        naming the commands that fix it. One that cannot be reached (a classic
        queue whose node is down) never stops the session: dead letters are
        dropped until it is back, and a warning says so."""
        t = self.topology
        declare = functools.partial(_declare_queue, t.dead, t.dead_arguments(), passive=False)
        check = functools.partial(_declare_queue, t.dead, {}, passive=True)
        error = await self._declaring(declare)
        if error is None:
            return
        if isinstance(error, aiormq.exceptions.ChannelPreconditionFailed):
            refused = await self._declaring(functools.partial(_delete_if_empty, t.dead))
            if refused is None and await self._declaring(declare) is None:
                log.info(
                    "replaced the queue %s of an older version (empty) by a bounded %s queue",
                    t.dead,
                    t.dead_arguments()["x-queue-type"],
                )
                return
            log.warning(
                "queue %s was declared by an older version (no length limit, or a "
                "classic queue that lives on one node) and cannot be replaced now (%s; "
                "it holds messages or we may not delete it): inspect and purge it, or "
                "bound it with a policy (docs/rabbitmq.md, 'Dead letters')",
                t.dead,
                describe(refused or error),
            )
            declare = check  # use it as it is
            error = await self._declaring(check)
            if error is None:
                return
        if isinstance(error, aiormq.exceptions.ChannelNotFoundEntity) and (
            await self._declaring(check) is not None
        ):
            # NOT_FOUND from a declaration: the queue exists but its home node is down.
            log.warning(
                "queue %s cannot be reached (%s): dead letters are dropped until its "
                "node is back (docs/rabbitmq.md, 'Dead letters')",
                t.dead,
                describe(error),
            )
            return
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
                describe(error),
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
            self.fail(f"fence ping failed: {describe(exc)}")

    # -- death ----------------------------------------------------------------------

    def _on_connection_closed(self, what: str, future: asyncio.Future[Any]) -> None:
        exc = None if future.cancelled() else future.exception()
        self.fail(f"{what} closed: {describe(exc)}")

    def _on_channel_closed(
        self, what: str, channel: aiormq.abc.AbstractChannel, future: asyncio.Future[Any]
    ) -> None:
        if channel not in self._watched:
            return
        exc = None if future.cancelled() else future.exception()
        self.fail(f"{what} channel closed by the broker: {describe(exc)}")

    def fail(self, reason: str, *, expected: bool = False) -> None:
        """Declare the session dead: every delivery is lost *now*, then reconnect."""
        if not self.alive:
            return
        self.alive = False
        self.reason = reason
        self._failed_at = time.monotonic()
        self.ended.set()
        if self._registry_task is not None and self._registry_task is not asyncio.current_task():
            self._registry_task.cancel()
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
        self._on_failed(self, expected)

    async def shutdown(self) -> None:
        """Close the connection (its held messages go back to the queue)."""
        for connection in (self.connection, self.publisher):
            with Quiet():
                await asyncio.wait_for(connection.close(), timeout=5)
