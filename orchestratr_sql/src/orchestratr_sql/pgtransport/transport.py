# Over 600 lines on purpose: one session, its deliveries and its three consumers, read as one.
"""The PostgreSQL transport: a fleet on PostgreSQL alone (``docs/postgresql-transport.md``).

One :class:`PostgresTransport` owns at most one live *session*: one asyncpg
connection, not pooled, that holds a session-level advisory lock
``(lock class, session number)`` for as long as it lives, LISTENs for wake-ups, and
runs every statement of the transport one at a time. A job row held by a server
names that session number in ``holder``; PostgreSQL releases the lock the moment the
session ends (crash, ``kill -9``, a partition it detected, a restart), and from then
on every row the session held is free for another server -- as a broker requeues the
unacknowledged deliveries of a dead channel. So a server holds hundreds of jobs
with one connection and one lock.

Fencing: every answered statement proves the session alive as of the moment it was
sent. When none was answered for ``fence_timeout`` seconds, or the connection
closes, the session dies: every delivery is marked lost *first*, then the connection
is dropped and a new session is opened with backoff. PostgreSQL, told by
``idle_session_timeout`` and the TCP settings of the session, gives the jobs away no
sooner than ``session_timeout`` seconds after the last statement it received, which
the settings keep larger than ``fence_timeout`` plus one ping.

Jobs, events and commands are rows; an insert NOTIFYs the interested sessions, and a
slow safety poll (``poll_interval``) covers a missed notification.

Pools (job kinds and placement constraints): every job row names its pool, the
registry ``<namespace>_pools`` lists every pool jobs were published to (written in
the statement that inserts the pool's first rows, and NOTIFYing the watchers), and a
server claims with one consumer per pool it may run -- each claim takes rows of its
own pool only, so a job is never handed to a server that cannot run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any, TypeVar

from orchestratr_core.errors import (
    BackendUnavailable,
    DeadLetter,
    DeliveryLost,
    MalformedMessage,
    PermanentBackendError,
    PublishError,
)
from orchestratr_core.metrics import record_reconnect
from orchestratr_core.placement import DEFAULT_POOL, Pool
from orchestratr_core.protocol import (
    CancelJob,
    Command,
    Event,
    JobMessage,
    Message,
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
from orchestratr_core.transport_base import SubscriptionKind, cancel_and_log, reattach_order, spawn
from orchestratr_sql.connection import ErrorKind
from orchestratr_sql.errors import backend_error
from orchestratr_sql.pgdriver import PostgresConnector
from orchestratr_sql.pgtransport.schema import (
    DEAD_LETTER_LIMIT,
    EVENTS_KEY,
    SERIAL_KEY,
    consumer_key,
    migrate,
)
from orchestratr_sql.pgtransport.settings import PgTransportSettings

__all__ = ["PostgresDelivery", "PostgresTransport"]

log = logging.getLogger("orchestratr.transport.postgresql")

_T = TypeVar("_T")
_M = TypeVar("_M", bound=Message)
_labels = itertools.count(1)
_SHARE_AGAIN = 0.05
"""Seconds before a server that took its fair share of free jobs looks again."""
_PUBLISH_BATCH = 500
"""Most rows one publishing statement inserts."""
_NOTIFY_PAYLOAD = 7000
"""Longest list of pool keys a jobs NOTIFY carries (PostgreSQL takes 8000 bytes);
a longer one is sent empty, which wakes every pool consumer."""


def _wake_payload(keys: Collection[str]) -> str:
    """The jobs NOTIFY payload naming the pools that got rows ('' = every pool)."""
    text = "\n".join(sorted(set(keys)))
    return text if len(text) <= _NOTIFY_PAYLOAD else ""


class _Session:
    """One connection and the lock that says its jobs are held."""

    def __init__(self, conn: Any, number: int, fence_timeout: float) -> None:
        self.conn = conn
        self.number = number
        self.fence_timeout = fence_timeout
        self.lock = asyncio.Lock()
        self.alive = True
        self.last_ok = time.monotonic()
        self.deliveries: set[PostgresDelivery] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.consumers: set[int] = set()
        """Second keys of the shared consumer locks this session holds (one per pool)."""

    @property
    def valid_until(self) -> float:
        """The monotonic deadline until which this session's jobs are certainly ours."""
        return self.last_ok + self.fence_timeout


class PostgresDelivery(Delivery):
    """A job row held by one session."""

    def __init__(
        self,
        transport: PostgresTransport,
        session: _Session,
        row_id: int,
        message: JobMessage,
        count: int,
    ) -> None:
        self._transport = transport
        self._session = session
        self.row_id = row_id
        self._message = message
        self._count = count
        self._lost = asyncio.Event()
        self.settled = False

    def __repr__(self) -> str:
        return (
            f"<PostgresDelivery job_id={self._message.job_id} row={self.row_id} "
            f"count={self._count} lost={self._lost.is_set()} settled={self.settled}>"
        )

    @property
    def message(self) -> JobMessage:
        """The decoded job message."""
        return self._message

    @property
    def delivery_count(self) -> int:
        """How many times the row was claimed before this delivery."""
        return self._count

    @property
    def lost(self) -> asyncio.Event:
        """Set when the session that claimed the row died or fell silent."""
        return self._lost

    @property
    def valid_until(self) -> float:
        """The last answered statement's send time plus ``fence_timeout``."""
        return self._session.valid_until

    def lose(self) -> None:
        """Mark lost (unless settled)."""
        if not self.settled:
            self._lost.set()

    def _settle(self) -> None:
        if self._lost.is_set():
            raise DeliveryLost(
                f"delivery of job {self._message.job_id} was lost; another server may take it"
            )
        if self.settled:
            raise RuntimeError(f"delivery of job {self._message.job_id} was already settled")
        self.settled = True
        self._session.deliveries.discard(self)

    async def ack(self) -> None:
        """Delete the row. Raises :class:`DeliveryLost` if the delivery was lost."""
        self._settle()
        await self._transport._settle(self, ack=True)

    async def release(self) -> None:
        """Free the row for another server (its next claim counts one more).
        Raises :class:`DeliveryLost` if the delivery was lost."""
        self._settle()
        await self._transport._settle(self, ack=False)


