"""The codec's heartbeat path: jobs as arrays, the older object form still read,
the start reports a heartbeat replaces (``started``), and malformed items refused
with a clear reason."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestratr_core import protocol as p
from orchestratr_core.errors import MalformedMessage

HEARTBEAT = p.ServerHeartbeat(
    server_id="s1",
    name="server one",
    max_workers=8,
    started_at=100.0,
    sent_at=102.5,
    host="h",
    pid=42,
    draining=False,
    jobs=(
        p.RunningJob(job_id="a", fence=(2 << 32) | 1, last_heartbeat=101.25, restarts=0),
        p.RunningJob(job_id="b", fence=1 << 32, last_heartbeat=None, restarts=3),
    ),
)


def _body(jobs: Any, **fields: Any) -> bytes:
    body = {
        "v": 1,
        "type": "heartbeat",
        "server_id": "s1",
        "name": "server one",
        "max_workers": 8,
        "started_at": 100.0,
        "sent_at": 102.5,
        "host": "h",
        "pid": 42,
        "draining": False,
        "jobs": jobs,
        **fields,
    }
    return json.dumps(body).encode()


def test_a_heartbeat_writes_its_jobs_as_arrays_and_reads_them_back() -> None:
    data = p.encode(HEARTBEAT)
    body = json.loads(data)
    assert body["jobs"] == [["a", (2 << 32) | 1, 101.25, 0], ["b", 1 << 32, None, 3]]
    assert body["v"] == 1 and body["type"] == "heartbeat"
    assert p.decode_as(data, p.ServerHeartbeat) == HEARTBEAT


def test_a_heartbeat_of_an_older_server_with_job_objects_is_still_read() -> None:
    old = _body(
        [
            {"job_id": "a", "fence": (2 << 32) | 1, "last_heartbeat": 101.25, "restarts": 0},
            {"job_id": "b", "fence": 1 << 32, "restarts": 3},  # defaults may be left out
        ]
    )
    assert p.decode(old) == HEARTBEAT


def test_both_forms_may_be_mixed_and_an_empty_heartbeat_is_fine() -> None:
    mixed = _body(
        [["a", (2 << 32) | 1, 101.25, 0], {"job_id": "b", "fence": 1 << 32, "restarts": 3}]
    )
    assert p.decode(mixed) == HEARTBEAT
    empty = p.decode_as(p.encode(p.ServerHeartbeat("s", "n", 1, 1.0, 2.0)), p.ServerHeartbeat)
    assert empty.jobs == ()
    assert p.decode_as(_body([]), p.ServerHeartbeat).jobs == ()


def test_array_values_are_typed_like_the_object_fields() -> None:
    [job] = p.decode_as(_body([["a", 7, 5, 1]]), p.ServerHeartbeat).jobs
    assert job == p.RunningJob("a", 7, 5.0, 1)
    assert type(job.last_heartbeat) is float  # an integral time is still a float
    # The fifth is the job's new checkpoint; values after it are ignored, as unknown
    # fields of an object are.
    [job] = p.decode_as(_body([["a", 7, None, 1, "later", {"x": 1}]]), p.ServerHeartbeat).jobs
    assert job == p.RunningJob("a", 7, None, 1, "later")


@pytest.mark.parametrize(
    ("jobs", "reason"),
    [
        ({"a": 1}, "field 'jobs' must be a list"),
        ("a,b", "field 'jobs' must be a list"),
        ([["a", 1, None]], "item 0 of 'jobs' has 3 value(s), expected 4"),
        ([["a", 1, None, 0], []], "item 1 of 'jobs' has 0 value(s), expected 4"),
        ([[1, 1, None, 0]], "item 0 of 'jobs': job_id must be str"),
        ([[None, 1, None, 0]], "item 0 of 'jobs': job_id must be str"),
        ([["a", "1", None, 0]], "item 0 of 'jobs': fence must be int"),
        ([["a", 1.0, None, 0]], "item 0 of 'jobs': fence must be int"),
        ([["a", 1, "noon", 0]], "item 0 of 'jobs': last_heartbeat must be float or null"),
        ([["a", 1, None, None]], "item 0 of 'jobs': restarts must be int"),
        ([["a", 1, None, 0.5]], "item 0 of 'jobs': restarts must be int"),
        # bool is a subclass of int in Python; in the protocol it is no number
        ([["a", True, None, 0]], "item 0 of 'jobs': fence must be int"),
        ([["a", 1, None, False]], "item 0 of 'jobs': restarts must be int"),
        ([["a", 1, True, 0]], "item 0 of 'jobs': last_heartbeat must be float or null"),
        (["a"], "items of 'jobs' must be arrays [job_id, fence, last_heartbeat, restarts]"),
        ([7], "items of 'jobs' must be arrays"),
        ([None], "items of 'jobs' must be arrays"),
        # the object form keeps its own checks
        ([{"job_id": "a"}], "missing field 'fence'"),
        ([{"job_id": "a", "fence": True}], "field 'fence' must be int"),
        (
            [{"job_id": "a", "fence": 1, "last_heartbeat": "x"}],
            "field 'last_heartbeat' must be float",
        ),
    ],
)
def test_malformed_jobs_make_the_heartbeat_malformed_with_a_clear_reason(
    jobs: Any, reason: str
) -> None:
    with pytest.raises(MalformedMessage) as caught:
        p.decode(_body(jobs))
    message = str(caught.value)
    assert message.startswith("bad 'heartbeat' message: ")
    assert reason in message


def test_the_other_fields_of_a_heartbeat_are_still_checked() -> None:
    with pytest.raises(MalformedMessage, match="field 'max_workers' must be int"):
        p.decode(_body([], max_workers=True))
    with pytest.raises(MalformedMessage, match="missing field 'server_id'"):
        body = json.loads(_body([]))
        del body["server_id"]
        p.decode(json.dumps(body))


def test_a_large_heartbeat_round_trips() -> None:
    jobs = tuple(
        p.RunningJob(f"job-{i}", (1 << 32) | i, None if i % 3 else 1000.0 + i, i % 5)
        for i in range(10_000)
    )
    heartbeat = p.ServerHeartbeat("s", "n", 10_000, 1.0, 2.0, jobs=jobs)
    assert p.decode_as(p.encode(heartbeat), p.ServerHeartbeat) == heartbeat


# -- the start reports a heartbeat replaces ----------------------------------------------------


def test_a_heartbeat_writes_the_starts_it_replaces_as_strings_and_reads_them_back() -> None:
    burst = dataclasses.replace(HEARTBEAT, started=("a", "b"))
    data = p.encode(burst)
    assert json.loads(data)["started"] == ["a", "b"]
    decoded = p.decode_as(data, p.ServerHeartbeat)
    assert decoded == burst
    assert decoded.started == ("a", "b")
    assert type(decoded.started) is tuple


def test_a_delta_heartbeat_may_name_more_than_64_jobs_gone() -> None:
    """A server that stopped hundreds of jobs since its acknowledged heartbeat (the
    manager stopping duplicate copies after a burst) lists them all in ``gone``;
    the 64-item bound of kinds and labels made such a heartbeat malformed, and it
    was dead-lettered (seen in the failover benchmark, 2026-12-06)."""
    gone = tuple(f"job-{i}" for i in range(1000))
    delta = dataclasses.replace(HEARTBEAT, seq=5, base=4, gone=gone)
    assert p.decode_as(p.encode(delta), p.ServerHeartbeat).gone == gone
    with pytest.raises(MalformedMessage, match="gone"):
        p.decode(p.encode(dataclasses.replace(delta, gone=("x" * 200,))))


def test_a_periodic_heartbeat_leaves_started_out_and_one_without_it_reads_as_empty() -> None:
    assert HEARTBEAT.started == ()
    data = p.encode(HEARTBEAT)
    assert "started" not in json.loads(data)  # written as before the field existed
    assert p.decode_as(data, p.ServerHeartbeat).started == ()
    assert p.decode_as(_body([["a", 1, None, 0]]), p.ServerHeartbeat).started == ()
    assert p.decode_as(_body([], started=[]), p.ServerHeartbeat).started == ()


def test_a_reader_ignores_fields_it_does_not_know_as_an_older_manager_ignores_started() -> None:
    newer = _body([["a", 1, None, 0]], started=["a"], later={"x": [1, 2]})
    decoded = p.decode_as(newer, p.ServerHeartbeat)
    assert decoded.started == ("a",)
    assert decoded.jobs == (p.RunningJob("a", 1, None, 0),)


@pytest.mark.parametrize(
    ("started", "reason"),
    [
        ("a", "field 'started' must be a list of str"),
        ({"a": 1}, "field 'started' must be a list of str"),
        (7, "field 'started' must be a list of str"),
        (["a", 1], "item 1 of 'started' must be str"),
        ([None], "item 0 of 'started' must be str"),
        ([["a"]], "item 0 of 'started' must be str"),
        (["a", "b", True], "item 2 of 'started' must be str"),
        (None, "field 'started' must not be null"),
    ],
)
def test_a_malformed_started_makes_the_heartbeat_malformed_with_a_clear_reason(
    started: Any, reason: str
) -> None:
    with pytest.raises(MalformedMessage) as caught:
        p.decode(_body([], started=started))
    message = str(caught.value)
    assert message.startswith("bad 'heartbeat' message: ")
    assert reason in message


# -- hostile input (issue 11): anything unreadable is MalformedMessage, every value bounded --

_GOOD: dict[str, dict[str, Any]] = {
    "job": {"job_id": "j", "name": "n", "argument": "", "generation": 1, "created_at": 1.0},
    "started": {"server_id": "s", "job_id": "j", "fence": 1, "at": 1.0},
    "failed": {
        "server_id": "s",
        "job_id": "j",
        "fence": 1,
        "error": "e",
        "restarts": 1,
        "retry_in": 1.0,
        "at": 1.0,
    },
    "stop": {"job_id": "j", "reason": "cancelled", "drop": True, "max_fence": 1},
    "release": {"count": 1, "hold": 0, "hold_for": 1.0},
    "heartbeat": json.loads(_body([])) | {"jobs": [["j", 1, 1.0, 0]], "started": ["j"]},
}


def _message(kind: str, **changes: Any) -> bytes:
    body = {**_GOOD[kind], **changes, "v": 1, "type": kind}
    return json.dumps(body).encode()


def test_the_base_messages_of_these_cases_are_valid() -> None:
    for kind in _GOOD:
        assert kind == p.decode(_message(kind)).TYPE


def test_deeply_nested_json_is_malformed_not_a_recursion_error() -> None:
    nested = b'{"v":1,"type":"started","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(MalformedMessage, match="nested too deeply"):
        p.decode(nested)
    with pytest.raises(MalformedMessage):
        p.decode(b"[" * 100_000)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_json_nan_and_infinity_are_refused(constant: str) -> None:
    """``hold_for: Infinity`` made every server hold all jobs forever (issue 11)."""
    body = b'{"v":1,"type":"release","count":1000,"hold":0,"hold_for":%s}' % constant.encode()
    with pytest.raises(MalformedMessage):
        p.decode(body)


_OUT_OF_RANGE = [
    ("started", {"fence": 2**63}),  # a fence of 2^63: OverflowError on SQLite
    ("started", {"fence": -1}),
    ("stop", {"max_fence": 2**63}),
    ("job", {"generation": 2**31}),  # its fence would be 2^63: DataError on PostgreSQL
    ("job", {"generation": -1}),
    ("heartbeat", {"max_workers": 3_000_000_000}),  # --max-workers 3000000000
    ("heartbeat", {"max_workers": 0}),
    ("heartbeat", {"pid": 2**31}),
    ("heartbeat", {"jobs": [["j", 2**63, 1.0, 0]]}),
    ("heartbeat", {"jobs": [["j", 1, 1.0, 2**31]]}),
    ("heartbeat", {"jobs": [["j", 1, 1e300, 0]]}),
    ("heartbeat", {"jobs": [{"job_id": "j", "fence": 2**63}]}),
    ("heartbeat", {"sent_at": 1e20}),  # beyond year 9999: no datetime holds it
    ("heartbeat", {"started_at": -1.0}),
    ("failed", {"restarts": 2**31}),
    ("failed", {"retry_in": 2.0**31}),
    ("release", {"count": 2**31}),
    ("release", {"hold": -1}),
    ("release", {"hold_for": 1e300}),
    ("job", {"heartbeat_timeout": -1.0}),
]


@pytest.mark.parametrize(("kind", "changes"), _OUT_OF_RANGE)
def test_every_number_is_bounded(kind: str, changes: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage):
        p.decode(_message(kind, **changes))


def test_the_largest_values_in_range_are_accepted() -> None:
    top = (2**63) - 1
    assert p.decode_as(_message("started", fence=top), p.JobStarted).fence == top
    job = p.decode_as(_message("job", generation=2**31 - 1), p.JobMessage)
    assert job.generation == 2**31 - 1
    hb = p.decode_as(
        _message("heartbeat", max_workers=2**31 - 1, jobs=[["j", top, 253402300799.0, 2**31 - 1]]),
        p.ServerHeartbeat,
    )
    assert (hb.max_workers, hb.jobs[0].fence, hb.jobs[0].restarts) == (2**31 - 1, top, 2**31 - 1)


_BAD_TEXT = [
    ("started", {"job_id": "j" * 37}),
    ("started", {"job_id": "a\x00b"}),
    ("started", {"server_id": "s" * 256}),
    ("started", {"server_id": "s\nt"}),
    ("started", {"server_id": "\ud800"}),  # a lone surrogate: no database stores it
    ("job", {"name": "n" * 201}),
    ("job", {"name": "bad\x00name"}),
    ("job", {"argument": "bad \x00 byte"}),
    ("job", {"argument": "\U0001f600" * (16 * 1024 + 1)}),  # 64 KiB + 4 bytes of UTF-8
    ("failed", {"error": "e" * 2001}),
    ("heartbeat", {"name": "n" * 256}),
    ("heartbeat", {"host": "h\x00"}),
    ("heartbeat", {"jobs": [["j\x00", 1, 1.0, 0]]}),
    ("heartbeat", {"jobs": [["j" * 37, 1, 1.0, 0]]}),
    ("heartbeat", {"started": ["j\x00"]}),
]


@pytest.mark.parametrize(("kind", "changes"), _BAD_TEXT)
def test_strings_are_bounded_and_hold_nothing_a_database_refuses(
    kind: str, changes: dict[str, Any]
) -> None:
    with pytest.raises(MalformedMessage):
        p.decode(_message(kind, **changes))


def test_an_error_text_may_hold_anything_up_to_its_limit() -> None:
    """The manager escapes what a database refuses before it stores an error."""
    text = "ValueError: bad \x00 byte \x1b[31m \ud800"
    failed = p.decode_as(_message("failed", error=text), p.JobFailed)
    assert failed.error == text
    assert p.decode_as(_message("failed", error="e" * 2000), p.JobFailed).error == "e" * 2000


@pytest.mark.parametrize(
    "payload",
    [
        b'{"v":1,"type":"started","server_id":"s","job_id":"j","fence":%s,"at":1}'
        % (b"9" * 5000),  # int too long to parse: ValueError inside json
        b'{"v":1,"type":"heartbeat","server_id":"s","name":"n","max_workers":1,'
        b'"started_at":1,"sent_at":1,"jobs":{"not":"a list"}}',
        b'{"v":1,"type":["not","hashable"]}',
        b'{"v":1.5,"type":"started"}',
        b"\xff\xfe\x00",
        b"",
    ],
)
def test_no_other_exception_escapes_decode(payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        p.decode(payload)


_FIELDS = sorted({f.name for cls in p._TYPES.values() for f in dataclasses.fields(cls)})
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(sorted(p._TYPES)),
    fields=st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=10),
)
def test_decode_of_any_json_with_our_field_names_raises_nothing_but_malformed(
    kind: str, fields: dict[str, Any]
) -> None:
    data = json.dumps({**fields, "v": 1, "type": kind})  # NaN and Infinity written as such
    try:
        message = p.decode(data)
    except MalformedMessage:
        return
    assert kind == message.TYPE


_JOB_FIELDS = [f.name for f in dataclasses.fields(p.JobMessage)]
_JOB_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.text(max_size=40)
    | st.sampled_from(["j", "a\x00b", "\ud800", "n" * 201, "j" * 37, 2**31 - 1, 2**31, 1e300])
    | st.lists(st.integers(), max_size=2)
    # kinds, constraints, spread groups, checkpoints: valid ones and near misses
    | st.sampled_from(["default", "video", "Bad Kind", "zone", '{"n": 3}'])
    | st.lists(st.sampled_from(["zone=a", "gpu", "zone!=b", "=x", "a=b"]), max_size=2)
)


def _generic_or_error(body: dict[str, Any]) -> Any:
    try:
        return p._build(p.JobMessage, dict(body))
    except (TypeError, ValueError):
        return "refused"


def _fast_or_error(body: dict[str, Any]) -> Any:
    try:
        return p._job_message(dict(body))
    except (TypeError, ValueError):
        return "refused"


@settings(max_examples=500, deadline=None)
@given(
    base=st.fixed_dictionaries(
        {},
        optional={
            "job_id": st.just("j1"),
            "name": st.just("job one"),
            "argument": st.just("{}"),
            "generation": st.just(3),
            "created_at": st.just(1700000000.5),
            "heartbeat_timeout": st.just(30),
            "kind": st.just("video"),
            "constraints": st.just(["zone=a"]),
            "spread": st.just("group-1"),
            "checkpoint": st.just('{"n": 3}'),
        },
    ),
    changes=st.dictionaries(st.sampled_from([*_JOB_FIELDS, "extra"]), _JOB_VALUES, max_size=4),
)
def test_the_hand_written_job_message_path_accepts_and_refuses_what_the_generic_one_does(
    base: dict[str, Any], changes: dict[str, Any]
) -> None:
    """A job message is read on every delivery, so it skips the generic dataclass
    walk; it must accept exactly what that walk accepts, with the same values."""
    body = {**base, **changes}
    assert _fast_or_error(body) == _generic_or_error(body)


def test_a_job_message_read_by_decode_keeps_every_value_and_ignores_unknown_fields() -> None:
    message = p.JobMessage("j1", "n", "arg", 7, 12.0, heartbeat_timeout=5.0)
    body = json.loads(p.encode(message)) | {"added_by_a_newer_writer": [1, 2]}
    assert p.decode_as(json.dumps(body), p.JobMessage) == message
    body["created_at"] = 12  # an integral number reads as a float, as before
    assert p.decode_as(json.dumps(body), p.JobMessage).created_at == 12.0
    for name in ("job_id", "created_at", "generation"):
        with pytest.raises(MalformedMessage, match=name):
            p.decode(json.dumps({k: v for k, v in body.items() if k != name}))


def _json_outcome(read: Any, data: bytes | str) -> tuple[str, Any]:
    try:
        return ("value", read(data))
    except Exception as exc:
        return ("error", type(exc))


@settings(max_examples=300, deadline=None)
@given(
    value=_JSON,
    encoding=st.sampled_from(["utf-8", "utf-16", "utf-16-le", "utf-32-be", "utf-8-sig", "text"]),
    garbage=st.binary(max_size=8),
)
def test_the_shared_json_decoder_reads_and_refuses_what_json_loads_does(
    value: Any, encoding: str, garbage: bytes
) -> None:
    """The decoder made once (not per message, as ``json.loads(..., parse_constant=)``
    would) reads bytes in any JSON encoding and text as before, and refuses the same."""

    def reference(data: bytes | str) -> Any:
        return json.loads(data, parse_constant=p._refuse_constant)

    text = json.dumps(value)
    samples: list[bytes | str] = [text, "\ufeff" + text, text.encode() + garbage, garbage]
    if encoding != "text":
        samples.append(text.encode(encoding))
    for data in samples:
        expected, got = _json_outcome(reference, data), _json_outcome(p._loads, data)
        if expected[0] == "value" and expected[1] != expected[1]:  # NaN is not equal to itself
            assert got[0] == "value"
            continue
        assert got == expected, data
