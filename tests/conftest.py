"""Shared test configuration: the helpers and fixtures of ``tests/support``."""

from __future__ import annotations

import logging

# Registered here, once, so that every directory sees the same fixtures and asserts
# in the helpers are rewritten.
pytest_plugins = [
    "tests.support.cli",
    "tests.support.cluster",
    "tests.support.pgha",
    "tests.support.rabbitmq",
    "tests.support.sql",
    "tests.support.web",
]

logging.getLogger("orchestratr").setLevel(logging.INFO)