class _Sub:
    """A subscription that outlives sessions (re-attached in the core's order)."""

    kind = SubscriptionKind.COMMANDS

    def __init__(self, transport: PostgresTransport) -> None:
        self.transport = transport
        self.closed = False
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def attach(self, session: _Session) -> None:
        """Called for every new session, in re-attach order."""
        self.wake.set()

    async def _close(self) -> None:
        self.closed = True
        self.transport._subs = [s for s in self.transport._subs if s is not self]
        task, self.task = self.task, None
        if task is not None and task is not asyncio.current_task():
            await cancel_and_log([task], logger=log)


class _CommandSub(_Sub, Subscription):
    kind = SubscriptionKind.COMMANDS

    def __init__(self, transport: PostgresTransport, server_id: str, handler: CommandHandler):
        super().__init__(transport)
        self.server_id = server_id
        self.handler = handler
        self.cursor = 0
        self.known: set[str] = set()
        self.started = False

    async def attach(self, session: _Session) -> None:
        """Read the cancellation set again: every id added while away is a CancelJob."""
        if not self.started:
            return
        snapshot = await self.transport._read_cancellations()
        for job_id in sorted(snapshot - self.known):
            self.known.add(job_id)
            self.transport._inbox.put_nowait((self, CancelJob(job_id=job_id)))

    async def close(self) -> None:
        """Stop receiving commands. Idempotent."""
        await self._close()


class _EventSub(_Sub, Subscription):
    kind = SubscriptionKind.EVENTS

    def __init__(self, transport: PostgresTransport, handler: EventHandler) -> None:
        super().__init__(transport)
        self.handler = handler

    async def close(self) -> None:
        """Stop consuming; another manager takes over. Idempotent."""
        if self.closed:
            return
        await self._close()
        await self.transport._resign_events(self)


class _JobSub(_Sub, JobConsumer):
    kind = SubscriptionKind.JOBS

    def __init__(
        self, transport: PostgresTransport, capacity: int, handler: DeliveryHandler, pool: Pool
    ):
        super().__init__(transport)
        self.capacity = capacity
        self.handler = handler
        self.pool = pool
        """The pool whose rows this consumer claims."""
        self.key = consumer_key(pool)
        self.held: set[PostgresDelivery] = set()

    async def attach(self, session: _Session) -> None:
        """Count as a consumer of the pool on the new session, then claim."""
        await self.transport._count_consumer(self.key, session)
        self.wake.set()

    async def set_capacity(self, capacity: int) -> None:
        """Hold at most ``capacity`` rows; 0 pauses; nothing held is revoked."""
        _check_capacity(capacity)
        self.capacity = capacity
        self.wake.set()

    async def close(self) -> None:
        """Stop claiming; held rows stay held. Idempotent."""
        if self.closed:
            return
        await self._close()
        await self.transport._count_consumer(self.key, None)


class _PoolWatch(_Sub, Subscription):
    """Names every registered pool (and the default one) to its handler, then each
    pool registered later: woken by the pools NOTIFY, and read again on every new
    session (a pool registered while away is named then)."""

    kind = SubscriptionKind.POOLS

    def __init__(self, transport: PostgresTransport, handler: PoolHandler) -> None:
        super().__init__(transport)
        self.handler = handler
        self.named: set[str] = set()
        """Keys already named on the current session."""

    async def attach(self, session: _Session) -> None:
        """A new session: name every pool again (the handler is idempotent)."""
        self.named.clear()
        self.wake.set()

    async def close(self) -> None:
        """Stop watching. Idempotent."""
        await self._close()


def _check_capacity(capacity: int) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0, not {capacity!r}")


