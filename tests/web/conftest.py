"""Fixtures for the web tests: a cluster on the memory backends and the app on it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from orchestratr_core.web import create_app
from tests.support.cluster import Cluster, Ledger
from tests.support.web import TOKEN, client_for


@pytest.fixture
async def cluster(ledger: Ledger) -> AsyncIterator[Cluster]:
    c = Cluster(f"web-{uuid.uuid4().hex[:12]}", ledger)
    await c.start_manager()
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCHESTRATR_API_TOKEN", raising=False)


@pytest.fixture
async def local_api(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    """The API bound to loopback without a token: open to this host."""
    app = create_app(cluster.manager, None, host="127.0.0.1")
    async with client_for(app) as client:
        yield client


@pytest.fixture
async def token_api(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    """The API with a token configured, called with that token."""
    app = create_app(cluster.manager, TOKEN, host="127.0.0.1")
    async with client_for(app, TOKEN) as client:
        yield client
