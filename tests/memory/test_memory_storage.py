"""The in-memory storage: the conformance suite, named stores, the plugin, scale."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from orchestratr_core.errors import BackendUnavailable, ConfigurationError
from orchestratr_core.job import JobEvent, JobQuery, JobStatus, NewJob, new_id, utcnow
from orchestratr_core.plugin import BackendSpec, PluginManager
from orchestratr_core.storage import Storage
from orchestratr_core.testing import StorageConformance
from orchestratr_core.testing.storage_suite import LeaseTests
from orchestratr_memory import MemoryStorage
from orchestratr_memory import plugin as memory_plugin


@pytest.fixture
async def storage() -> AsyncIterator[Storage]:
    """An opened memory storage (the suites' fixture; TestStorageDefaults has its own)."""
    store = MemoryStorage()
    await store.open()
    yield store
    await store.close()


class TestMemoryStorage(StorageConformance):
    """The reference storage passes the whole conformance suite."""


class _WithTheDefaults(MemoryStorage):
    """The ABC's defaults of the optional methods that have one. ``create_jobs``
    has none (its default refuses: tests/core/test_client_batch.py), so this class
    keeps the memory backend's and no conformance test is skipped."""

    complete_outbox_for_jobs = Storage.complete_outbox_for_jobs
    count_running_by_server = Storage.count_running_by_server


class TestStorageDefaults(StorageConformance):
    """The defaults of the optional methods conform too."""

    @pytest.fixture
    async def storage(self) -> AsyncIterator[Storage]:
        store = _WithTheDefaults()
        await store.open()
        yield store
        await store.close()


class TestOneSectionAlone(LeaseTests):
    """One section of the suite runs alone, as docs/plugins.md offers a backend in progress."""

    def test_it_is_a_section_of_the_whole_suite(self) -> None:
        assert issubclass(StorageConformance, LeaseTests)
        assert set(_tests(LeaseTests)) < set(_tests(StorageConformance))


def _tests(cls: type) -> list[str]:
    return [name for name in dir(cls) if name.startswith("test_")]


def _job(name: str) -> NewJob:
    return NewJob(id=new_id(), name=name, argument="", created_at=utcnow())


async def test_storages_with_one_name_share_one_store() -> None:
    name = f"shared-{new_id()}"
    manager, cli = MemoryStorage(f"memory://{name}"), MemoryStorage(f"memory://{name}")
    try:
        job = await manager.create_job(_job("feed"), "m", utcnow())
        assert await cli.get_job(job.id) == job
        assert await MemoryStorage().get_job(job.id) is None
        assert await MemoryStorage(f"memory://{name}-other").get_job(job.id) is None
    finally:
        MemoryStorage.forget(name)
        MemoryStorage.forget(f"{name}-other")


async def test_storages_without_a_name_are_private() -> None:
    first, second = MemoryStorage(), MemoryStorage("memory://")
    job = await first.create_job(_job("feed"), "m", utcnow())
    assert await second.get_job(job.id) is None
    assert second.name is None


async def test_a_closed_storage_refuses_work_until_reopened() -> None:
    storage = MemoryStorage()
    await storage.close()
    with pytest.raises(BackendUnavailable):
        await storage.get_job(new_id())
    await storage.open()
    assert await storage.get_job(new_id()) is None


def test_a_url_of_another_scheme_is_rejected() -> None:
    with pytest.raises(ConfigurationError):
        MemoryStorage("sqlite:///x.db")


@pytest.mark.parametrize("name_or_url", ["memory", "memory://", "memory://plugin-test"])
def test_the_plugin_is_found_by_name_and_by_url(name_or_url: str) -> None:
    manager = PluginManager()
    storage = manager.make_storage(name_or_url)
    assert isinstance(storage, MemoryStorage)
    assert "memory" in manager.loaded
    MemoryStorage.forget("plugin-test")


def test_the_plugin_builds_nothing_for_other_plugins() -> None:
    spec = BackendSpec(plugin="postgresql", url="postgresql://db/x")
    assert memory_plugin.orchestratr_make_storage(spec=spec) is None
    assert memory_plugin.orchestratr_make_transport(spec=spec) is None


def test_the_storage_rejects_unknown_options() -> None:
    with pytest.raises(ConfigurationError, match="bogus"):
        memory_plugin.orchestratr_make_storage(
            spec=BackendSpec(plugin="memory", options={"bogus": 1})
        )


async def test_keyset_paging_works_deep_into_200k_jobs() -> None:
    storage = MemoryStorage()
    now = utcnow()
    lease = now + timedelta(seconds=30)
    ids = [new_id() for _ in range(200_000)]
    for index, job_id in enumerate(ids):
        job = NewJob(id=job_id, name=f"job-{index}", argument="", created_at=now)
        await storage.create_job(job, "m", lease)
    ids.sort()
    middle = ids[150_000]
    page = await storage.list_jobs(JobQuery(after=middle, limit=500), with_total=True)
    assert [job.id for job in page.items] == ids[150_001:150_501]
    assert page.next_cursor == ids[150_500]
    assert page.total == 200_000
    last = await storage.list_jobs(JobQuery(after=ids[-3], limit=500))
    assert [job.id for job in last.items] == ids[-2:]
    assert last.next_cursor is None
    await storage.transition(ids[199_000], JobEvent.START, server_id="s1", fence=1, now=utcnow())
    running = await storage.list_jobs(JobQuery(statuses=frozenset({JobStatus.PROCESSING})))
    assert [job.id for job in running.items] == [ids[199_000]]
