"""The server half of an update in place on the PostgreSQL transport: an
``@updatable`` copy takes the new argument without a restart, and after its owner
dies the old message (the old argument) is dropped under a drop mark, never
started."""

from __future__ import annotations

from collections.abc import Callable

from orchestratr_sql.pgtransport import PostgresTransport
from tests.support.inplace import run_drop_mark_scenario


async def test_the_old_message_is_dropped_after_an_update_in_place_and_the_owners_death(
    make_pg_transport: Callable[..., PostgresTransport],
) -> None:
    await run_drop_mark_scenario(make_pg_transport, timeout=10.0)
