"""pytest plugin shipped with orchestratr-core (entry point ``pytest11``).

It registers the markers the conformance suites use, so that a backend author's
test run knows them without configuration.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Register OrchestratR's markers."""
    config.addinivalue_line("markers", "conformance: a test of the OrchestratR backend contract")
    config.addinivalue_line("markers", "slow: minutes-long fault test")
