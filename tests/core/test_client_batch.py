"""The client's allocation path on the memory backends: batched outbox deletes,
the relay covering a client that died before its batch, and create_jobs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest

from orchestratr_core import DuplicateJobName, InvalidJobInput, JobStatus
from orchestratr_core.client import OrchestratorClient
from orchestratr_core.errors import PublishError
from orchestratr_core.job import (
    JobEvent,
    JobQuery,
    JobRecord,
    NewJob,
    TransitionResult,
    new_id,
    split_fence,
    utcnow,
)
from orchestratr_core.manager import RELAY_START_SLACK
from orchestratr_core.protocol import JobMessage, ServerHeartbeat
from orchestratr_core.storage import OutboxItem, OutboxKind, Storage
from orchestratr_memory import MemoryStorage
from orchestratr_memory.transport import MemoryTransport
from tests.support.cluster import FAST_MANAGER, FAST_SERVER, Cluster, eventually


class CountingStorage(MemoryStorage):
    """The memory storage, counting the outbox deletes the client makes."""

    def __init__(self) -> None:
        super().__init__()
        self.single: list[str] = []
        self.batches: list[list[str]] = []

    async def complete_outbox_for_job(self, job_id: str, kind: OutboxKind, holder: str) -> int:
        self.single.append(job_id)
        return await super().complete_outbox_for_job(job_id, kind, holder)

    async def complete_outbox_for_jobs(
        self, job_ids: Sequence[str], kind: OutboxKind, holder: str
    ) -> int:
        self.batches.append(list(job_ids))
        return await super().complete_outbox_for_jobs(job_ids, kind, holder)


class StalledEvents(MemoryStorage):
    """The memory storage whose application of the servers' starts and heartbeats
    waits while ``stalled`` is clear: the manager's events lag behind, as when its
    storage has just failed over and its event retries are backing off."""

    def __init__(self) -> None:
        super().__init__()
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def transition(self, job_id: str, event: JobEvent, **kwargs: Any) -> TransitionResult:
        if event is JobEvent.START:
            await self.flowing.wait()
        return await super().transition(job_id, event, **kwargs)

    async def apply_heartbeat(self, heartbeat: ServerHeartbeat, now: datetime) -> list[JobRecord]:
        await self.flowing.wait()
        return await super().apply_heartbeat(heartbeat, now)


class LegacyStorage(MemoryStorage):
    """A third-party backend written before the batch methods: the ABC defaults."""

    create_jobs = Storage.create_jobs
    complete_outbox_for_jobs = Storage.complete_outbox_for_jobs
    count_running_by_server = Storage.count_running_by_server


class FlakyPublish(MemoryTransport):
    """A real memory transport refusing the messages of some job names."""

    def __init__(self, url: str, refuse: set[str]) -> None:
        super().__init__(url)
        self.refuse = refuse

    async def publish_job(self, message: JobMessage) -> None:
        if message.name in self.refuse:
            raise PublishError("broker did not confirm")
        await super().publish_job(message)


async def _outbox(storage: Storage) -> list[OutboxItem]:
    """Every outbox row (claimed by an auditor long after every lease ended)."""
    far = utcnow() + timedelta(days=1)
    return await storage.claim_outbox("auditor", far, far + timedelta(days=1), 100_000)


async def _stored(storage: Storage) -> list[JobRecord]:
    return list((await storage.list_jobs(JobQuery(include_deleted=True, limit=None))).items)


# -- create_job: the outbox rows of sent messages are deleted in batches ---------------


async def test_sent_outbox_rows_are_deleted_in_batches_not_one_transaction_each() -> None:
    storage = CountingStorage()
    transport = MemoryTransport("memory://batch-deletes")
    await transport.connect()
    try:
        client = OrchestratorClient(storage, transport, holder="m", outbox_flush_batch=8)
        ids = await asyncio.gather(*(client.create_job(f"job-{i}") for i in range(20)))
        await client.close()
        assert storage.single == []  # no per-job delete transaction any more
        assert sorted(i for batch in storage.batches for i in batch) == sorted(ids)
        assert len(storage.batches) <= 4  # 20 ids, at most 8 per statement
        assert all(len(batch) <= 8 for batch in storage.batches)
        assert await _outbox(storage) == []
    finally:
        await transport.close()


async def test_a_flush_within_the_interval_deletes_without_close() -> None:
    storage = CountingStorage()
    transport = MemoryTransport("memory://batch-interval")
    await transport.connect()
    try:
        client = OrchestratorClient(storage, transport, holder="m", outbox_flush_interval=0.01)
        job_id = await client.create_job("soon")
        await eventually(lambda: storage.batches == [[job_id]], timeout=2, what="flushed")
        assert await _outbox(storage) == []
    finally:
        await transport.close()


async def test_stopping_the_manager_flushes_its_clients_outbox_rows(cluster: Cluster) -> None:
    manager = await cluster.start_manager()
    manager.client._sent._interval = 3600  # only close() can flush it now
    job_id = await manager.client.create_job("last-one")
    await manager.stop()
    cluster.manager = None
    await cluster.storage.open()  # the store outlives the closed storage object
    assert [r.id for r in await _stored(cluster.storage)] == [job_id]
    assert await _outbox(cluster.storage) == []


async def test_an_unflushed_row_of_a_started_job_is_dropped_not_sent_again(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The client dies (or its database fails over) after publishing, before its
    batch delete: once the client's lease ended the manager's relay finds the row
    of a job that runs this very generation, so the message was sent and is held:
    it deletes the row and sends nothing (a second message could start a second
    copy on another server under the same fencing token)."""
    caplog.set_level(logging.INFO)
    await cluster.start_manager()
    await cluster.add_server("a", 5)
    transport = cluster.transport()
    await transport.connect()
    dying = OrchestratorClient(
        cluster.storage, transport, holder="dying-client", outbox_flush_interval=3600
    )
    try:
        job_id = await dying.create_job("survivor")
        await cluster.wait_running([job_id])
        await cluster.wait_status(job_id, JobStatus.PROCESSING)
        assert _outbox_rows(cluster.storage) == 1  # left behind by the "dead" client
        # After the client's lease (2 s) the relay claims and deletes it.
        await eventually(lambda: _outbox_rows(cluster.storage) == 0, timeout=10, what="relayed")
        await asyncio.sleep(0.5)
        assert "dropping duplicate delivery" not in caplog.text
        assert cluster.ledger.overlaps() == []
        assert len(cluster.ledger.of(job_id)) == 1  # ran once, never twice
        assert (await cluster.job(job_id)).status is JobStatus.PROCESSING
    finally:
        await dying.close()  # a late flush finds nothing of its own to delete
        await transport.close()


