"""Schemathesis against the app's own OpenAPI document: no input makes it fail
with a server error, and every answer matches the document."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from orchestratr_core import ServerManager
from orchestratr_core.web import create_app, start_server
from orchestratr_memory import MemoryStorage
from orchestratr_memory.transport import MemoryTransport
from tests.support.cluster import Cluster, Ledger
from tests.support.web import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    """The app on a real socket, with a manager and a server, in a thread of its own."""
    loop = asyncio.new_event_loop()
    ready: dict[str, object] = {}
    started = threading.Event()
    stop: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        cluster = Cluster(f"fuzz-{uuid.uuid4().hex[:12]}", Ledger())
        await cluster.start_manager()
        await cluster.add_server("fuzz", 5)
        await cluster.create(3, prefix="seed")
        web = await start_server(cluster.manager, "127.0.0.1", 0, token=TOKEN)
        ready["url"] = web.url
        started.set()
        try:
            await stop.wait()
        finally:
            await web.stop()
            await cluster.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(20), "the app did not start"
    try:
        yield str(ready["url"])
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(20)
        loop.close()


def _document() -> dict:
    """The OpenAPI document, as the app builds it (no I/O needed for that)."""
    manager = ServerManager(storage=MemoryStorage(), transport=MemoryTransport("memory://doc"))
    return create_app(manager, TOKEN, host="127.0.0.1").openapi()


schema = schemathesis.openapi.from_dict(_document())


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_input_causes_a_server_error(api_url: str, case: schemathesis.Case) -> None:
    # Always authenticated: the auth rules have their own tests (test_api.py).
    case.headers = {**(case.headers or {}), **AUTH}
    case.call_and_validate(
        base_url=api_url,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
