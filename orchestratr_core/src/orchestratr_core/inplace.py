"""Updating a running job's argument in place: the client's and the manager's half.

The server half (``@updatable``, ``UpdateJob`` / ``JobUpdated``, drop marks) is in
:mod:`orchestratr_core.server` and :mod:`orchestratr_core.lifecycle`; the storage
half in :meth:`~orchestratr_core.storage.Storage.request_update_in_place` and its
companions. What this module does (``docs/architecture.md``, "Updating in place"):

* :func:`try_in_place` is the client's first step of ``update``: the storage
  decides, in one guarded write, whether the update goes in place (the job runs,
  its owner announced the job's kind updatable, every live server reads drop
  marks: all three are in the storage, the servers' from their heartbeats), so a
  client with no server view of its own takes the same decision as a manager.
* :func:`update_command` is the ``UpdateJob`` for the owner's copy; the client
  sends it at once (the fast path).
* :class:`InPlaceUpdates` is the leader manager's duty: it stores the owners'
  acknowledgements (``JobUpdated``), sends ``UpdateJob`` again for an update not
  acknowledged after a while (a lost command, or a client without a transport),
  and falls back to the fenced restart (:meth:`Storage.fall_back_update`) for
  one not acknowledged within ``ack_timeout``: a copy whose function does not
  take it after all (an older server, a function replaced at a restart of the
  server) is restarted with the new argument instead of running the old one.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from orchestratr_core.errors import BackendUnavailable, OrchestratrError, UnknownJob
from orchestratr_core.job import JobEvent, JobRecord, JobStatus, split_fence
from orchestratr_core.protocol import JobDiscarded, JobUpdated, UpdateJob
from orchestratr_core.storage import OutboxKind, Storage
from orchestratr_core.transport import Transport

__all__ = ["REASON_REDELIVERED", "InPlaceUpdates", "try_in_place", "update_command"]

log = logging.getLogger("orchestratr.inplace")

REASON_REDELIVERED = "its message was delivered again: released from its owner"
"""Why a job updated in place was released when a server dropped its redelivered
message (:meth:`InPlaceUpdates.discarded`)."""


async def try_in_place(
    storage: Storage, job_id: str, argument: str, now: datetime, holder: str, lease_until: datetime
) -> JobRecord | None:
    """Apply an update in place if the storage says it can be
    (:meth:`Storage.request_update_in_place`); ``None``: it cannot (or the
    backend does not implement it), and the caller restarts the job instead."""
    try:
        result = await storage.request_update_in_place(job_id, argument, now, holder, lease_until)
    except NotImplementedError:
        return None
    return None if result is None else result[0]


def update_command(job: JobRecord) -> UpdateJob:
    """The ``UpdateJob`` that gives the owner's copy of ``job`` its argument."""
    return UpdateJob(
        job_id=job.id,
        fence=job.fence,
        argument_version=job.argument_version,
        argument=job.argument,
    )


async def send_update(transport: Transport, job: JobRecord) -> bool:
    """Send :func:`update_command` to the job's owner; False (logged) if it could
    not be sent (the leader sends it again, or falls back to a restart)."""
    if job.server_id is None:
        return False
    try:
        await transport.send_command(update_command(job), job.server_id)
    except (OrchestratrError, OSError) as exc:
        log.warning("could not send the update of job %s to %s: %s", job.id, job.server_id, exc)
        return False
    return True


