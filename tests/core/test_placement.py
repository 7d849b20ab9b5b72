"""Constraint parsing: equality, inequality and the ``in`` form ``KEY=V1|V2``
(``not in``: ``KEY!=V1|V2``), their canonical text, the pool keys and queue names
they make, and the contradictions refused."""

from __future__ import annotations

import re

import pytest

from orchestratr_core.errors import InvalidJobInput
from orchestratr_core.placement import (
    MAX_VALUES,
    Pool,
    ServerPlacement,
    parse_constraint,
    parse_constraints,
    pending_reason,
)


def test_in_is_written_with_bars_and_made_canonical() -> None:
    c = parse_constraint("region=us|eu|us")
    assert (c.key, c.value, c.negated, c.values) == ("region", "eu|us", False, {"eu", "us"})
    assert str(c) == "region=eu|us"
    assert parse_constraints(["region=us|eu", "nic!=1g"]) == ("nic!=1g", "region=eu|us")
    assert parse_constraints(["region=eu|us"]) == parse_constraints(["region=us|eu"])
    assert parse_constraints(["region=eu|eu"]) == ("region=eu",)  # one value: plain equality


@pytest.mark.parametrize(
    ("text", "labels", "ok"),
    [
        ("region=eu|us", {"region": "eu"}, True),
        ("region=eu|us", {"region": "us"}, True),
        ("region=eu|us", {"region": "ap"}, False),
        ("region=eu|us", {}, False),
        ("region!=eu|us", {"region": "ap"}, True),
        ("region!=eu|us", {}, True),
        ("region!=eu|us", {"region": "us"}, False),
        ("region=eu", {"region": "eu"}, True),
        ("region!=eu", {"region": "eu"}, False),
    ],
)
def test_a_server_satisfies_in_and_not_in_by_its_label(
    text: str, labels: dict[str, str], ok: bool
) -> None:
    assert parse_constraint(text).satisfied_by(labels) is ok
    assert Pool.of("feed", [text]).accepts({"feed"}, labels) is ok


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (["region=eu|"], "constraint value ''"),
        (["region=|eu"], "constraint value ''"),
        (["region=eu|u s"], "constraint value 'u s'"),
        (["region=eu,us"], "constraint value 'eu,us'"),
        (["region in eu,us"], "must be KEY=VALUE or KEY!=VALUE"),
        (["region=" + "|".join(f"v{n}" for n in range(MAX_VALUES + 1))], "more than"),
        (["region=eu|us", "region=ap|jp"], "never both hold"),
        (["region=eu|us", "region!=eu|us"], "never both hold"),
        (["region=eu|us", "region!=eu", "region!=us"], "never all hold"),
    ],
)
def test_bad_or_contradictory_in_constraints_are_refused(items: list[str], needle: str) -> None:
    with pytest.raises(InvalidJobInput, match=re.escape(needle)):
        parse_constraints(items)


def test_constraints_that_leave_some_value_are_kept() -> None:
    assert parse_constraints(["region=eu|us", "region=us|ap"]) == (
        "region=ap|us",
        "region=eu|us",
    )
    assert parse_constraints(["region=eu|us", "region!=eu"]) == ("region!=eu", "region=eu|us")


def test_the_pool_key_round_trips_and_the_queue_name_carries_only_a_digest() -> None:
    pool = Pool.of("feed", ["region=us|eu", "nic!=1g|10g"])
    assert pool.key == "feed[nic!=10g|1g,region=eu|us]"
    assert Pool.from_key(pool.key) == pool
    suffix = pool.queue_suffix()
    assert re.fullmatch(r"feed\.c-[0-9a-f]{20}", suffix)
    assert suffix != Pool.of("feed", ["region=eu"]).queue_suffix()


def test_the_pending_reason_names_the_values() -> None:
    pool = Pool.of("feed", ["region=eu|us"])
    ap = ServerPlacement(frozenset({"feed"}), {"region": "ap"})
    reason = "waiting: no live server runs kind 'feed' with region=eu|us"
    assert pending_reason(pool, [ap]) == reason
    us = ServerPlacement(frozenset({"feed"}), {"region": "us"})
    assert pending_reason(pool, [ap, us]) is None