async def test_the_relay_does_not_send_again_a_job_whose_start_the_manager_has_not_applied(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #16's overlap: a client publishes a job but cannot delete its outbox
    row (the database fails over); a server starts the job while the manager's
    events lag behind (its retries back off after the failover), so the job still
    reads ``pending`` when the relay claims the row once the client's lease ended.
    Sent again then, a second server ran a second copy until the manager applied
    the starts. The relay waits until every live server's heartbeats from after
    its claim are applied: the start is then known, and the row is dropped."""
    caplog.set_level(logging.INFO)
    stalled = StalledEvents()
    cluster.storage = stalled
    await cluster.start_manager(dataclasses.replace(FAST_MANAGER, server_timeout=10.0))
    await cluster.add_server("a", 1)
    await cluster.add_server("b", 1)
    transport = cluster.transport()
    await transport.connect()
    client = OrchestratorClient(stalled, transport, holder="cut-off", outbox_flush_interval=3600)
    try:
        await eventually(lambda: len(stalled._store.servers) == 2, what="servers known")
        stalled.flowing.clear()
        job_id = await client.create_job("started-unreported")
        await eventually(lambda: len(cluster.ledger.of(job_id)) == 1, what="started")
        # The client's lease (2 s) ends and the relay claims the row; the events
        # stay stalled long after that (the old relay re-sent at once).
        await asyncio.sleep(2.0 + 2.5)
        assert _outbox_rows(stalled) == 1
        stalled.flowing.set()
        await cluster.wait_status(job_id, JobStatus.PROCESSING)
        await eventually(lambda: _outbox_rows(stalled) == 0, timeout=10, what="row dropped")
        await asyncio.sleep(0.5)
        assert "re-sends job" not in caplog.text
        assert len(cluster.ledger.of(job_id)) == 1  # one message, one copy
        assert cluster.ledger.overlaps() == []
    finally:
        stalled.flowing.set()
        await client.close()
        await transport.close()


async def test_a_create_whose_client_died_before_publishing_is_sent_within_the_bound(
    cluster: Cluster,
) -> None:
    """A client that committed a job and died before its publish: the relay sends
    the message once the client's claim ended (2 s) and every live server's
    heartbeats sent :data:`RELAY_START_SLACK` after the relay's claim were applied
    -- the claim, plus the slack, one server heartbeat and two sweeps (a margin for
    a loaded machine on top)."""
    await cluster.start_manager()
    await cluster.add_server("a", 2)
    await cluster.add_server("b", 2)
    await eventually(lambda: len(cluster.storage._store.servers) == 2, what="servers known")
    now = utcnow()
    claim = 2.0
    began = time.monotonic()
    record = await cluster.storage.create_job(
        NewJob(id=new_id(), name="orphan", argument="", created_at=now),
        "dead-client",
        now + timedelta(seconds=claim),
    )
    await cluster.wait_running([record.id], timeout=15)
    took = time.monotonic() - began
    bound = (
        claim
        + RELAY_START_SLACK
        + FAST_SERVER.heartbeat_interval
        + 2 * FAST_MANAGER.sweep_interval
        + 2.0  # margin: a loaded machine
    )
    assert claim <= took <= bound, (took, bound)
    assert len(cluster.ledger.of(record.id)) == 1


def _outbox_rows(storage: MemoryStorage) -> int:
    """Outbox rows, claimed or not, without claiming them (the memory store's own data)."""
    return len(storage._store.outbox)


# -- create_jobs ------------------------------------------------------------------------


async def test_create_jobs_creates_sends_and_runs_every_job_once(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 300)
    items = [(f"batch-{i:03d}", str(i)) for i in range(250)]  # two publish chunks
    ids = await cluster.client.create_jobs(items, heartbeat_timeout=30)
    assert len(ids) == len(set(ids)) == 250
    records = {r.id: r for r in await _stored(cluster.storage)}
    assert [(records[i].name, records[i].argument) for i in ids] == items
    assert all(records[i].heartbeat_timeout == 30.0 for i in ids)
    await cluster.wait_running(ids, timeout=20)
    await cluster.client.flush()
    assert await _outbox(cluster.storage) == []
    assert cluster.ledger.overlaps() == []
    assert all(len(cluster.ledger.of(i)) == 1 for i in ids)


async def test_create_jobs_takes_plain_names_and_nothing(cluster: Cluster) -> None:
    await cluster.start_manager()
    assert await cluster.client.create_jobs([]) == []
    ids = await cluster.client.create_jobs(["plain-1", "plain-2"])
    stored = {r.id: r for r in await _stored(cluster.storage)}
    assert [stored[i].name for i in ids] == ["plain-1", "plain-2"]
    assert all(stored[i].argument == "" for i in ids)
    assert cluster.broker.depth("jobs") == 2


@pytest.mark.parametrize(
    ("items", "index", "message"),
    [
        ([("ok", ""), ("", "x")], 1, "empty"),
        ([("ok", ""), ("fine", ""), (" pad", "")], 2, "white space"),
        ([("ok", "x" * (64 * 1024 + 1))], 0, "bytes"),
        ([("ok", ""), ("a", "b", "c", "d")], 1, "pair"),
        ([("ok", ""), ("a", "b", "no kind")], 1, "kind"),
        ([("ok", ""), 42], 1, "pair"),
        ([("ok", 7)], 0, "string"),
    ],
)
async def test_create_jobs_checks_every_item_first_and_names_the_bad_one(
    cluster: Cluster, items: list[Any], index: int, message: str
) -> None:
    await cluster.start_manager()
    with pytest.raises(InvalidJobInput, match=rf"item {index}: .*{message}"):
        await cluster.client.create_jobs(items)
    assert await _stored(cluster.storage) == []
    assert cluster.broker.depth("jobs") == 0


async def test_create_jobs_refuses_a_string_instead_of_a_list(cluster: Cluster) -> None:
    await cluster.start_manager()
    with pytest.raises(InvalidJobInput, match="sequence"):
        await cluster.client.create_jobs("abc")  # a str is a Sequence[str], but not meant
    with pytest.raises(InvalidJobInput, match="heartbeat_timeout"):
        await cluster.client.create_jobs(["a"], heartbeat_timeout=0)
    assert await _stored(cluster.storage) == []


async def test_create_jobs_with_a_duplicate_writes_and_sends_nothing(cluster: Cluster) -> None:
    await cluster.start_manager()
    existing = await cluster.client.create_job("taken")
    with pytest.raises(DuplicateJobName) as inside:
        await cluster.client.create_jobs(["new-1", "twice", "new-2", "twice"])
    assert inside.value.name == "twice"
    with pytest.raises(DuplicateJobName) as outside:
        await cluster.client.create_jobs([("new-1", ""), ("taken", ""), ("new-2", "")])
    assert outside.value.name == "taken"
    assert [r.id for r in await _stored(cluster.storage)] == [existing]
    assert cluster.broker.depth("jobs") == 1


async def test_create_jobs_leaves_the_messages_it_could_not_send_to_the_relay(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    storage = cluster.storage
    flaky = FlakyPublish(cluster.url, refuse={"refused-1", "refused-2"})
    await flaky.connect()
    try:
        client = OrchestratorClient(storage, flaky, holder="flaky-client")
        names = ["sent-1", "refused-1", "sent-2", "refused-2"]
        ids = await client.create_jobs(names)  # no error: the relay sends the rest
        await client.flush()
        by_name = dict(zip(names, ids, strict=True))
        now = utcnow()
        # What is left is claimed by the client until its lease ends (2 s + 1 ms a job).
        assert await storage.claim_outbox("other", now, now, 10) == []
        left = await storage.claim_outbox("other", now + timedelta(seconds=3), now, 10)
        assert sorted(item.job_id for item in left) == sorted(
            [by_name["refused-1"], by_name["refused-2"]]
        )
    finally:
        await flaky.close()


async def test_create_jobs_needs_a_storage_with_an_atomic_batch() -> None:
    storage = LegacyStorage()
    client = OrchestratorClient(storage)
    with pytest.raises(NotImplementedError, match="create_jobs"):
        await client.create_jobs(["a", "b"])
    assert await _stored(storage) == []
    assert await client.create_job("still-works")  # one by one keeps working


async def test_the_batch_defaults_of_a_legacy_storage_work() -> None:
    storage = LegacyStorage()
    now = utcnow()
    for i in range(3):
        await storage.create_job(
            NewJob(
                id=f"00000000-0000-7000-8000-00000000000{i}",
                name=f"j{i}",
                argument="",
                created_at=now,
            ),
            "m",
            now + timedelta(seconds=30),
        )
    ids = [r.id for r in await _stored(storage)]
    assert await storage.complete_outbox_for_jobs([*ids, ids[0]], OutboxKind.PUBLISH, "m") == 3
    assert await storage.count_running_by_server() == {}


async def test_a_row_relayed_while_its_first_message_waits_is_sent_under_a_new_generation(
    cluster: Cluster,
) -> None:
    """The gap of docs/reliability.md ("same fencing token"): a client publishes a
    job but its outbox row outlives the client's lease (a failover, or load), and
    the relay sends the job again while the first message still waits in the
    queue. Two servers then each take one message. Sent under one generation both
    copies would carry the same fencing token; the relay raises the generation
    first, so the copy of the first message has the smaller token, is superseded,
    and exactly one copy (of the new generation) keeps running."""
    await cluster.start_manager()
    transport = cluster.transport()
    await transport.connect()
    slow = OrchestratorClient(
        cluster.storage, transport, holder="slow-client", outbox_flush_interval=3600
    )
    try:
        job_id = await slow.create_job("sent-twice")
        assert _outbox_rows(cluster.storage) == 1  # its completion never comes
        # After the client's lease (2 s) the relay claims the row and sends again,
        # while the first message still waits: no server runs yet.
        await eventually(lambda: _outbox_rows(cluster.storage) == 0, timeout=10, what="relayed")
        await cluster.add_server("a", 1)
        await cluster.add_server("b", 1)
        await eventually(lambda: len(cluster.ledger.of(job_id)) == 2, timeout=10, what="2 copies")
        await cluster.wait_running([job_id])
        job = await cluster.wait_status(job_id, JobStatus.PROCESSING)
        await asyncio.sleep(0.5)
        copies = cluster.ledger.of(job_id)
        assert len(copies) == 2
        fences = sorted(c.fence for c in copies)
        assert fences[0] != fences[1], f"two copies under one fencing token {fences}"
        assert [split_fence(f)[0] for f in fences] == [1, 2]
        (running,) = cluster.ledger.running(job_id)
        assert running.fence == fences[1] == job.fence  # the newer one runs, and owns it
        assert job.generation == 2
    finally:
        await slow.close()
        await transport.close()
