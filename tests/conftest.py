"""Shared test configuration."""

from __future__ import annotations

import logging

logging.getLogger("orchestratr").setLevel(logging.INFO)
