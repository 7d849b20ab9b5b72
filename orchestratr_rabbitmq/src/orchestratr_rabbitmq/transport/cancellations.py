"""The cancellation set: one durable message on ``<ns>.cancellations`` (a quorum
queue in a quorum namespace). The message is its own lock: whoever holds it (taken
with ``basic.get``, unacknowledged) is the only one that can read or replace it;
the broker gives it back when its holder dies. Nothing lives on a single node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Collection

import aiormq
import aiormq.abc
from aiormq import spec

from orchestratr_core.errors import (
    BackendUnavailable,
    MalformedMessage,
    OrchestratrError,
    PublishError,
)
from orchestratr_core.protocol import CancelJob, encode
from orchestratr_core.retry import retrying
from orchestratr_rabbitmq.settings import Settings
from orchestratr_rabbitmq.transport.authenticity import Authenticity
from orchestratr_rabbitmq.transport.deliveries import delivery_tag
from orchestratr_rabbitmq.transport.errors import Quiet, describe
from orchestratr_rabbitmq.transport.publisher import Publisher
from orchestratr_rabbitmq.transport.session import Session

__all__ = ["CancellationSet"]

log = logging.getLogger("orchestratr.transport.rabbitmq")

_SNAPSHOT_TYPE = "cancellations"

LOST_AFTER = 0.75
"""A writer that finds no set (with the marker saying one was written) for this
share of ``snapshot_timeout`` writes one anyway: a holder keeps it milliseconds."""


class _Busy(BackendUnavailable):
    """Another holder has the lock, or the set is on its way back to its queue."""


class CancellationSet:
    """Reads and replaces the durable cancellation set of a namespace."""

    def __init__(self, settings: Settings, authenticity: Authenticity, publisher: Publisher):
        self.settings = settings
        self.authenticity = authenticity
        self.publisher = publisher

    async def replace(self, session: Session, job_ids: Collection[str]) -> None:
        """Replace the set on ``session``, broadcasting each id the stored set lacked."""
        try:
            await self._snapshot(session, write=frozenset(job_ids))
        except OrchestratrError:
            raise
        except Exception as exc:
            raise PublishError(f"replacing the cancellation set failed: {describe(exc)}") from None

    async def recreate(self, session: Session) -> None:
        """Rebuild a set queue declared with other arguments, keeping the set."""
        await self._snapshot(session, write=None, recreate=True)

    async def read(self, session: Session) -> frozenset[str]:
        """The durable cancellation set, read on ``session``."""
        try:
            return await self._snapshot(session, write=None)
        except PublishError as exc:  # a read puts the set back with a confirmed publish
            raise BackendUnavailable(f"reading the cancellation set failed: {exc}") from None

    async def _snapshot(
        self, session: Session, write: frozenset[str] | None, *, recreate: bool = False
    ) -> frozenset[str]:
        """Read (``write=None``) or replace the cancellation set.

        The set is one message on ``<ns>.cancellations``, and taking it is the lock:
        ``basic.get`` hands a message to one taker at a time, and the broker returns
        it when its taker's channel closes (the taker died, or its node did). So we
        take *every* message of the set queue and keep the newest (a version stamp
        that only grows; normally there is one). A writer (manager, web) then
        **publishes** the new set (confirmed: it is in the queue) and acks what it
        took. A reader (a server, whose broker user may not write the set) requeues
        what it took.

        An empty queue counts as "no set" only if the marker exchange
        ``<ns>.cancellations.written`` does not exist; otherwise the set is held by
        another taker or on its way back, and we wait for it -- readers and
        writers alike, so that a writer never stores a second set beside a held
        one. Before 0.x this ran under an exclusive consumer on the classic queue
        ``<ns>.cancellations.lock``, which lives on one node: while that node was
        down nobody could read or write the set (docs/reliability.md).
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
        self, session: Session, write: frozenset[str] | None, recreate: bool
    ) -> frozenset[str]:
        async with contextlib.aclosing(
            retrying(
                "take the cancellation set",
                initial=0.005,
                maximum=0.25,
                retry_on=(_Busy,),
                within=self.settings.snapshot_timeout,
                logger=log,
                level=logging.DEBUG,  # another taker is routine, not a fault
            )
        ) as attempts:
            loop = asyncio.get_running_loop()
            started = loop.time()
            async for attempt in attempts:
                # A set missing for most of the window was lost (purged by hand), not
                # held: a writer stores a new one rather than fail every cancel for good.
                force = (
                    write is not None
                    and loop.time() - started > LOST_AFTER * self.settings.snapshot_timeout
                )
                if force:
                    log.warning(
                        "the cancellation set %s has been missing for %.1fs although one was "
                        "written before; writing it again",
                        session.topology.cancellations,
                        loop.time() - started,
                    )
                with attempt:
                    return await self._snapshot_once(session, write, recreate, force)
        raise AssertionError("retrying ends by a result or an error")  # pragma: no cover

    async def _snapshot_once(
        self, session: Session, write: frozenset[str] | None, recreate: bool, force: bool
    ) -> frozenset[str]:
        channel = await session.connection.channel(publisher_confirms=False)
        try:
            underlay = await channel.get_underlay_channel()
            result = await self._snapshot_locked(session, underlay, write, recreate, force)
        finally:
            with Quiet():
                await channel.close()
        if result is None:
            raise _Busy(
                "the cancellation set stayed held by another process or in transit for "
                f"over {self.settings.snapshot_timeout:g}s; retry"
            )
        return result

    async def _snapshot_locked(
        self,
        session: Session,
        underlay: aiormq.abc.AbstractChannel,
        write: frozenset[str] | None,
        recreate: bool,
        force: bool = False,
    ) -> frozenset[str] | None:
        """One attempt; ``None``: retry (the set is held by another or in transit).
        ``force``: write even though the set has been missing for long."""
        t = session.topology
        taken: list[tuple[int, frozenset[str], int]] = []
        while True:
            raw = await underlay.basic_get(t.cancellations, no_ack=False)
            if not isinstance(raw.delivery, spec.Basic.GetOk):
                break
            tag = delivery_tag(raw)
            try:
                self.authenticity.verify(raw)
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
        if current is None:
            if not force and await self._marker_exists(session):
                return None  # written before, so another holds it or it is on its way back
            if write is None and not recreate:
                return frozenset()
        if write is None and not recreate:
            assert current is not None
            # A read writes nothing (a server's user may not publish the set): hand
            # back what we took. No need to wait until the queue shows it again: a
            # taker that finds it empty meanwhile sees the marker and waits for it
            # (and with several readers the message may never rest in the queue).
            for _, _, tag in taken:
                await underlay.basic_reject(tag, requeue=True)
            return current[1]
        stored = current[1] if current else frozenset()
        if recreate:
            # Declared by an older version with x-max-length, which makes a quorum queue
            # drop a newer set while the old one is held: rebuild it, keeping the set
            # (a taker meanwhile finds no queue or an empty one, and the marker: waits).
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
                    self.publisher.publish(
                        session,
                        t.broadcast_exchange,
                        "",
                        encode(CancelJob(job_id=job_id)),
                        CancelJob.TYPE,
                        drop_unroutable=True,
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
        await self.publisher.publish(
            session, t.cancellations_exchange, t.cancellations, body, _SNAPSHOT_TYPE
        )
        for _, _, tag in taken:
            await underlay.basic_ack(tag)
        await underlay.basic_qos(prefetch_count=1)  # a round trip: the acks are processed
        return keep

    async def _marker_exists(self, session: Session) -> bool:
        channel = await session.connection.channel(publisher_confirms=False)
        try:
            await channel.declare_exchange(session.topology.cancellations_marker, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            with Quiet():
                await channel.close()
        return True


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