class InPlaceUpdates:
    """The leader's follow-up of updates applied in place (see the module docstring).

    :param ack_timeout: seconds an update may stay unacknowledged by its owner
        before the job is restarted with it instead.
    :param retention: seconds an update stays in the servers' cancellation set
        (its drop mark); older unacknowledged updates are not looked at.
    """

    def __init__(
        self,
        storage: Storage,
        transport: Transport,
        *,
        holder: str,
        ack_timeout: float,
        retention: float,
        lease: float,
    ) -> None:
        self._storage = storage
        self._transport = transport
        self._holder = holder
        self._ack_timeout = ack_timeout
        self._retention = retention
        self._lease = lease
        self._sent: dict[tuple[str, int], float] = {}
        """(job id, argument version) -> monotonic time its ``UpdateJob`` was last
        sent by this manager."""
        self.supported = True
        """False once the storage said it does not implement updates in place."""

    async def applied(self, event: JobUpdated) -> bool:
        """Store an owner's acknowledgement (:meth:`Storage.record_update_applied`)."""
        try:
            applied = await self._storage.record_update_applied(
                event.job_id, event.server_id, event.fence, event.argument_version
            )
        except NotImplementedError:
            return False
        self._sent.pop((event.job_id, event.argument_version), None)
        return applied

    async def discarded(self, event: JobDiscarded, now: datetime) -> bool:
        """A server dropped a message of a job updated in place: if it is the very
        message the owner runs (same generation) delivered again after the
        owner's delivery, the broker took it back from the owner (it died, or
        was cut off and stops its copy, as on any redelivery), so the job is
        released at once -- republished under the next generation with the new
        argument (``RELEASE`` on the owner's behalf, guarded on its fence) --
        instead of when the owner is declared dead. Returns whether it was."""
        job = await self._storage.get_job(event.job_id)
        if (
            job is None
            or job.status is not JobStatus.PROCESSING
            or job.server_id is None
            or job.update_mode != "in_place"
            or split_fence(event.fence)[0] != split_fence(job.fence)[0]
            or event.fence <= job.fence
        ):
            return False
        result = await self._storage.transition(
            job.id,
            JobEvent.RELEASE,
            server_id=job.server_id,
            fence=job.fence,
            now=now,
            reason=REASON_REDELIVERED,
        )
        if result.applied:
            log.info(
                "job %s: its message was delivered again (fence %d > %d): released from %s",
                job.id,
                event.fence,
                job.fence,
                job.server_id,
            )
        return result.applied

    async def follow_up(self, now: datetime) -> list[JobRecord]:
        """One round: every unacknowledged update in place is sent (again: at most
        once per third of ``ack_timeout``) or, once older than ``ack_timeout``,
        falls back to a restart. Returns the jobs that fell back (their stop set
        is to be written: the caller's :meth:`ServerManager._sync_cancellations`)."""
        if not self.supported:
            return []
        try:
            jobs = await self._storage.unapplied_updates(now - timedelta(seconds=self._retention))
        except NotImplementedError:
            self.supported = False
            return []
        fell_back: list[JobRecord] = []
        wanted: set[tuple[str, int]] = set()
        for job in jobs:
            key = (job.id, job.argument_version)
            updated = job.argument_updated_at or now
            if (now - updated).total_seconds() >= self._ack_timeout:
                try:
                    record, changed = await self._storage.fall_back_update(
                        job.id,
                        job.argument_version,
                        now,
                        self._holder,
                        now + timedelta(seconds=self._lease),
                    )
                except UnknownJob:
                    continue  # gone since the read
                if changed:
                    log.warning(
                        "job %s: update %d not acknowledged in place by %s within %.1f s: "
                        "restarting it with the new argument",
                        job.id,
                        job.argument_version,
                        job.server_id,
                        self._ack_timeout,
                    )
                    fell_back.append(record)
                continue
            wanted.add(key)
            last = self._sent.get(key)
            if last is not None and time.monotonic() - last < self._ack_timeout / 3:
                continue
            # Also at first sight: the client may have had no transport (the CLI).
            # A copy that holds the version already acknowledges it again.
            await send_update(self._transport, job)
            self._sent[key] = time.monotonic()
        for key in set(self._sent) - wanted:
            del self._sent[key]
        return fell_back

    async def forget_stop_rows(self, jobs: list[JobRecord]) -> None:
        """Delete this manager's ``cancel`` outbox rows of ``jobs`` once their stop
        set was written (as the client's fast path does)."""
        if not jobs:
            return
        try:
            await self._storage.complete_outbox_for_jobs(
                [job.id for job in jobs], OutboxKind.CANCEL, self._holder
            )
        except BackendUnavailable as exc:  # the relay writes the stop set again: harmless
            log.warning("could not delete the stop-set rows of restarted updates: %s", exc)
