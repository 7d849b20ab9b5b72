"""Creating and cancelling jobs (``OrchestratorClient``)."""

from __future__ import annotations

import logging
from datetime import timedelta

from orchestratr_core.errors import BackendUnavailable, InvalidJobInput, PublishError
from orchestratr_core.job import (
    JobRecord,
    NewJob,
    new_id,
    utcnow,
    validate_argument,
    validate_name,
)
from orchestratr_core.protocol import JobMessage
from orchestratr_core.storage import OutboxKind, Storage
from orchestratr_core.transport import Transport

__all__ = ["DEFAULT_CANCEL_RETENTION", "OrchestratorClient", "job_message"]

log = logging.getLogger("orchestratr.client")

DEFAULT_CANCEL_RETENTION = 24 * 3600.0
"""Seconds a deleted job stays in the servers' cancellation set, so that a stray
duplicate of its message (a publish retried after a lost confirm) is dropped too."""


def job_message(job: JobRecord, generation: int) -> JobMessage:
    """The job message for one generation of a job."""
    return JobMessage(
        job_id=job.id,
        name=job.name,
        argument=job.argument,
        generation=generation,
        created_at=job.created_at.timestamp(),
        heartbeat_timeout=job.heartbeat_timeout,
    )


class OrchestratorClient:
    """Creates and cancels jobs.

    Every change is first committed to the storage together with an *outbox*
    row; the message is sent only after the commit. With a transport, the client
    sends it at once and deletes the outbox row; without one (or if the send
    fails), a running manager sends it. So there is never a message without a
    job row, nor a committed job without a message.

    :param storage: an opened storage.
    :param transport: a connected transport, or ``None`` to leave sending to a
        running manager.
    :param holder: who claims the outbox rows (the manager's id).
    """

    def __init__(
        self,
        storage: Storage,
        transport: Transport | None = None,
        *,
        holder: str | None = None,
        outbox_lease: float = 10.0,
        cancel_retention: float = DEFAULT_CANCEL_RETENTION,
    ) -> None:
        self._storage = storage
        self._transport = transport
        self._holder = holder or f"client-{new_id()}"
        # The fast path holds its outbox row only briefly: if the broker is slow or
        # down, the leader's relay takes over within a couple of seconds (a rare
        # second copy of a message is harmless: the fencing tokens sort it out).
        self._lease = timedelta(seconds=min(outbox_lease, 2.0))
        self._retention = timedelta(seconds=cancel_retention)

    async def create_job(
        self, name: str, argument: str = "", *, heartbeat_timeout: float | None = None
    ) -> str:
        """Create a job and start it on one server as soon as one has room.

        :param heartbeat_timeout: optional watchdog: if the job function does not
            call ``heartbeat()`` within this many seconds, its server restarts it
            (recorded as a failure with a ``watchdog`` error).

        :returns: the new job's id.
        :raises InvalidJobInput: empty, blank, over-long name or one with control
            characters; an argument that is not a string or too large.
        :raises DuplicateJobName: a job of this name exists and is not deleted.
        """
        name = validate_name(name)
        argument = validate_argument(argument)
        if heartbeat_timeout is not None and (
            isinstance(heartbeat_timeout, bool)
            or not isinstance(heartbeat_timeout, int | float)
            or not 0 < heartbeat_timeout <= 86400
        ):
            raise InvalidJobInput("heartbeat_timeout must be a number of seconds in (0, 86400]")
        now = utcnow()
        # Without a transport the row is left unclaimed, for a manager to send at once.
        lease_until = now + self._lease if self._transport is not None else now
        record = await self._storage.create_job(
            NewJob(
                id=new_id(),
                name=name,
                argument=argument,
                created_at=now,
                heartbeat_timeout=None if heartbeat_timeout is None else float(heartbeat_timeout),
            ),
            self._holder,
            lease_until,
        )
        if self._transport is not None:
            try:
                await self._transport.publish_job(job_message(record, record.generation))
            except (PublishError, BackendUnavailable) as exc:
                log.warning(
                    "job %s created; its message will be sent by the manager (%s)", record.id, exc
                )
                return record.id
            await self._storage.complete_outbox_for_job(record.id, OutboxKind.PUBLISH, self._holder)
        return record.id

    async def mark_on_deleting(self, job_id: str) -> JobRecord:
        """Cancel a job, durably. It stops wherever it runs, is never started
        again — also if it is queued, its server is dead, or the manager restarts
        — and ends ``deleted`` once a server confirms. Cancelling a job that is
        already cancelled or completed changes nothing.

        :raises UnknownJob: no job has this id.
        """
        if not isinstance(job_id, str) or not job_id.strip():
            raise InvalidJobInput("job id must be a non-empty string")
        now = utcnow()
        lease_until = now + self._lease if self._transport is not None else now
        record, changed = await self._storage.request_cancel(job_id, now, self._holder, lease_until)
        if changed and self._transport is not None:
            try:
                ids = await self._storage.cancelled_job_ids(now - self._retention)
                await self._transport.set_cancellations(ids)
            except (PublishError, BackendUnavailable) as exc:
                log.warning("job %s cancelled; the manager will broadcast it (%s)", job_id, exc)
                return record
            await self._storage.complete_outbox_for_job(job_id, OutboxKind.CANCEL, self._holder)
        return record