class PostgresTransport(Transport):
    """OrchestratR's transport on PostgreSQL alone.

    :param url: a ``postgresql://`` URL (the storage's may be reused).
    :param options: see :class:`~orchestratr_sql.pgtransport.settings.PgTransportSettings`.
    """

    def __init__(self, url: str | None = None, **options: Any) -> None:
        self.settings = PgTransportSettings.build(url, options)
        self._connector = PostgresConnector(self.settings.url)
        self._connector.product = "PostgreSQL transport"
        self.label = f"pg{next(_labels)}"
        self._session: _Session | None = None
        self._ready = asyncio.Event()
        self._state = "new"
        self._subs: list[_Sub] = []
        self._events_owner: _EventSub | None = None
        self._inbox: asyncio.Queue[tuple[_Sub, Any]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnecting: asyncio.Task[None] | None = None
        self._command_lock = asyncio.Lock()
        self._pending: dict[str, list[tuple[bytes, str | None, str, asyncio.Future[None]]]] = {
            "jobs": [],
            "events": [],
        }
        self._flushing: set[str] = set()
        self._migrated = False
        s = self.settings
        self._claim_sql = (
            "SELECT row_id AS id, row_payload AS payload, row_signature AS signature, "
            f"row_count AS count FROM {s.table('claim')}($1, $2, $3, $4, $5)"
        )
        self._channels = {
            what: f"{s.channel}_{what}" for what in ("jobs", "events", "commands", "pools")
        }

    def __repr__(self) -> str:
        return f"<PostgresTransport {self.settings.url.masked} namespace={self.settings.namespace}>"

    @property
    def connected(self) -> bool:
        """True while a session is live."""
        return self._session is not None and self._session.alive

    # -- sessions ---------------------------------------------------------------------

    def _error(self, exc: BaseException, what: str) -> Exception:
        kind = self._connector.classify(exc) or ErrorKind.UNAVAILABLE
        if kind in (ErrorKind.AUTH, ErrorKind.UNKNOWN_DATABASE):
            return backend_error(self._connector, exc, kind, what)
        return backend_error(self._connector, exc, ErrorKind.UNAVAILABLE, what)

    async def _open_session(self) -> _Session:
        import asyncpg

        s = self.settings
        args = self._connector._connect_args()
        # Named so that an operator (and the benchmarks) can tell the sessions apart.
        name = f"orchestratr-transport:{s.namespace}"
        args["server_settings"] = {**args["server_settings"], "application_name": name}
        try:
            conn = await asyncpg.connect(**args)
        except Exception as exc:
            raise self._error(exc, "connect") from None
        try:
            await self._prepare(conn)
            number = await conn.fetchval(f"SELECT nextval('{s.table('sessions')}')")
            await conn.execute("SELECT pg_advisory_lock($1, $2)", s.lock_class, number)
        except (BackendUnavailable, PermanentBackendError):
            conn.terminate()
            raise
        except Exception as exc:
            conn.terminate()
            raise self._error(exc, "open a session") from None
        session = _Session(conn, number, s.fence_timeout)

        def closed(_: Any) -> None:
            self._lose_session(session, "the connection to PostgreSQL closed")

        conn.add_termination_listener(closed)
        for what, channel in self._channels.items():
            await conn.add_listener(channel, self._notified(what))
        session.last_ok = time.monotonic()
        return session

    async def _prepare(self, conn: Any) -> None:
        """Bound PostgreSQL's wait for a silent client, then migrate (once)."""
        s = self.settings
        ms = str(int(s.session_timeout * 1000))
        half = str(max(1, int(s.session_timeout / 2)))
        settings = {
            "idle_session_timeout": ms,
            "idle_in_transaction_session_timeout": ms,
            "tcp_user_timeout": ms,
            "tcp_keepalives_idle": half,
            "tcp_keepalives_interval": "1",
            "tcp_keepalives_count": half,
            "client_connection_check_interval": "1000",
        }
        version = conn.get_server_version().major
        if version < 14:  # no idle_session_timeout, no client_connection_check_interval
            raise PermanentBackendError(
                "the postgresql transport needs PostgreSQL 14 or newer "
                f"(idle_session_timeout); the server is {version}"
            )
        for name, value in settings.items():
            await conn.execute("SELECT set_config($1, $2, false)", name, value)
        if not self._migrated:
            await migrate(conn, s)
            self._migrated = True

    def _notified(self, what: str) -> Callable[..., None]:
        kinds: dict[str, type[_Sub]] = {
            "jobs": _JobSub,
            "events": _EventSub,
            "commands": _CommandSub,
            "pools": _PoolWatch,
        }
        kind = kinds[what]

        def wake(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            # A jobs NOTIFY names the pools that got rows ('': any pool may have).
            pools = set(payload.split("\n")) if what == "jobs" and payload else None
            for sub in self._subs:
                if not isinstance(sub, kind):
                    continue
                if pools is None or getattr(sub, "pool", DEFAULT_POOL).key in pools:
                    sub.wake.set()

        return wake

    def _install(self, session: _Session) -> None:
        self._session = session
        self._ready.set()
        spawn(
            self._ping(session),
            name=f"orchestratr-pg-ping-{self.label}",
            logger=log,
            keep=session.tasks,
        )
        spawn(
            self._watch(session),
            name=f"orchestratr-pg-fence-{self.label}",
            logger=log,
            keep=session.tasks,
        )

    def _lose_session(self, session: _Session, reason: str) -> None:
        """The session can no longer be trusted: fence first, then drop it, reconnect."""
        if not session.alive:
            return
        session.alive = False
        for delivery in list(session.deliveries):
            delivery.lose()
        session.deliveries.clear()
        for sub in self._subs:
            if isinstance(sub, _JobSub):
                sub.held = {d for d in sub.held if d._session is not session}
        if self._events_owner is not None:
            self._events_owner = None
        with contextlib.suppress(Exception):
            session.conn.terminate()
        current = asyncio.current_task()
        for task in session.tasks:
            if task is not current:
                task.cancel()
        if self._session is session:
            self._session = None
            self._ready.clear()
        if self._state == "open":
            log.warning("transport %s lost its session (%s); reconnecting", self.label, reason)
            if self._reconnecting is None or self._reconnecting.done():
                self._reconnecting = spawn(
                    self._reconnect(), name=f"orchestratr-pg-reconnect-{self.label}", logger=log
                )

    async def _reconnect(self) -> None:
        s = self.settings
        async for attempt in retrying(
            "reconnect to PostgreSQL (transport)",
            initial=s.reconnect_delay,
            maximum=s.reconnect_max_delay,
            logger=log,
            wait_first=True,
            quiet_repeats=True,
            retry_on=(BackendUnavailable, PermanentBackendError),
        ):
            if self._state != "open":
                return
            with attempt:
                session = await self._open_session()
        if self._state != "open":
            session.conn.terminate()
            return
        self._install(session)
        record_reconnect("postgresql")
        for sub in reattach_order(self._subs):
            try:
                await sub.attach(session)
            except BackendUnavailable:
                return  # this session died already; its loss started another reconnect
        log.info("transport %s reconnected after %d attempt(s)", self.label, attempt.number)

    async def _ping(self, session: _Session) -> None:
        """Prove the session alive every ``heartbeat``. The ping reads which sessions
        of the namespace hold their lock: when one is gone, PostgreSQL has freed its
        rows, and the consumers look at once (a NOTIFY cannot say so)."""
        cls = self.settings.lock_class & 0xFFFFFFFF
        sql = (
            "SELECT coalesce(array_agg(objid::bigint), '{}') FROM pg_locks "
            "WHERE locktype = 'advisory' AND classid::bigint = $1 AND objsubid = 2"
        )
        known: set[int] = set()
        while session.alive:
            await asyncio.sleep(self.settings.heartbeat)
            try:
                live = set(await self._call(lambda conn: conn.fetchval(sql, cls), "ping", session))
            except BackendUnavailable:
                continue
            # A session gone since the last ping -- or before the first one, which has
            # nothing to compare with (a server killed while this one was starting).
            if not known or known - live:
                for sub in self._subs:
                    if isinstance(sub, _EventSub):
                        sub.wake.set()
                with contextlib.suppress(BackendUnavailable):
                    await self._wake_free_pools(session)
            known = live

    async def _job_poll(self) -> None:
        """The job consumers' safety poll (a missed NOTIFY): one statement every
        ``poll_interval`` for the whole transport, whatever the number of pools."""
        while self._state == "open":
            await asyncio.sleep(self.settings.poll_interval)
            try:
                await self._wake_free_pools()
            except BackendUnavailable:
                await self._ready.wait()
            except Exception:
                log.exception("looking for free jobs failed; trying again later")

    async def _wake_free_pools(self, session: _Session | None = None) -> None:
        """Wake the consumers with room whose pool has a free row. With consumers of
        one pool, wake them (a claim costs what the look would); with several, one
        statement says which pools have free rows, so that a server consuming many
        pools does not run a claim per pool."""
        subs = [
            sub
            for sub in self._subs
            if isinstance(sub, _JobSub) and not sub.closed and sub.capacity > len(sub.held)
        ]
        keys = sorted({sub.pool.key for sub in subs})
        if len(keys) <= 1:
            for sub in subs:
                sub.wake.set()
            return
        jobs = self.settings.table("jobs")
        sql = (
            f"SELECT DISTINCT j.pool FROM {jobs} j WHERE j.pool = ANY($1::text[]) AND "
            "(j.holder IS NULL OR j.holder NOT IN (SELECT l.objid::bigint FROM pg_locks l "
            "WHERE l.locktype = 'advisory' AND l.classid::bigint = $2 AND l.objsubid = 2 "
            "AND l.granted))"
        )
        cls = self.settings.lock_class & 0xFFFFFFFF
        rows = await self._call(
            lambda conn: conn.fetch(sql, keys, cls), "look for free jobs", session
        )
        free = {row["pool"] for row in rows}
        for sub in subs:
            if sub.pool.key in free:
                sub.wake.set()

    async def _watch(self, session: _Session) -> None:
        """The fence watchdog: no answered statement for ``fence_timeout`` -> lost."""
        while session.alive:
            left = session.valid_until - time.monotonic()
            if left <= 0:
                self._lose_session(
                    session,
                    f"no answer from PostgreSQL for {self.settings.fence_timeout:g} s",
                )
                return
            await asyncio.sleep(min(left, self.settings.heartbeat / 4))

    async def _current(self) -> _Session:
        if self._state != "open":
            raise BackendUnavailable("the postgresql transport is not connected")
        session = self._session
        if session is None or not session.alive:
            raise BackendUnavailable("the postgresql transport lost its session; reconnecting")
        return session

    async def _call(
        self,
        op: Callable[[Any], Awaitable[_T]],
        what: str,
        session: _Session | None = None,
    ) -> _T:
        """Run ``op(connection)`` alone on the session; an answer proves it alive as of
        the moment it was sent; a broken connection ends the session."""
        session = session or await self._current()
        async with session.lock:
            if not session.alive:
                raise BackendUnavailable("the postgresql transport lost its session")
            sent = time.monotonic()
            try:
                result = await op(session.conn)
            except (BackendUnavailable, PermanentBackendError, DeliveryLost):
                raise
            except Exception as exc:
                error = self._error(exc, what)
                if isinstance(error, BackendUnavailable) and (
                    session.conn.is_closed()
                    or self._connector.classify(exc) is ErrorKind.UNAVAILABLE
                ):
                    self._lose_session(session, str(error))
                raise error from None
            session.last_ok = max(session.last_ok, sent)
            return result

    # -- lifecycle --------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, migrate, take the session lock. Idempotent."""
        if self.connected:
            return
        s = self.settings
        async for attempt in retrying(
            f"connect to PostgreSQL at {s.url.host}",
            initial=s.reconnect_delay,
            maximum=s.reconnect_max_delay,
            attempts=s.connect_attempts,
            logger=log,
        ):
            with attempt:
                session = await self._open_session()
        self._state = "open"
        self._install(session)
        self._spawn(self._run_inbox(), "inbox")
        self._spawn(self._job_poll(), "job-poll")

    async def close(self) -> None:
        """Close: deliveries are lost first, then the session ends (its rows are free)."""
        if self._state in ("closed", "crashed"):
            return
        await self._shutdown("closed")

    def crash(self) -> Awaitable[None]:
        """Die as ``kill -9`` would: every delivery lost, the connection dropped."""
        return self._shutdown("crashed")

    async def _shutdown(self, state: str) -> None:
        if self._state in ("closed", "crashed"):
            return
        graceful = state == "closed"
        self._state = state
        session, self._session = self._session, None
        tasks: list[asyncio.Task[Any]] = [*self._tasks]
        if session is not None:
            for delivery in list(session.deliveries):
                delivery.lose()
            session.alive = False
            tasks.extend(session.tasks)
        for sub in self._subs:
            sub.closed = True
            if sub.task is not None:
                tasks.append(sub.task)
        self._subs.clear()
        if self._reconnecting is not None:
            tasks.append(self._reconnecting)
        await cancel_and_log([t for t in tasks if t is not asyncio.current_task()], logger=log)
        if session is not None:
            if graceful:
                try:
                    await asyncio.wait_for(session.conn.close(), 5)
                except Exception:
                    session.conn.terminate()
            else:
                session.conn.terminate()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return spawn(coro, name=f"orchestratr-pg-{name}-{self.label}", logger=log, keep=self._tasks)

    # -- signing and dead letters -------------------------------------------------------

    def _sign(self, body: bytes, queue: str, target: str | None = None) -> str | None:
        signer = self.settings.signer
        return None if signer is None else signer.sign(body, (queue, target or ""))

    def _verify(self, body: bytes, signature: str | None, queue: str, target: str | None) -> None:
        signer = self.settings.signer
        if signer is not None:
            signer.verify(signature, body, (queue, target or ""))

    def _decode(
        self,
        kind: type[_M],
        body: bytes,
        signature: str | None,
        queue: str,
        target: str | None = None,
    ) -> _M:
        self._verify(body, signature, queue, target)
        return decode_as(body, kind)

    def _dead_sql(self) -> str:
        dead = self.settings.table("dead")
        return (
            f"WITH ins AS (INSERT INTO {dead} (queue, payload, reason) VALUES ($1, $2, $3) "
            f"RETURNING id) DELETE FROM {dead} WHERE id <= (SELECT id FROM ins) - "
            f"{DEAD_LETTER_LIMIT}"
        )

    async def _dead_letter(
        self, queue: str, body: bytes, reason: str, *, delete: tuple[str, int] | None = None
    ) -> None:
        """Keep ``body`` in the bounded dead-letter table (one warning line), deleting
        its row from ``delete`` (table, id) in the same transaction."""
        log.warning(
            "dead-lettering a malformed %s row to %s: %s",
            queue,
            self.settings.table("dead"),
            reason,
        )

        async def op(conn: Any) -> None:
            async with conn.transaction():
                if delete is not None:
                    await conn.execute(
                        f"DELETE FROM {self.settings.table(delete[0])} WHERE id = $1", delete[1]
                    )
                await conn.execute(self._dead_sql(), queue, body, reason[:1000])

        await self._call(op, "dead-letter")

    # -- manager side -----------------------------------------------------------------

    async def publish_job(self, message: JobMessage) -> None:
        """Insert the job row in its pool and wake the servers that consume the pool;
        a pool new to the registry is registered by the same statement (and the
        watchers woken). Returns once committed."""
        body = encode(message)
        await self._insert("jobs", body, self._sign(body, "jobs"), message.pool.key)

    async def _insert(
        self, what: str, body: bytes, signature: str | None, pool: str = DEFAULT_POOL.key
    ) -> None:
        """Insert one row, committed before this returns. Rows published while an
        insert is in flight go together in the next statement (one commit, one
        NOTIFY), in call order: ``create_jobs`` publishes hundreds concurrently, and
        a commit each would make it wait on the disk once per job."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[what].append((body, signature, pool, future))
        if what not in self._flushing:
            self._flushing.add(what)
            self._spawn(self._flush(what), f"publish-{what}")
        await future

    def _flush_sql(self, what: str) -> str:
        """The statement that inserts a batch (payloads $1, signatures $2, pools $3)
        and NOTIFYs channel $4 with payload $5. For jobs it registers the batch's
        pools first (``ON CONFLICT DO NOTHING``: a pool registered already costs one
        index probe) and NOTIFYs the pool watchers, channel $6, of each new one, in
        the same transaction as the rows: a watcher that hears of a pool finds its
        rows."""
        s = self.settings
        if what != "jobs":
            return (
                f"WITH ins AS (INSERT INTO {s.table(what)} (payload, signature) "
                "SELECT p, g FROM unnest($1::bytea[], $2::text[], $3::text[]) AS u(p, g, k) "
                "RETURNING id) SELECT pg_notify($4, $5) WHERE EXISTS (SELECT FROM ins)"
            )
        return (
            f"WITH reg AS (INSERT INTO {s.table('pools')} (key) "
            f"SELECT DISTINCT k FROM unnest($3::text[]) AS u(k) WHERE k <> '{DEFAULT_POOL.key}' "
            "ON CONFLICT DO NOTHING RETURNING key), "
            f"ins AS (INSERT INTO {s.table('jobs')} (payload, signature, pool) "
            "SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[]) RETURNING id) "
            "SELECT pg_notify($4, $5) WHERE EXISTS (SELECT FROM ins) "
            "UNION ALL SELECT pg_notify($6, key) FROM reg"
        )

    async def _flush(self, what: str) -> None:
        sql = self._flush_sql(what)
        pending = self._pending[what]
        batch: list[tuple[bytes, str | None, str, asyncio.Future[None]]] = []
        try:
            while pending:
                batch = pending[:_PUBLISH_BATCH]
                del pending[:_PUBLISH_BATCH]
                bodies = [b for b, _, _, _ in batch]
                signatures = [s for _, s, _, _ in batch]
                pools = [k for _, _, k, _ in batch]
                args: list[Any] = [bodies, signatures, pools, self._channels[what]]
                args.append(_wake_payload(pools) if what == "jobs" else "")
                if what == "jobs":
                    args.append(self._channels["pools"])
                error: Exception | None = None
                try:
                    await self._call(
                        lambda conn, a=args: conn.execute(sql, *a),  # type: ignore[misc]
                        f"publish to {what}",
                    )
                except BackendUnavailable as exc:
                    error = PublishError(f"not stored by PostgreSQL: {exc}")
                for _, _, _, future in batch:
                    if future.done():
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
        finally:
            self._flushing.discard(what)
            for _, _, _, future in [*batch, *pending]:  # cancelled (closed) meanwhile
                if not future.done():
                    future.set_exception(
                        PublishError("the transport closed before PostgreSQL confirmed it")
                    )
            pending.clear()

    async def send_command(self, command: Command, server_id: str | None = None) -> None:
        """Insert a command row for ``server_id`` (or all servers) and wake them."""
        body = encode(command)
        await self._commands([(server_id, body)])

    async def _commands(
        self, rows: list[tuple[str | None, bytes]], cancellations: Collection[str] | None = None
    ) -> None:
        s = self.settings
        commands = s.table("commands")

        async def op(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", s.lock_class, SERIAL_KEY)
                if cancellations is not None:
                    table = s.table("cancellations")
                    previous = {r[0] for r in await conn.fetch(f"SELECT job_id FROM {table}")}
                    wanted = set(cancellations)
                    await conn.execute(
                        f"DELETE FROM {table} WHERE job_id = ANY($1::text[])",
                        sorted(previous - wanted),
                    )
                    added = sorted(wanted - previous)
                    await conn.execute(
                        f"INSERT INTO {table} (job_id) SELECT unnest($1::text[])", added
                    )
                    rows.extend((None, encode(CancelJob(job_id=i))) for i in added)
                    await conn.execute(
                        f"DELETE FROM {commands} WHERE published_at < now() - make_interval("
                        "secs => $1)",
                        s.command_retention,
                    )
                if rows:
                    await conn.executemany(
                        f"INSERT INTO {commands} (target, payload, signature) VALUES ($1, $2, $3)",
                        [(t, b, self._sign(b, "commands", t)) for t, b in rows],
                    )
                    await conn.execute("SELECT pg_notify($1, '')", self._channels["commands"])

        try:
            await self._call(op, "send commands")
        except BackendUnavailable as exc:
            raise PublishError(f"not stored by PostgreSQL: {exc}") from None

    async def set_cancellations(self, job_ids: Collection[str]) -> None:
        """Replace the cancellation set; a CancelJob broadcast for every id added."""
        await self._commands([], frozenset(job_ids))

    async def events_backlog(self) -> int | None:
        """The event rows not yet applied (and deleted): what waits, and the ones the
        consumer has read and is applying one by one -- a frontier a few events
        later than the broker's count would make it, never an earlier one."""
        events = self.settings.table("events")
        count = await self._call(
            lambda conn: conn.fetchval(f"SELECT count(*) FROM {events}"), "count the events"
        )
        return int(count)

    async def consume_events(self, handler: EventHandler) -> Subscription:
        """Consume events while this transport holds the events lock (one manager at a time)."""
        await self._current()
        sub = _EventSub(self, handler)
        self._subs.append(sub)
        sub.task = self._spawn(self._event_loop(sub), "events")
        sub.wake.set()
        return sub

    async def _event_loop(self, sub: _EventSub) -> None:
        s = self.settings
        events = s.table("events")
        while not sub.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.wake.wait(), s.poll_interval)
            sub.wake.clear()
            try:
                if self._events_owner is None:
                    got = await self._call(
                        lambda conn: conn.fetchval(
                            "SELECT pg_try_advisory_lock($1, $2)", s.lock_class, EVENTS_KEY
                        ),
                        "take the events lock",
                    )
                    if got and not sub.closed:
                        self._events_owner = sub
                while self._events_owner is sub and not sub.closed:
                    rows = await self._call(
                        lambda conn: conn.fetch(
                            f"SELECT id, payload, signature FROM {events} ORDER BY id LIMIT 100"
                        ),
                        "read events",
                    )
                    if not rows:
                        break
                    for row in rows:
                        if self._events_owner is not sub or sub.closed:
                            break
                        await self._handle_event(sub, row)
            except BackendUnavailable:
                await self._ready.wait()
            except Exception:
                log.exception("reading events failed; trying again at the next wake-up")

    async def _handle_event(self, sub: _EventSub, row: Any) -> None:
        events = self.settings.table("events")
        try:
            event = self._decode(Event, row["payload"], row["signature"], "events")
        except MalformedMessage as exc:
            await self._dead_letter(
                "events", row["payload"], str(exc), delete=("events", row["id"])
            )
            return
        while True:
            try:
                await sub.handler(event)
            except DeadLetter as exc:
                await self._dead_letter(
                    "events",
                    row["payload"],
                    f"{event.TYPE} event refused: {exc}",
                    delete=("events", row["id"]),
                )
                return
            except Exception:
                log.exception("event handler raised; the event is handed over again")
                await asyncio.sleep(self.settings.event_retry_delay)
                if self._events_owner is not sub or sub.closed:
                    return
                continue
            break
        await self._call(
            lambda conn: conn.execute(f"DELETE FROM {events} WHERE id = $1", row["id"]),
            "acknowledge an event",
        )

    async def _resign_events(self, sub: _EventSub) -> None:
        if self._events_owner is not sub:
            return
        self._events_owner = None
        s = self.settings
        with contextlib.suppress(BackendUnavailable):

            async def op(conn: Any) -> None:
                await conn.execute("SELECT pg_advisory_unlock($1, $2)", s.lock_class, EVENTS_KEY)
                await conn.execute("SELECT pg_notify($1, '')", self._channels["events"])

            await self._call(op, "hand the events over")
        for other in self._subs:
            if isinstance(other, _EventSub):
                other.wake.set()

    # -- server side ------------------------------------------------------------------

    async def publish_event(self, event: Event) -> None:
        """Insert an event row (committed) and wake the managers."""
        body = encode(event)
        await self._insert("events", body, self._sign(body, "events"))

    async def _read_cancellations(self) -> frozenset[str]:
        table = self.settings.table("cancellations")
        rows = await self._call(
            lambda conn: conn.fetch(f"SELECT job_id FROM {table}"), "read the cancellation set"
        )
        return frozenset(r["job_id"] for r in rows)

    async def consume_commands(
        self, server_id: str, handler: CommandHandler
    ) -> tuple[Subscription, frozenset[str]]:
        """Start at the newest command, then read the cancellation set."""
        commands = self.settings.table("commands")
        sub = _CommandSub(self, server_id, handler)
        sub.cursor = await self._call(
            lambda conn: conn.fetchval(f"SELECT coalesce(max(id), 0) FROM {commands}"),
            "subscribe to commands",
        )
        snapshot = await self._read_cancellations()
        sub.known |= snapshot
        sub.started = True
        self._subs.append(sub)
        sub.task = self._spawn(self._command_loop(sub), "commands")
        return sub, snapshot

    async def _command_loop(self, sub: _CommandSub) -> None:
        while not sub.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.wake.wait(), self.settings.poll_interval)
            sub.wake.clear()
            try:
                await self._fetch_commands()
            except BackendUnavailable:
                await self._ready.wait()
            except Exception:
                log.exception("reading commands failed; trying again at the next wake-up")

    async def _fetch_commands(self) -> None:
        """Every command subscription's new rows into the inbox, in id order."""
        commands = self.settings.table("commands")
        async with self._command_lock:
            for sub in [s for s in self._subs if isinstance(s, _CommandSub) and not s.closed]:
                rows = await self._call(
                    lambda conn, sub=sub: conn.fetch(  # type: ignore[misc]
                        f"SELECT id, target, payload, signature FROM {commands} "
                        "WHERE id > $1 AND (target IS NULL OR target = $2) ORDER BY id",
                        sub.cursor,
                        sub.server_id,
                    ),
                    "read commands",
                )
                for row in rows:
                    sub.cursor = max(sub.cursor, row["id"])
                    try:
                        command = self._decode(
                            Command, row["payload"], row["signature"], "commands", row["target"]
                        )
                    except MalformedMessage as exc:
                        await self._dead_letter(
                            "commands", row["payload"], f"for server {sub.server_id}: {exc}"
                        )
                        continue
                    if isinstance(command, CancelJob):
                        sub.known.add(command.job_id)
                    self._inbox.put_nowait((sub, command))

    async def consume_jobs(self, capacity: int, handler: DeliveryHandler) -> JobConsumer:
        """Claim up to ``capacity`` job rows of the default pool at a time."""
        return await self.consume_pool(DEFAULT_POOL, capacity, handler)

    async def consume_pool(
        self, pool: Pool, capacity: int, handler: DeliveryHandler
    ) -> JobConsumer:
        """Claim up to ``capacity`` rows of ``pool`` at a time (a consumer of its own,
        woken by the NOTIFYs that name the pool; capacity across pools is the
        server's, which sets each consumer's)."""
        _check_capacity(capacity)
        session = await self._current()
        sub = _JobSub(self, capacity, handler, pool)
        await self._count_consumer(sub.key, session)
        self._subs.append(sub)
        sub.task = self._spawn(self._job_loop(sub), f"jobs-{pool.key}")
        sub.wake.set()
        return sub

    async def watch_pools(self, handler: PoolHandler) -> Subscription:
        """Name the default pool and every pool of ``<namespace>_pools`` to
        ``handler``, then each pool registered later (the pools NOTIFY wakes the
        watch; the safety poll covers a missed one), and all of them again after a
        reconnect."""
        await self._current()
        sub = _PoolWatch(self, handler)
        self._subs.append(sub)
        try:
            await self._name_pools(sub)
        except BaseException:
            await sub.close()
            raise
        sub.task = self._spawn(self._pool_loop(sub), "pools")
        return sub

    async def _pool_loop(self, sub: _PoolWatch) -> None:
        while not sub.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.wake.wait(), self.settings.poll_interval)
            sub.wake.clear()
            try:
                await self._name_pools(sub)
            except BackendUnavailable:
                await self._ready.wait()
            except Exception:
                log.exception("reading the pool registry failed; trying again at the next wake-up")

    async def _name_pools(self, sub: _PoolWatch) -> None:
        """Name the pools ``sub`` has not named on this session, in registration order."""
        table = self.settings.table("pools")
        rows = await self._call(
            lambda conn: conn.fetch(f"SELECT key FROM {table} ORDER BY registered_at, key"),
            "read the pool registry",
        )
        for key in [DEFAULT_POOL.key, *(r["key"] for r in rows)]:
            if sub.closed:
                return
            if key in sub.named:
                continue
            try:
                pool = Pool.from_key(key)
            except Exception as exc:
                log.warning("ignoring an unreadable entry of %s: %s", table, exc)
                sub.named.add(key)
                continue
            await sub.handler(pool)
            sub.named.add(key)

    async def _job_loop(self, sub: _JobSub) -> None:
        """Claim when woken: by a NOTIFY naming the pool, a settle, a capacity
        change, a session gone, or the transport's safety poll (:meth:`_job_poll`)."""
        while not sub.closed:
            await sub.wake.wait()
            sub.wake.clear()
            try:
                while not sub.closed and await self._claim(sub):
                    pass
            except BackendUnavailable:
                await self._ready.wait()
            except Exception:
                log.exception("claiming jobs failed; trying again at the next wake-up")

    async def _claim(self, sub: _JobSub) -> bool:
        """Claim what capacity allows; True when a full batch came (claim again)."""
        free = sub.capacity - len(sub.held)
        if free <= 0:
            return False
        s = self.settings
        want = min(free, s.claim_batch)
        session = await self._current()
        cls = s.lock_class & 0xFFFFFFFF

        async def op(conn: Any) -> list[Any]:
            rows: list[Any] = await conn.fetch(
                self._claim_sql, session.number, cls, want, sub.key & 0xFFFFFFFF, sub.pool.key
            )
            return rows

        rows = await self._call(op, "claim jobs", session)
        deliveries: list[PostgresDelivery] = []
        for row in sorted(rows, key=lambda r: r["id"]):
            try:
                message = self._decode(JobMessage, row["payload"], row["signature"], "jobs")
            except MalformedMessage as exc:
                await self._dead_letter(
                    "jobs", row["payload"], str(exc), delete=("jobs", row["id"])
                )
                continue
            delivery = PostgresDelivery(self, session, row["id"], message, row["count"])
            if not session.alive:  # died while this batch was being looked at
                delivery.lose()
                continue
            session.deliveries.add(delivery)
            sub.held.add(delivery)
            deliveries.append(delivery)
        # Commands committed before these jobs were claimed go first (a CancelJob
        # always reaches the server before the delivery of the job it cancels).
        if deliveries and any(isinstance(x, _CommandSub) for x in self._subs):
            await self._fetch_commands()
        for delivery in deliveries:
            self._inbox.put_nowait((sub, delivery))
        if len(rows) >= want:
            return True  # a full batch: there may be more
        if rows:
            # Took a fair share: look again once the others have had theirs.
            asyncio.get_running_loop().call_later(_SHARE_AGAIN, sub.wake.set)
        return False

    async def _count_consumer(self, key: int, session: _Session | None) -> None:
        """Hold the shared consumer lock ``key`` (one pool's) on ``session`` (once),
        or, with ``None``, give it up when no consumer of that pool is left (claims
        share a pool's free rows among the holders of its lock)."""
        s = self.settings
        if session is not None:
            if key in session.consumers:
                return
            await self._call(
                lambda conn: conn.execute(
                    "SELECT pg_advisory_lock_shared($1, $2)", s.lock_class, key
                ),
                "count as a consumer",
                session,
            )
            session.consumers.add(key)
            return
        current = self._session
        if current is None or key not in current.consumers:
            return
        if any(
            isinstance(sub, _JobSub) and not sub.closed and sub.key == key for sub in self._subs
        ):
            return
        current.consumers.discard(key)
        with contextlib.suppress(BackendUnavailable):
            await self._call(
                lambda conn: conn.execute(
                    "SELECT pg_advisory_unlock_shared($1, $2)", s.lock_class, key
                ),
                "stop counting as a consumer",
                current,
            )

    async def _settle(self, delivery: PostgresDelivery, *, ack: bool) -> None:
        jobs = self.settings.table("jobs")
        session = delivery._session
        for sub in self._subs:
            if isinstance(sub, _JobSub):
                sub.held.discard(delivery)
        if ack:
            sql = f"DELETE FROM {jobs} WHERE id = $1 AND holder = $2"
            args: tuple[Any, ...] = (delivery.row_id, session.number)
        else:
            sql = (
                f"WITH upd AS (UPDATE {jobs} SET holder = NULL WHERE id = $1 AND holder = $2 "
                f"RETURNING pool) SELECT pg_notify('{self._channels['jobs']}', pool) FROM upd"
            )
            args = (delivery.row_id, session.number)
        try:
            await self._call(
                lambda conn: conn.execute(sql, *args),
                "acknowledge a job" if ack else "release a job",
                session,
            )
        except BackendUnavailable as exc:
            # Not settled, and not sure why: the session cannot be trusted to hold the
            # row any longer (its other deliveries go too; they come back as new ones).
            self._lose_session(session, f"a delivery could not be settled: {exc}")
            raise DeliveryLost(
                f"delivery of job {delivery.message.job_id} was lost with its session"
            ) from None
        pool = delivery.message.pool
        for sub in self._subs:
            if isinstance(sub, _JobSub) and sub.pool == pool:
                sub.wake.set()

    async def _run_inbox(self) -> None:
        """Hand deliveries and commands to their handlers one at a time, in order."""
        while self._state == "open":
            sub, item = await self._inbox.get()
            if isinstance(item, PostgresDelivery):
                assert isinstance(sub, _JobSub)
                if item.lost.is_set() or item.settled:
                    continue
                if sub.closed:
                    with contextlib.suppress(DeliveryLost, BackendUnavailable):
                        await item.release()
                    continue
                try:
                    await sub.handler(item)
                except Exception:
                    log.exception(
                        "job delivery handler raised; the delivery stays held job_id=%s",
                        item.message.job_id,
                    )
            else:
                assert isinstance(sub, _CommandSub)
                if sub.closed:
                    continue
                try:
                    await sub.handler(item)
                except Exception:
                    log.exception("command handler raised on %s", item.TYPE)
