"""The ``chaos`` fixture shared by the chaos test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosCluster, Timings


@pytest.fixture
async def chaos(tmp_path: Path) -> AsyncIterator[ChaosCluster]:
    """A started cluster with the default timings, closed (and cleaned up) after the test."""
    cluster = ChaosCluster(tmp_path, Timings())
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.close()
