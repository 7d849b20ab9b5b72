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
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pamqp.frame
from pamqp import commands, decode
from pamqp.header import ContentHeader

__all__ = ["install", "installed", "unmarshal"]

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


def installed() -> bool:
    """Whether :func:`install` has replaced pamqp's reader."""
    return getattr(pamqp.frame.unmarshal, "orchestratr_fast_frames", False) is True


def install() -> None:
    """Read frames with :func:`unmarshal` from now on, in this process (idempotent)."""
    if not installed():
        pamqp.frame.unmarshal = unmarshal
