"""The RabbitMQ transport: jobs held as unacknowledged deliveries, fenced by the client.

One :class:`RabbitMQTransport` owns at most one live session (one AMQP connection
for consuming and one for publishing, with their channels). A session dies as a
whole: when its connection or any of its long-lived channels closes, when the broker
cancels one of its consumers, or when the fence watchdog has not had an answer from
the broker for ``fence_timeout`` seconds. Dying marks every job delivery of the
session lost *first* (synchronously), then closes the connection and starts a
reconnect loop with backoff. aio-pika's robust connection is deliberately not used:
it re-consumes silently after a channel closes, which runs jobs twice (see
``docs/rabbitmq.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Collection, Coroutine
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.abc

from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    OrchestratrError,
    PublishError,
)
from orchestratr_core.metrics import record_reconnect
from orchestratr_core.placement import DEFAULT_POOL, Pool
from orchestratr_core.protocol import Command, Event, JobMessage, encode
from orchestratr_core.retry import retrying
from orchestratr_core.transport import (
    CommandHandler,
    DeliveryHandler,
    EventHandler,
    JobConsumer,
    PoolHandler,
    Subscription,
    Transport,
)
from orchestratr_core.transport_base import cancel_and_log, reattach_order, spawn
from orchestratr_rabbitmq.settings import Settings
from orchestratr_rabbitmq.topology import BrokerVersion, Topology
from orchestratr_rabbitmq.transport import frames
from orchestratr_rabbitmq.transport.authenticity import Authenticity
from orchestratr_rabbitmq.transport.cancellations import CancellationSet
from orchestratr_rabbitmq.transport.consumers import (
    BrokerSubscription,
    CommandSubscription,
    EventSubscription,
    PoolWatch,
    RabbitJobConsumer,
    Wiring,
)
from orchestratr_rabbitmq.transport.errors import (
    Quiet,
    classify_connect_error,
    describe,
    refused_namespace,
    setup_failed,
)
from orchestratr_rabbitmq.transport.publisher import Publisher
from orchestratr_rabbitmq.transport.session import Session

__all__ = ["RabbitMQTransport"]

log = logging.getLogger("orchestratr.transport.rabbitmq")

_warned_consumer_timeout: set[str] = set()


class _SessionDied(BackendUnavailable):
    """A new session died before it could be installed: try again at once."""


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
        frames.install()  # deliveries' frames read without pamqp's generic path
        self._session: Session | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self._connected = False
        self._generation = 0
        self._node = 0
        """Index in ``settings.nodes`` of the node of the latest session."""
        self._subscriptions: list[BrokerSubscription] = []
        self._reconnector: asyncio.Task[None] | None = None
        self._cancel_lock = asyncio.Lock()
        self._pool_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._authenticity = Authenticity(self.settings.signer)
        self._publisher = Publisher(self.settings, self._authenticity)
        self._cancellations = CancellationSet(self.settings, self._authenticity, self._publisher)
        self._wiring = Wiring(
            settings=self.settings,
            authenticity=self._authenticity,
            spawn=self._spawn,
            forget=self._forget,
            read_cancellations=self._cancellations.read,
        )
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
        s = self.settings
        async for attempt in retrying(
            f"connect to RabbitMQ at {s.host}",
            initial=s.reconnect_delay,
            maximum=s.reconnect_max_delay,
            attempts=s.connect_attempts,
            logger=log,
        ):
            with attempt:
                session = await self._open_session()
                if not session.alive:  # died between opening and now: try again
                    raise _SessionDied(f"RabbitMQ at {s.host}: connection lost")
                self._install(session)
                self._connected = True

    @property
    def node(self) -> str:
        """``host:port`` of the node the latest session connected to."""
        return self.settings.nodes[self._node]

    async def _open_session(self, first: int = 0) -> Session:
        s = self.settings
        started = asyncio.get_running_loop().time()
        name = s.connection_name or f"orchestratr {s.namespace}"
        connection, node = await self._connect_any(name, first)
        try:
            publisher = await self._connect_one(f"{name} (publish)", node)
        except BaseException:
            with Quiet():
                await connection.close()
            raise
        version = BrokerVersion.from_server_properties(
            Session.underlay(connection).server_properties
        )
        if not version.known:
            log.warning("the broker did not report its version; assuming RabbitMQ 3.10 rules")
        self._generation += 1
        topology = Topology(s.namespace, s.queue_type, version, s.dead_letter_limit)
        session = Session(
            s,
            self._session_failed,
            connection,
            publisher,
            topology,
            self._generation,
            started,
            side_connection=functools.partial(self._connect_one, f"{name} (declare)"),
            node=node,
        )
        try:
            # Ended by the fence like any wait on the broker: a declaration can hang
            # while a cluster node is frozen (RabbitMQ's metadata store waits for it
            # until it is declared down), and the closing connection then cancels it.
            async with session.bounded(s.connect_timeout + s.fence_timeout):
                await session.open()
                if topology.cancellations in session.mismatched:
                    await self._cancellations.recreate(session)
        except TimeoutError:
            session.fail("setting up timed out", expected=True)
            await session.shutdown()
            raise BackendUnavailable(
                f"RabbitMQ at {s.nodes[node]}: declaring the {s.namespace!r} namespace got no "
                f"answer ({session.reason}); retrying"
            ) from None
        except Exception as exc:
            session.fail(f"setting up failed: {describe(exc)}", expected=True)
            await session.shutdown()
            error = setup_failed(exc, s)
            if error is exc:
                raise
            raise error from None
        self.version = version
        self.topology = topology
        self._node = node
        log.info(
            "connected to RabbitMQ %s at %s (vhost %r, namespace %r, %s queues, heartbeat %ds, "
            "fence %.1fs%s)",
            version,
            s.nodes[node],
            s.vhost,
            s.namespace,
            s.queue_type,
            s.heartbeat,
            s.fence_timeout,
            f", signed with key {s.signer.current.key_id}" if s.signer else "",
        )
        return session

    async def _connect_any(
        self, name: str, first: int
    ) -> tuple[aio_pika.abc.AbstractConnection, int]:
        """Connect to the first node that answers, trying them in the URL's order
        from node number ``first`` on; return the connection and the node's number."""
        count = len(self.settings.nodes)
        error: BackendUnavailable | None = None
        for step in range(count):
            node = (first + step) % count
            try:
                return await self._connect_one(name, node), node
            # A refused login or vhost (PermanentBackendError) is raised at once:
            # every node of a cluster says the same.
            except BackendUnavailable as exc:
                error = exc
                if count > 1:
                    log.info("%s; trying the next node", exc)
        assert error is not None
        raise error

    async def _connect_one(self, name: str, node: int = 0) -> aio_pika.abc.AbstractConnection:
        s = self.settings
        try:
            return await aio_pika.connect(
                s.connection_url(node),
                timeout=s.connect_timeout,
                ssl_context=s.ssl_context,
                client_properties={"connection_name": name},
            )
        except Exception as exc:
            raise classify_connect_error(exc, s, s.nodes[node]) from None

    def _install(self, session: Session) -> None:
        self._session = session
        self._ready.set()

    def _session_failed(self, session: Session, expected: bool) -> None:
        if self._session is session:
            self._session = None
            self._ready.clear()
        self._spawn(session.shutdown())
        if expected or self._closed or not self._connected:
            return
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = spawn(
                self._reconnect(), name="orchestratr-rabbitmq-reconnect", logger=log
            )

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        spawn(coroutine, name="orchestratr-rabbitmq", logger=log, keep=self._background)

    async def _reconnect(self) -> None:
        s = self.settings
        async with contextlib.aclosing(
            retrying(
                "reconnect to RabbitMQ",
                initial=s.reconnect_delay,
                maximum=s.reconnect_max_delay,
                retry_on=(OrchestratrError,),
                logger=log,
                wait_first=True,
                quiet_repeats=True,
            )
        ) as attempts:
            async for attempt in attempts:
                if self._closed:
                    return
                with attempt:
                    # The node just lost is tried last: it is likely still down.
                    session = await self._open_session(self._node + 1)
                    await self._reattach(session)
                    if not session.alive:
                        raise _SessionDied(f"RabbitMQ at {s.host}: connection lost")
                if attempt.error is not None:
                    continue
                if self._stopped():
                    session.fail("transport closed", expected=True)
                    return
                self._install(session)
                log.info("reconnected to RabbitMQ (session %d)", session.generation)
                record_reconnect("rabbitmq")
                return

    async def _reattach(self, session: Session) -> None:
        """Attach every open subscription to ``session``, in the one re-attach order."""
        try:
            for sub in reattach_order(self._subscriptions):
                await sub.attach(session)
        except Exception as exc:
            session.fail(f"re-subscribing failed: {describe(exc)}", expected=True)
            raise BackendUnavailable(f"re-subscribing failed: {describe(exc)}") from None

    async def _live(self) -> Session:
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
            await cancel_and_log([self._reconnector], logger=log)
        for sub in list(self._subscriptions):
            with Quiet():
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
        # A method, not the flag: close() may set it while we await.
        return self._closed

    def _forget(self, sub: BrokerSubscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(sub)

    def verify(self, raw: aiormq.abc.DeliveredMessage, *, max_age: float | None = None) -> None:
        """With a signing key, raise :class:`~orchestratr_core.signing.SignatureError`
        unless ``raw`` carries a valid authenticator (see :class:`Authenticity`)."""
        self._authenticity.verify(raw, max_age=max_age)

    # -- publishing ---------------------------------------------------------------------

    async def _publish(
        self, exchange_name: str, routing_key: str, body: bytes, kind: str, **options: bool
    ) -> None:
        session = await self._live()
        await self._publisher.publish(session, exchange_name, routing_key, body, kind, **options)

    async def publish_job(self, message: JobMessage) -> None:
        """Publish a job durably to its pool's queue (``<ns>.jobs`` for the default
        pool); returns once confirmed. A pool new to this session is declared and
        appended to the registry ``<ns>.pools`` first, so that its queue exists
        before any server hears of it and before its first message."""
        assert isinstance(message, JobMessage)
        pool = message.pool
        queue = self.topology_name("jobs")
        if not pool.is_default:
            session = await self._live()
            await self._register_pool(session, pool)
            queue = session.topology.pool_queue(pool)
        await self._publish(self.topology_name("jobs.in"), queue, encode(message), "job")

    async def _register_pool(self, session: Session, pool: Pool) -> None:
        if pool in session.pools_ready:
            return
        async with self._pool_lock:
            if pool in session.pools_ready:
                return
            # Declared and announced before its first publish: without the registry
            # (being declared in the background) a new pool's publish waits, then fails.
            if not await session.wait_registry(self.settings.publish_timeout):
                why = session.reason or "its declaration is retried in the background"
                raise BackendUnavailable(
                    f"RabbitMQ at {self.settings.host}: the pool registry "
                    f"{session.topology.pools} is not available yet ({why}); "
                    f"the first job of pool {pool.key!r} waits for it, retry"
                )
            try:
                await session.declare_pool(pool)
            except OrchestratrError as exc:
                raise PublishError(f"the queue of pool {pool.key!r} is missing: {exc}") from None
            except Exception as exc:
                raise PublishError(
                    f"declaring the queue of pool {pool.key!r} failed: {describe(exc)}"
                ) from None
            await self._publisher.publish(
                session, "", session.topology.pools, pool.key.encode("utf-8"), "pool"
            )
            session.pools_ready.add(pool)
            log.info("registered pool %s (queue %s)", pool.key, session.topology.pool_queue(pool))

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
            await self._cancellations.replace(session, job_ids)

    # -- consuming -------------------------------------------------------------------------

    async def _subscribe(self, sub: BrokerSubscription) -> Session:
        session = await self._live()
        try:
            await sub.attach(session)
        except Exception as exc:
            error = refused_namespace(exc, self.settings)
            if error is exc:
                raise
            raise error from None
        self._subscriptions.append(sub)
        return session

    async def events_backlog(self) -> int | None:
        """The events queue's ready messages (a passive ``queue.declare`` on a
        channel of its own, closed after: a failed declare closes only it), plus
        those this transport's events consumer holds and has not yet applied (it
        takes up to :data:`~orchestratr_rabbitmq.transport.consumers.EVENTS_PREFETCH`
        ahead)."""
        session = await self._live()
        try:
            channel = await session.connection.channel(publisher_confirms=False)
            try:
                queue = await channel.declare_queue(session.topology.events, passive=True)
                count = queue.declaration_result.message_count
                held = sum(
                    sub.held
                    for sub in self._subscriptions
                    if isinstance(sub, EventSubscription) and not sub.closed
                )
                return None if count is None else int(count) + held
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        except Exception as exc:
            raise BackendUnavailable(
                f"counting the events waiting in {session.topology.events} failed: {describe(exc)}"
            ) from None

    async def consume_events(self, handler: EventHandler) -> Subscription:
        """Consume ``<ns>.events`` (single active consumer; applied one event at a time)."""
        sub = EventSubscription(self._wiring, handler)
        await self._subscribe(sub)
        return sub

    async def consume_commands(
        self, server_id: str, handler: CommandHandler
    ) -> tuple[Subscription, frozenset[str]]:
        """Bind a per-connection queue to the server's routing key and the broadcast
        exchange, then read the cancellation set."""
        if not server_id:
            raise ConfigurationError("server_id must not be empty")
        sub = CommandSubscription(self._wiring, server_id, handler)
        await self._subscribe(sub)
        return sub, sub.snapshot

    async def consume_jobs(self, capacity: int, handler: DeliveryHandler) -> JobConsumer:
        """Consume ``<ns>.jobs`` holding at most ``capacity`` deliveries."""
        return await self.consume_pool(DEFAULT_POOL, capacity, handler)

    async def watch_pools(self, handler: PoolHandler) -> Subscription:
        """Read the pool registry ``<ns>.pools`` (a stream) from its start, then
        follow it: ``handler`` hears the default pool and every registered pool,
        and each new one as a manager registers it; again after a reconnect."""
        sub = PoolWatch(self._wiring, handler)
        await self._subscribe(sub)
        return sub

    async def consume_pool(
        self, pool: Pool, capacity: int, handler: DeliveryHandler
    ) -> JobConsumer:
        """Consume one pool's queue (on its own channel, with its own prefetch)."""
        if capacity < 0:
            raise ConfigurationError(f"capacity must be >= 0, got {capacity}")
        sub = RabbitJobConsumer(self._wiring, capacity, handler, pool)
        session = await self._subscribe(sub)
        self._warn_consumer_timeout(session.topology)
        return sub

    # -- the acknowledgement timeout -----------------------------------------------------------

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
