"""The fast reader of ``basic.deliver`` and content header frames
(:mod:`orchestratr_rabbitmq.transport.frames`) makes what pamqp makes, and leaves
every other frame, and every frame it cannot read, to pamqp."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import aiormq.connection
import aiormq.exceptions
import pamqp.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body, commands, header, heartbeat

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


# -- the frame receiver (frames.get_frame in place of aiormq's FrameReceiver.get_frame) --

FRAMES = st.lists(
    st.one_of(
        st.builds(
            lambda tag, redelivered, ch: pamqp.frame.marshal(
                commands.Basic.Deliver("ctag", tag, redelivered, "ex", "rk"), ch
            ),
            st.integers(1, 2**40),
            st.booleans(),
            st.integers(1, 2047),
        ),
        st.builds(
            lambda props, size, ch: pamqp.frame.marshal(
                header.ContentHeader(0, size, commands.Basic.Properties(**props)), ch
            ),
            PROPERTIES,
            st.integers(0, 2**20),
            st.integers(1, 2047),
        ),
        st.builds(
            lambda value, ch: pamqp.frame.marshal(body.ContentBody(value), ch),
            st.binary(min_size=1, max_size=3000),
            st.integers(1, 2047),
        ),
        st.just(pamqp.frame.marshal(heartbeat.Heartbeat(), 0)),
        st.builds(lambda n: pamqp.frame.marshal(commands.Basic.Ack(n), 1), st.integers(0, 2**40)),
    ),
    max_size=12,
)


async def _read_all(
    get_frame: Any, data: bytes, cuts: list[int], eof_first: bool = False
) -> tuple[list[Any], BaseException]:
    """Every frame ``get_frame`` reads from a stream that gets ``data`` in pieces
    cut at ``cuts``, each piece arriving only once the reader waits for more,
    then the end of the stream (seen before the last read if ``eof_first``), and
    the error that ended the reading."""
    reader = asyncio.StreamReader()
    receiver = aiormq.connection.FrameReceiver(reader)

    async def feed() -> None:
        at = 0
        for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
            if cut > at:
                reader.feed_data(data[at:cut])
                at = cut
                if not (eof_first and at == len(data)):
                    for _ in range(3):
                        await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    out: list[Any] = []
    try:
        while True:
            try:
                out.append(await get_frame(receiver))
            except (StopAsyncIteration, aiormq.exceptions.AMQPError) as exc:
                return out, exc
    finally:
        await feeder


def _same_frame(a: Any, b: Any) -> None:
    assert a[:2] == b[:2]
    if isinstance(a[2], header.ContentHeader):
        _same_header(a[2], b[2])
    elif isinstance(a[2], body.ContentBody):
        assert type(b[2]) is body.ContentBody and a[2].value == b[2].value
    elif isinstance(a[2], heartbeat.Heartbeat):
        assert type(b[2]) is heartbeat.Heartbeat
    else:
        _same_method(a[2], b[2])


@settings(max_examples=200, deadline=None)
@given(
    frame_list=FRAMES,
    cuts=st.lists(st.integers(0, 10**6), max_size=20),
    eof_first=st.booleans(),
)
def test_the_receiver_reads_a_stream_in_any_pieces_as_aiormqs_reads_it(
    frame_list: list[bytes], cuts: list[int], eof_first: bool
) -> None:
    """However the bytes arrive (one frame in several reads, several frames in one),
    the frames read are aiormq's, in order; a stream whose end was seen before the
    next frame was asked for ends the iteration, one that ends while the reader
    waits is a connection error, as in aiormq."""
    data = b"".join(frame_list)

    async def both() -> tuple[tuple[list[Any], BaseException], tuple[list[Any], BaseException]]:
        fast = await _read_all(frames.get_frame, data, cuts, eof_first)
        slow = await _read_all(frames._original_get_frame, data, cuts, eof_first)
        return fast, slow

    (fast, fast_end), (slow, slow_end) = asyncio.run(both())
    assert type(fast_end) is type(slow_end), (fast_end, slow_end)
    assert len(fast) == len(slow) == len(frame_list)
    for a, b in zip(fast, slow, strict=True):
        _same_frame(a, b)


@settings(max_examples=100, deadline=None)
@given(frame_list=FRAMES.filter(bool), lose=st.integers(1, 10**6))
def test_a_stream_that_ends_inside_a_frame_is_a_connection_error(
    frame_list: list[bytes], lose: int
) -> None:
    data = b"".join(frame_list)
    cut = data[: len(data) - 1 - lose % (len(frame_list[-1]) - 1)]  # inside the last frame

    for get_frame in (frames.get_frame, frames._original_get_frame):
        for eof_first in (False, True):
            _, end = asyncio.run(_read_all(get_frame, cut, [7, 100], eof_first))
            assert isinstance(end, aiormq.exceptions.AMQPConnectionError), end
            assert "unexpectedly closed" in str(end)


def test_a_protocol_header_and_an_unreadable_frame_raise_aiormqs_errors() -> None:
    _, end = asyncio.run(_read_all(frames.get_frame, b"AMQP\x00\x00\x09\x01", []))
    assert isinstance(end, aiormq.exceptions.ProtocolSyntaxError)
    bad = b"\x01\x00\x01\x00\x00\x00\x04\xff\xff\xff\xff\xce"  # no such method
    _, end = asyncio.run(_read_all(frames.get_frame, bad, []))
    assert isinstance(end, aiormq.exceptions.InvalidFrameError)
    frames.install()
    assert frames.installed()
    assert aiormq.connection.FrameReceiver.get_frame is frames.get_frame
