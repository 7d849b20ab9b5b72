"""Faster reading of the two AMQP frames every delivery brings besides its body:
``basic.deliver`` and the content header.

pamqp reads every frame generically, field by field, looking each field's type
up by name and slicing the rest of the frame at every step; a job delivery's
``basic.deliver`` and content header took about 100 µs of the 150-220 µs a
server spent per job it took over (docs/benchmarks.md). :func:`unmarshal` reads
these two frames with a few ``struct`` calls into the very objects pamqp makes
(same classes, same attribute values: a property test holds them equal over
random frames) and hands every other frame, and any frame it cannot read, to
pamqp's own :func:`pamqp.frame.unmarshal`, which then reads or refuses it as
before. :func:`install` puts it in place of pamqp's function, which aiormq's
frame reader calls (``pamqp.frame.unmarshal``, looked up at each call).

:func:`get_frame` replaces aiormq's frame receiver (``FrameReceiver.get_frame``):
aiormq reads every frame with three ``readexactly`` calls into a ``BytesIO``
under a lock; this one reads what the socket has (up to 256 KiB at a time) and
cuts every complete frame out of it, so that a burst of deliveries costs one read
per chunk, not three per frame. Its errors are aiormq's: a connection that ends
between two frames ends the iteration, one that ends inside a frame, is reset or
refused raises :class:`aiormq.exceptions.AMQPConnectionError`, an AMQP protocol
header in place of the first frame :class:`~aiormq.exceptions.ProtocolSyntaxError`,
and a frame pamqp cannot read :class:`~aiormq.exceptions.InvalidFrameError`
(aiormq's reader, too, ends the iteration only on an end already seen before it
waits for a frame; an end that comes while it waits is an error).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands, decode
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

__all__ = ["get_frame", "install", "installed", "unmarshal"]

_HEADER = struct.Struct(">BHI")
_LONGLONG = struct.Struct(">q")
_CONTENT = struct.Struct(">HHQH")
_DELIVER_INDEX = commands.Basic.Deliver.index
_Deliver = commands.Basic.Deliver
_Properties = commands.Basic.Properties
_FRAME_METHOD, _FRAME_HEADER, _FRAME_END = 1, 2, 0xCE

_original: Callable[[bytes], tuple[int, int, Any]] = pamqp.frame.unmarshal


def _short_str(data: bytes, offset: int) -> tuple[int, str]:
    length = data[offset]
    return offset + 1 + length, data[offset + 1 : offset + 1 + length].decode("utf-8")


def _octet(data: bytes, offset: int) -> tuple[int, int]:
    return offset + 1, data[offset]


def _generic(kind: str) -> Callable[[bytes, int], tuple[int, Any]]:
    def read(data: bytes, offset: int) -> tuple[int, Any]:
        consumed, value = decode.by_type(data[offset:], kind)
        return offset + consumed, value

    return read


_READERS = {"shortstr": _short_str, "octet": _octet}
_BLANK = _Properties()
_PROPERTIES: tuple[tuple[str, int, Callable[[bytes, int], tuple[int, Any]], Any], ...] = tuple(
    (
        name,
        _Properties.flags[name],
        _READERS.get(kind) or _generic(kind),
        getattr(_BLANK, name),
    )
    for name in _Properties.__slots__
    for kind in [getattr(_Properties, "_" + name)]
)
"""Each property in pamqp's order: its name, flag, reader and value when absent
(what pamqp's ``Basic.Properties()`` starts with: ``None``, ``''`` for cluster_id)."""
if any(isinstance(default, dict | list | set) for *_, default in _PROPERTIES):
    raise ImportError("a mutable default in pamqp's Basic.Properties: check frames.py")


def _deliver(payload: bytes) -> commands.Basic.Deliver:
    """The fields of ``basic.deliver`` after the method index: consumer tag,
    delivery tag, redelivered (a bit), exchange, routing key."""
    offset, consumer_tag = _short_str(payload, 4)
    (delivery_tag,) = _LONGLONG.unpack_from(payload, offset)
    redelivered = (payload[offset + 8] & 1) != 0
    offset, exchange = _short_str(payload, offset + 9)
    _, routing_key = _short_str(payload, offset)
    frame = _Deliver.__new__(_Deliver)
    frame.consumer_tag = consumer_tag
    frame.delivery_tag = delivery_tag
    frame.redelivered = redelivered
    frame.exchange = exchange
    frame.routing_key = routing_key
    return frame


def _content_header(payload: bytes) -> ContentHeader | None:
    """A content header whose property flags fit in one word (``None``: pamqp reads it)."""
    class_id, weight, body_size, flags = _CONTENT.unpack_from(payload, 0)
    if flags & 1:
        return None  # more flag words follow: rare, left to pamqp
    properties = _Properties.__new__(_Properties)
    offset = 14
    for name, flag, read, default in _PROPERTIES:
        if flags & flag:
            offset, value = read(payload, offset)
        else:
            value = default
        setattr(properties, name, value)
    header = ContentHeader.__new__(ContentHeader)
    header.class_id = class_id
    header.weight = weight
    header.body_size = body_size
    header.properties = properties
    return header


def unmarshal(data_in: bytes) -> tuple[int, int, Any]:
    """:func:`pamqp.frame.unmarshal`: ``(bytes consumed, channel, frame)``."""
    try:
        kind = data_in[0]
        if kind in (_FRAME_METHOD, _FRAME_HEADER):
            _, channel, size = _HEADER.unpack_from(data_in, 0)
            end = 7 + size
            if size and len(data_in) > end and data_in[end] == _FRAME_END:
                payload = data_in[7:end]
                if kind == _FRAME_METHOD:
                    if size >= 4 and int.from_bytes(payload[:4], "big") == _DELIVER_INDEX:
                        return end + 1, channel, _deliver(payload)
                else:
                    header = _content_header(payload)
                    if header is not None:
                        return end + 1, channel, header
    except (IndexError, ValueError, struct.error, UnicodeDecodeError):
        pass  # malformed here: pamqp reads it again and says what is wrong
    return _original(data_in)


unmarshal.orchestratr_fast_frames = True  # type: ignore[attr-defined]

READ_SIZE = 256 * 1024
"""Bytes asked of the socket at a time (what it has is returned, up to this)."""

_Receiver = aiormq.connection.FrameReceiver
_original_get_frame = _Receiver.get_frame


async def get_frame(self: aiormq.connection.FrameReceiver) -> tuple[int, int, Any]:
    """``FrameReceiver.get_frame``: the next frame, ``(weight, channel, frame)``.

    What was read and not yet returned is kept on the receiver as ``bytes`` and
    an offset (``_orx_data``, ``_orx_at``): a complete frame is cut out with one
    slice, and only the incomplete rest is copied when more arrives."""
    data: bytes = getattr(self, "_orx_data", b"")
    at: int = getattr(self, "_orx_at", 0)
    while True:
        have = len(data) - at
        if have >= 7:
            if not self.started:
                if data.startswith(b"AMQP", at):
                    raise ProtocolSyntaxError("Unexpected AMQP protocol header")
                self.started = True
            end = at + 8 + int.from_bytes(data[at + 3 : at + 7], "big")
            if end <= len(data):
                self._orx_data, self._orx_at = data, end  # type: ignore[attr-defined]
                try:
                    return pamqp.frame.unmarshal(data[at:end])
                except PAMQPException as e:
                    raise InvalidFrameError(str(e)) from e
            expected = end - at
        else:
            expected = 7
        chunk = await _read(self, have, expected)
        data, at = data[at:] + chunk, 0
        self._orx_data, self._orx_at = data, 0  # type: ignore[attr-defined]


async def _read(self: aiormq.connection.FrameReceiver, have: int, expected: int) -> bytes:
    """More bytes from the socket; the end of the stream as aiormq's reader says it."""
    reader = self.reader
    if reader.at_eof():
        if not have:
            del self.reader
            raise StopAsyncIteration
        raise _ended(have, expected)
    async with self.lock:
        try:
            chunk = await reader.read(READ_SIZE)
        except ConnectionRefusedError as e:
            raise AMQPConnectionError(f"Server connection refused: {e!r}") from e
        except ConnectionResetError as e:
            raise AMQPConnectionError(f"Server connection reset: {e!r}") from e
        except ConnectionError as e:
            raise AMQPConnectionError(f"Server connection error: {e!r}") from e
        except OSError as e:
            raise AMQPConnectionError(f"Server communication error: {e!r}") from e
    if not chunk:
        # The end came while we waited: aiormq's reader, waiting in readexactly,
        # says so with this error (the connection then closes with it as the cause).
        raise _ended(have, expected)
    return chunk


def _ended(have: int, expected: int) -> AMQPConnectionError:
    """aiormq's error for a stream that ended inside a frame or while it waited."""
    return AMQPConnectionError(
        f"Server connection unexpectedly closed. Read {have} bytes but {max(expected, 1)} "
        "bytes expected"
    )


get_frame.orchestratr_fast_frames = True  # type: ignore[attr-defined]


def installed() -> bool:
    """Whether :func:`install` has replaced pamqp's and aiormq's readers."""
    return all(
        getattr(f, "orchestratr_fast_frames", False) is True
        for f in (pamqp.frame.unmarshal, _Receiver.get_frame)
    )


def install() -> None:
    """Read frames with :func:`get_frame` and :func:`unmarshal` from now on, in this
    process (idempotent)."""
    pamqp.frame.unmarshal = unmarshal
    _Receiver.get_frame = get_frame  # type: ignore[method-assign]
