"""Updating a job's argument end to end on the memory backends: a running job is
restarted with the new argument exactly once (never two copies, never the old
argument again), a queued or paused one starts with it, and bad input changes
nothing."""

from __future__ import annotations

import asyncio

import pytest

from orchestratr_core import InvalidJobInput, JobStatus
from orchestratr_core.errors import JobNotUpdatable, UnknownJob
from orchestratr_core.job import MAX_ARGUMENT_BYTES, new_id, split_fence
from orchestratr_core.lifecycle import hold_mark
from tests.support.cluster import FAST_SERVER, Cluster, eventually

# The restart: the hold reaches the copy (broadcast), it stops within the grace,
# its stop report is applied, and the leader's relay sends the new message.
UPDATE_BOUND = FAST_SERVER.heartbeat_interval + FAST_SERVER.stop_grace + 5.0


async def test_a_running_job_restarts_with_the_new_argument_exactly_once(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 5)
    await cluster.add_server("b", 5)
    (job_id,) = await cluster.create(1, "upd")
    await cluster.wait_running([job_id])
    before = await cluster.wait_status(job_id, JobStatus.PROCESSING)
    assert [c.argument for c in cluster.ledger.of(job_id)] == ["0"]

    updated = await cluster.client.update(job_id, "new-config")
    assert updated.argument == "new-config"
    assert updated.argument_version == 1
    assert updated.status is JobStatus.PAUSING and updated.update_pending

    async def restarted() -> bool:
        return [c.argument for c in cluster.ledger.running(job_id)] == ["new-config"]

    await eventually(restarted, UPDATE_BOUND, what="restarted with the new argument")
    after = await cluster.wait_status(job_id, JobStatus.PROCESSING)
    assert after.argument == "new-config" and not after.update_pending
    assert split_fence(after.fence)[0] > split_fence(before.fence)[0]
    # Exactly one more copy, with the new argument, never overlapping the old one.
    copies = cluster.ledger.of(job_id)
    assert [c.argument for c in copies] == ["0", "new-config"]
    assert cluster.ledger.overlaps() == []
    assert cluster.ledger.fences_grow()
    # And it stays so: no old-argument copy comes back, nothing restarts again.
    await asyncio.sleep(3 * FAST_SERVER.heartbeat_interval)
    assert [c.argument for c in cluster.ledger.of(job_id)] == ["0", "new-config"]
    # Servers drop any stray message of the superseded generation.
    assert hold_mark(job_id, before.generation) in cluster.broker.cancellations


async def test_an_update_survives_the_death_of_the_owner(cluster: Cluster) -> None:
    """The owner is killed right after the update (before or after it stopped the
    copy): the update is not lost, and the new owner runs the new argument."""
    await cluster.start_manager()
    await cluster.add_server("a", 2)
    (job_id,) = await cluster.create(1, "crash")
    await cluster.wait_running([job_id])
    await cluster.wait_status(job_id, JobStatus.PROCESSING)
    await cluster.client.update(job_id, "after-crash")
    await cluster.servers["a"].kill()
    await cluster.add_server("b", 2)

    async def restarted() -> bool:
        running = cluster.ledger.running(job_id)
        return [(c.server, c.argument) for c in running] == [("b", "after-crash")]

    await eventually(restarted, 20, what="restarted on b with the new argument")
    assert [c.argument for c in cluster.ledger.of(job_id) if c.server == "b"] == ["after-crash"]
    assert cluster.ledger.overlaps() == []


async def test_a_queued_job_starts_with_the_updated_argument(cluster: Cluster) -> None:
    await cluster.start_manager()
    (job_id,) = await cluster.create(1, "queued")
    await cluster.client.update(job_id, "fresh")
    await cluster.add_server("late", 2)
    await cluster.wait_running([job_id])
    await eventually(
        lambda: [c.argument for c in cluster.ledger.running(job_id)] == ["fresh"],
        UPDATE_BOUND,
        what="started with the new argument",
    )
    assert [c.argument for c in cluster.ledger.of(job_id)] == ["fresh"]


async def test_a_paused_job_stays_paused_and_resumes_with_the_new_argument(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 2)
    (job_id,) = await cluster.create(1, "held")
    await cluster.wait_running([job_id])
    await cluster.client.pause(job_id)
    await cluster.wait_status(job_id, JobStatus.PAUSED)
    updated = await cluster.client.update(job_id, "later")
    assert (updated.status, updated.argument, updated.update_pending) == (
        JobStatus.PAUSED,
        "later",
        False,
    )
    await asyncio.sleep(3 * FAST_SERVER.heartbeat_interval)
    assert cluster.ledger.running(job_id) == []
    await cluster.client.resume(job_id)
    await eventually(
        lambda: [c.argument for c in cluster.ledger.running(job_id)] == ["later"],
        UPDATE_BOUND,
        what="resumed with the new argument",
    )


async def test_bad_updates_are_clear_errors_and_change_nothing(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 2)
    (job_id,) = await cluster.create(1, "bad")
    await cluster.wait_running([job_id])
    before = await cluster.wait_status(job_id, JobStatus.PROCESSING)
    with pytest.raises(InvalidJobInput, match="the limit is"):
        await cluster.client.update(job_id, "x" * (MAX_ARGUMENT_BYTES + 1))
    with pytest.raises(InvalidJobInput, match="must be a string"):
        await cluster.client.update(job_id, 42)
    with pytest.raises(InvalidJobInput, match="NUL"):
        await cluster.client.update(job_id, "a\x00b")
    with pytest.raises(UnknownJob):
        await cluster.client.update(new_id(), "x")
    after = await cluster.job(job_id)
    assert (after.argument, after.argument_version, after.status) == (
        before.argument,
        0,
        JobStatus.PROCESSING,
    )
    await cluster.client.mark_on_deleting(job_id)
    with pytest.raises(JobNotUpdatable, match=r"deleting|deleted"):
        await cluster.client.update(job_id, "too late")
    assert (await cluster.job(job_id)).argument == before.argument
    assert [c.argument for c in cluster.ledger.of(job_id)] == [before.argument]
