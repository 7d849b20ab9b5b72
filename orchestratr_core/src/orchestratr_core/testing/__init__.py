"""Conformance suites for backend authors (shipped with the core).

Subclass a suite in your own tests and provide its fixture::

    from orchestratr_core.testing import StorageConformance

    class TestMyStorage(StorageConformance):
        @pytest.fixture
        async def storage(self):
            s = MyStorage(...)
            await s.open()
            yield s
            await s.close()

See ``docs/plugins.md``.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite(
    "orchestratr_core.testing.storage_suite", "orchestratr_core.testing.transport_suite"
)

from orchestratr_core.testing.storage_suite import StorageConformance  # noqa: E402
from orchestratr_core.testing.transport_suite import TransportConformance  # noqa: E402

__all__ = ["StorageConformance", "TransportConformance"]
