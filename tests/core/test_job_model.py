"""The job domain model: ids, fences, validation, the state machine table."""

from __future__ import annotations

import uuid

import pytest

from orchestratr_core.errors import InvalidJobInput
from orchestratr_core.job import (
    TRANSITIONS,
    JobStatus,
    make_fence,
    new_id,
    split_fence,
    validate_argument,
    validate_name,
)


def test_ids_sort_in_creation_order_even_within_one_millisecond() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids[:10])


def test_fences_grow_with_generation_then_delivery_count() -> None:
    fences = [make_fence(g, d) for g in (1, 2, 3) for d in (0, 1, 5, 2**31)]
    assert fences == sorted(fences)
    assert split_fence(make_fence(3, 7)) == (3, 7)
    with pytest.raises(ValueError):
        make_fence(-1, 0)


def test_no_transition_leaves_a_final_status() -> None:
    for transition in TRANSITIONS.values():
        assert not any(status.final for status in transition.sources)


@pytest.mark.parametrize("name", ["a", "feed/tenant-42", "é" * 200, "with space inside"])
def test_good_names_pass(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("bad", [None, 3, b"bytes", "\u200b", "line\u2028break"])
def test_non_string_and_invisible_names_are_refused(bad: object) -> None:
    with pytest.raises(InvalidJobInput):
        validate_name(bad)


def test_arguments_must_be_strings_of_valid_unicode() -> None:
    assert validate_argument('{"x": 1}') == '{"x": 1}'
    with pytest.raises(InvalidJobInput, match="string"):
        validate_argument(42)
    with pytest.raises(InvalidJobInput, match="surrogate"):
        validate_argument("\ud800")


def test_final_statuses() -> None:
    assert {s for s in JobStatus if s.final} == {JobStatus.DELETED, JobStatus.COMPLETED}
