"""Helpers of the PostgreSQL transport tests."""

from __future__ import annotations

from typing import Any

import asyncpg

from tests.support.sql import PG_DATABASE, PG_SERVER


async def admin(sql: str, *args: Any) -> Any:
    """Run ``sql`` on a connection of its own (as an operator would), return its rows."""
    conn = await asyncpg.connect(f"{PG_SERVER}/{PG_DATABASE}")
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()
