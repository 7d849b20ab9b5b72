"""``OrchestratorClient`` given a plugin name or URL, as ``ServerManager`` accepts:
it makes, opens and closes its own storage and transport."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from orchestratr_core import JobStatus
from orchestratr_core.cli import sqlite_url
from orchestratr_core.client import OrchestratorClient
from orchestratr_core.errors import OrchestratrError, PluginNotFound
from orchestratr_core.job import utcnow
from orchestratr_core.plugin.manager import make_storage
from orchestratr_memory import MemoryStorage
from orchestratr_memory.broker import MemoryBroker


@pytest.fixture
def broker() -> Iterator[str]:
    name = f"client-url-{uuid.uuid4().hex[:8]}"
    yield name
    MemoryBroker.reset(name)


async def test_a_client_given_urls_opens_on_use_and_closes_what_it_made(broker: str) -> None:
    store = f"memory://client-url-{uuid.uuid4().hex[:8]}"
    client = OrchestratorClient(store, f"memory://{broker}")
    assert MemoryBroker.get(broker).connections == 0  # nothing opened before use
    async with client:
        job_id = await client.create_job("by-url", "7")
        assert MemoryBroker.get(broker).connections == 1
        assert MemoryBroker.get(broker).depth("jobs") == 1  # sent at once
    assert MemoryBroker.get(broker).connections == 0

    # It opened them, it closed them: the client is done, and says so.
    with pytest.raises(OrchestratrError, match="was closed"):
        await client.mark_on_deleting(job_id)
    await client.close()  # idempotent
    assert MemoryBroker.get(broker).connections == 0
    other = MemoryStorage(store)
    await other.open()
    job = await other.get_job(job_id)
    assert job is not None and job.status is JobStatus.PENDING


async def test_a_web_application_client_on_a_sql_url_leaves_sending_to_the_manager(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path / "app.sqlite3")
    async with OrchestratorClient(url) as client:
        job_id = await client.create_job("from-a-web-app")
    storage = make_storage(url)
    await storage.open()
    try:
        job = await storage.get_job(job_id)
        assert job is not None and job.status is JobStatus.PENDING
        now = utcnow() + timedelta(seconds=1)
        outbox = await storage.claim_outbox("manager-1", now, now + timedelta(seconds=5), 10)
        assert [item.job_id for item in outbox] == [job_id]  # the manager sends it
    finally:
        await storage.close()


async def test_objects_given_to_the_client_stay_open() -> None:
    storage = MemoryStorage()
    await storage.open()
    async with OrchestratorClient(storage) as client:
        job_id = await client.create_job("borrowed")
    assert (await storage.get_job(job_id)) is not None  # still open: it is the caller's


def test_anything_else_is_refused_at_once_with_a_clear_error() -> None:
    with pytest.raises(
        TypeError, match="storage must be a Storage, a plugin name or a URL, not int"
    ):
        OrchestratorClient(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="transport must be a Transport"):
        OrchestratorClient("memory", object())  # type: ignore[arg-type]
    with pytest.raises(PluginNotFound, match="did you mean 'memory'"):
        OrchestratorClient("memroy")
