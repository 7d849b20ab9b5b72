"""The fast reader of ``basic.deliver`` and content header frames
(:mod:`orchestratr_rabbitmq.transport.frames`) makes what pamqp makes, and leaves
every other frame, and every frame it cannot read, to pamqp."""

from __future__ import annotations

import datetime
from typing import Any

import pamqp.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body, commands, header

from orchestratr_rabbitmq.transport import frames

SHORT = st.text(max_size=40).filter(lambda t: len(t.encode()) < 256)
TABLE = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda t: len(t.encode()) < 256),
    st.integers(-(2**31), 2**31 - 1) | st.booleans() | SHORT,
    max_size=4,
)
PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "content_type": SHORT,
        "content_encoding": SHORT,
        "headers": TABLE,
        "delivery_mode": st.sampled_from([1, 2]),
        "priority": st.integers(0, 9),
        "correlation_id": SHORT,
        "reply_to": SHORT,
        "expiration": st.integers(0, 10**9).map(str),
        "message_id": SHORT,
        "timestamp": st.integers(0, 2**32).map(
            lambda s: datetime.datetime.fromtimestamp(s, tz=datetime.UTC)
        ),
        "message_type": SHORT,
        "user_id": SHORT,
        "app_id": SHORT,
    },
)


def _original(data: bytes) -> Any:
    return frames._original(data)


def _same_method(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    for name in type(a).__slots__:
        value = getattr(a, name)
        assert value == getattr(b, name), name
        assert type(value) is type(getattr(b, name)), name


def _same_header(a: header.ContentHeader, b: header.ContentHeader) -> None:
    assert type(a) is type(b) is header.ContentHeader
    assert (a.class_id, a.weight, a.body_size) == (b.class_id, b.weight, b.body_size)
    assert type(a.properties) is type(b.properties)
    for name in commands.Basic.Properties.__slots__:
        value = getattr(a.properties, name)
        assert value == getattr(b.properties, name), name
        assert type(value) is type(getattr(b.properties, name)), name


@settings(max_examples=300, deadline=None)
@given(
    consumer_tag=SHORT,
    delivery_tag=st.integers(1, 2**63 - 1),
    redelivered=st.booleans(),
    exchange=st.from_regex(r"[-a-zA-Z0-9_.:]{0,60}", fullmatch=True),
    routing_key=SHORT,
    channel=st.integers(1, 2047),
)
def test_a_deliver_frame_reads_as_pamqp_reads_it(
    consumer_tag: str,
    delivery_tag: int,
    redelivered: bool,
    exchange: str,
    routing_key: str,
    channel: int,
) -> None:
    frame = commands.Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)
    data = pamqp.frame.marshal(frame, channel) + b"trailing"
    fast, slow = frames.unmarshal(data), _original(data)
    assert fast[:2] == slow[:2]
    assert type(fast[2]) is commands.Basic.Deliver
    _same_method(fast[2], slow[2])


@settings(max_examples=300, deadline=None)
@given(properties=PROPERTIES, size=st.integers(0, 2**40), channel=st.integers(1, 2047))
def test_a_content_header_reads_as_pamqp_reads_it(
    properties: dict[str, Any], size: int, channel: int
) -> None:
    frame = header.ContentHeader(0, size, commands.Basic.Properties(**properties))
    data = pamqp.frame.marshal(frame, channel)
    fast, slow = frames.unmarshal(data), _original(data)
    assert fast[:2] == slow[:2]
    _same_header(fast[2], slow[2])


@settings(max_examples=300, deadline=None)
@given(properties=PROPERTIES, cut=st.integers(1, 200), junk=st.binary(max_size=30))
def test_a_damaged_frame_is_left_to_pamqp(
    properties: dict[str, Any], cut: int, junk: bytes
) -> None:
    """Cut short, or with a wrong frame end, or noise: whatever pamqp makes of it
    (a frame or an error), the fast reader makes the same."""
    good = pamqp.frame.marshal(
        header.ContentHeader(0, 10, commands.Basic.Properties(**properties)), 1
    )
    deliver = pamqp.frame.marshal(commands.Basic.Deliver("ctag", 7, True, "ex", "rk"), 1)
    for data in (good[:-cut], good[:-1] + b"\x00", deliver[:-cut], junk, b"\x01" + junk):
        try:
            expected: Any = _original(data)
        except Exception as exc:
            with pytest.raises(type(exc)):
                frames.unmarshal(data)
            continue
        got = frames.unmarshal(data)
        assert got[:2] == expected[:2]
        if isinstance(expected[2], header.ContentHeader):
            _same_header(got[2], expected[2])
        else:
            _same_method(got[2], expected[2])


def test_other_frames_go_to_pamqp_and_install_replaces_pamqps_reader_once() -> None:
    data = pamqp.frame.marshal(body.ContentBody(b"x" * 100), 3)
    assert frames.unmarshal(data)[2].value == b"x" * 100
    ack = pamqp.frame.marshal(commands.Basic.Ack(5), 2)
    got, expected = frames.unmarshal(ack), _original(ack)
    assert got[:2] == expected[:2]
    _same_method(got[2], expected[2])
    frames.install()
    frames.install()
    assert frames.installed()
    assert pamqp.frame.unmarshal is frames.unmarshal
