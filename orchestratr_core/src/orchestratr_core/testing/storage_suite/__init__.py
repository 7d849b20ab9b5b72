"""The storage conformance suite: every clause of :class:`~orchestratr_core.storage.Storage`.

A backend author subclasses :class:`StorageConformance` in a test module and
provides an async fixture named ``storage`` that yields an *opened, empty*
storage (a fresh database or schema per test) and closes it afterwards. The
fixture must tolerate the test having closed the storage already (``close`` is
idempotent)::

    import pytest
    from orchestratr_core.testing import StorageConformance

    class TestMyStorage(StorageConformance):
        @pytest.fixture
        async def storage(self):
            s = MyStorage(url)
            await s.open()
            yield s
            await s.close()

The tests run with pytest-asyncio (``asyncio_mode = "auto"``, or decorate the
fixture with ``pytest_asyncio.fixture`` in strict mode). Times are compared with
a tolerance of one millisecond, so backends may round to milliseconds. Nothing
here sleeps: every time is passed to the storage explicitly.
"""

from __future__ import annotations

import pytest

from orchestratr_core.testing.storage_suite.argument_update import ArgumentUpdateTests
from orchestratr_core.testing.storage_suite.coordination import (
    CancelledJobIdsTests,
    GenerationRaiseTests,
    LeaseTests,
    OutboxTests,
)
from orchestratr_core.testing.storage_suite.creation import (
    CreateJobsTests,
    CreateJobTests,
    RequestCancelTests,
)
from orchestratr_core.testing.storage_suite.hygiene import HostileInputTests, LifecycleTests
from orchestratr_core.testing.storage_suite.job_lifecycle import JobLifecycleTests
from orchestratr_core.testing.storage_suite.placement import PlacementTests
from orchestratr_core.testing.storage_suite.reads import GetJobTests, ListJobsTests
from orchestratr_core.testing.storage_suite.servers import (
    HeartbeatTests,
    ServerExpiryTests,
    ServerQueryTests,
)
from orchestratr_core.testing.storage_suite.transitions import TransitionTests
from orchestratr_core.testing.storage_suite.update_in_place import UpdateInPlaceTests

__all__ = [
    "ArgumentUpdateTests",
    "CancelledJobIdsTests",
    "CreateJobTests",
    "CreateJobsTests",
    "GenerationRaiseTests",
    "GetJobTests",
    "HeartbeatTests",
    "HostileInputTests",
    "JobLifecycleTests",
    "LeaseTests",
    "LifecycleTests",
    "ListJobsTests",
    "OutboxTests",
    "PlacementTests",
    "RequestCancelTests",
    "ServerExpiryTests",
    "ServerQueryTests",
    "StorageConformance",
    "TransitionTests",
    "UpdateInPlaceTests",
]


# pytest collects the last base first: the sections run in the order listed in the files
class StorageConformance(
    UpdateInPlaceTests,
    ArgumentUpdateTests,
    JobLifecycleTests,
    PlacementTests,
    HostileInputTests,
    LifecycleTests,
    ListJobsTests,
    GetJobTests,
    CancelledJobIdsTests,
    LeaseTests,
    GenerationRaiseTests,
    OutboxTests,
    ServerQueryTests,
    ServerExpiryTests,
    HeartbeatTests,
    TransitionTests,
    RequestCancelTests,
    CreateJobsTests,
    CreateJobTests,
):
    """Conformance tests of the :class:`~orchestratr_core.storage.Storage` contract.

    Subclass as ``Test...`` and provide an async ``storage`` fixture yielding an
    opened, empty storage. See the module docstring.
    """

    pytestmark = [pytest.mark.conformance]
