"""Messages between manager and servers, and the one codec that reads and writes them.

Every message is a JSON object ``{"v": <protocol version>, "type": <type>, ...}``.
A message with a larger ``v`` than :data:`PROTOCOL_VERSION`, an unknown type, or
missing fields raises :class:`MalformedMessage` when decoded; transports
dead-letter such messages and keep running.

Three flows, each on its own queue(s) in a broker:

* **jobs** (manager -> any server): :class:`JobMessage`, one per job generation.
  Held unacknowledged by the server that runs the job for as long as it runs.
* **commands** (manager -> one server, or broadcast to all): :class:`StopJob`,
  :class:`CancelJob`, :class:`DrainServer`, :class:`ReleaseJobs`,
  :class:`JobCheckpoint`. A ``CancelJob`` may carry a hold mark instead of a job
  id (:mod:`orchestratr_core.lifecycle`).
* **events** (server -> managers): :class:`ServerHeartbeat`, :class:`JobStarted`,
  :class:`JobStopped`, :class:`JobFailed`, :class:`JobDiscarded`, :class:`ServerLeft`, and
  :class:`ServerDeclaredDead` (leader -> the manager consuming the events).
  Events from one server are delivered in the order it published them.

Heartbeats are the largest messages (every running job, every 2 s), so they have
a hand-written path instead of the generic dataclass walk. ``ServerHeartbeat.jobs``
is written as arrays, ``[[job_id, fence, last_heartbeat, restarts], ...]``
(``last_heartbeat`` may be ``null``), with a fifth value, the job's new
checkpoint, when it recorded one that no acknowledged heartbeat carried yet
(:mod:`orchestratr_core.server.beats`; a heartbeat lost on the way loses no
checkpoint, and a complete listing carries them as a delta does). The reader
accepts that form and the older object form,
``[{"job_id": ..., "fence": ..., "last_heartbeat": ..., "restarts": ...}]``
(items of both forms may be mixed), so a manager of this version reads the
heartbeats of older servers. A manager of an older version cannot read the array
form (it dead-letters such heartbeats): **upgrade managers before servers**. An
array with fewer than four values, or a value of the wrong type (``true`` is not
a number here), makes the whole message malformed; values after the fifth are
ignored, as unknown fields of an object are, so that a newer minor writer may
append some (an older server's four-value arrays read with no checkpoint).

``ServerHeartbeat.started`` lists the ids of the jobs whose start reports a
heartbeat replaces (a server that takes many jobs at once sends one heartbeat
instead of a :class:`JobStarted` per job), as a list of strings; the manager
does for those jobs what it does on a :class:`JobStarted`. It is left out when
empty (a periodic heartbeat), and a heartbeat without it reads as ``()``. A
manager of an older version ignores it, as it ignores every unknown field.
Anything but a list of strings makes the message malformed.

**Heartbeats that carry what changed.** A server of this version numbers its
heartbeats (``seq``, from 1) and adds ``digest`` and ``running``: a digest of its
complete set of running jobs (:func:`jobs_digest`, order-free) and its size. A
manager of this version that applied a numbered heartbeat answers with
:class:`HeartbeatAck`; from then on the server may send a *delta*: ``base`` is the
``seq`` of the acknowledged heartbeat, ``jobs`` lists only the jobs started or
changed since that one, and ``gone`` the ids of its jobs that no longer run. The
manager rebuilds the complete set from its copy of the acknowledged one and checks
it against ``digest`` and ``running``; without that copy (it restarted, another
manager took over) or on a mismatch it applies what the delta says and asks for a
complete listing (``HeartbeatAck(full=True)``). Every field is left out at its
default, so that a heartbeat of an older server (no ``seq``) reads as a complete
listing, as it always was. A server never sends a delta before a manager of this
version acknowledged one of its heartbeats, so an older manager, which sends no
acknowledgement, only ever reads complete listings.

**Chained deltas.** A manager of this version keeps the set of the last
heartbeat it applied of each server and says so in every acknowledgement
(``HeartbeatAck.chain``). A server that read that sends each heartbeat relative
to the one it sent just before (``chained``, ``base`` = ``seq`` - 1), as long as
that one was published: events from one server arrive in order, so the manager
applies each on the set of the one before, and a delta lists only what changed
in one interval however far behind the manager is. A chained delta whose base is
not the manager's copy (a heartbeat lost, a new manager) is applied for what it
says and answered with a request for a complete listing -- once: the deltas sent
before the server could have read that request are applied and not answered.

Every value is bounded, so that nothing a message carries can fail a database
write or a conversion later (:func:`decode` refuses the message instead):

* JSON ``NaN``, ``Infinity`` and ``-Infinity`` are refused, and so is a number
  that only reads as infinite (``1e400``);
* fences (``fence``, ``max_fence``) within 0..2^63-1; ``generation`` within
  0..2^31-1 (so that its fencing tokens fit in 63 bits); ``max_workers`` within
  1..2^31-1; other counts (``restarts``, ``count``, ``hold``, ``pid``) within
  0..2^31-1 (:data:`~orchestratr_core.job.MAX_COUNT`);
* times (epoch seconds) within 0..253402300799 (the end of year 9999),
  durations within 0..2^31-1 seconds;
* job ids: at most 36 characters; server ids, server and host names: at most
  255; job names: at most :data:`~orchestratr_core.job.MAX_NAME_LENGTH`; all of
  them printable (no control characters, no NUL, no lone surrogates);
* job arguments: as :func:`~orchestratr_core.job.validate_argument` accepts
  (64 KiB of UTF-8, no NUL); error texts: at most
  :data:`~orchestratr_core.job.MAX_ERROR_LENGTH` characters of anything (the
  manager escapes what a database cannot store before it stores them).

Any failure while decoding, whatever its kind (a ``RecursionError`` from deeply
nested JSON included), is a :class:`MalformedMessage`.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from orchestratr_core.errors import MalformedMessage, UnsupportedProtocolVersion
from orchestratr_core.job import (
    MAX_COUNT,
    MAX_DURATION,
    MAX_EPOCH,
    MAX_ERROR_LENGTH,
    MAX_FENCE,
    MAX_GENERATION,
    MAX_JOB_ID_LENGTH,
    MAX_NAME_LENGTH,
    MAX_SERVER_TEXT_LENGTH,
    validate_argument,
)
from orchestratr_core.lifecycle import MAX_HOLD_MARK_LENGTH, validate_checkpoint
from orchestratr_core.placement import (
    DEFAULT_KIND,
    Pool,
    parse_constraints,
    parse_labels,
    validate_kind,
    validate_spread,
)

__all__ = [
    "PROTOCOL_VERSION",
    "CancelJob",
    "Command",
    "DrainServer",
    "Event",
    "HeartbeatAck",
    "JobCheckpoint",
    "JobDiscarded",
    "JobFailed",
    "JobMessage",
    "JobStarted",
    "JobStopped",
    "JobUpdated",
    "Message",
    "ReleaseJobs",
    "RunningJob",
    "ServerDeclaredDead",
    "ServerHeartbeat",
    "ServerLeft",
    "StopJob",
    "StopReason",
    "UpdateJob",
    "decode",
    "decode_as",
    "encode",
    "job_digest",
    "jobs_digest",
]

PROTOCOL_VERSION = 1
"""The protocol version this code writes, and the newest it reads."""


class StopReason(enum.StrEnum):
    """Why a server stopped a job (in :class:`JobStopped` and :class:`StopJob`)."""

    CANCELLED = "cancelled"
    """The job was cancelled; its message was dropped."""
    RELEASED = "released"
    """Handed back to the queue (drain, shutdown, rebalance); another server takes it."""
    SUPERSEDED = "superseded"
    """Another copy holds a newer (or equal, earlier-recorded) fencing token; our
    message was dropped."""
    LOST = "lost"
    """The channel or connection that delivered the job was lost; the broker
    has already given the message back."""
    COMPLETED = "completed"
    """The job function returned normally; the message was dropped."""
    WATCHDOG = "watchdog"
    """The job stopped calling ``heartbeat()`` within its heartbeat timeout."""
    HELD = "held"
    """The job is paused or quarantined (a hold mark); the message was dropped.
    Managers before the lifecycle controls cannot read it: upgrade them first."""


@dataclass(frozen=True)
class Message:
    """Base of every protocol message."""

    TYPE: ClassVar[str] = ""


@dataclass(frozen=True)
class JobMessage(Message):
    """A job to run. One per (job, generation); it carries everything a server needs."""

    TYPE: ClassVar[str] = "job"
    job_id: str
    name: str
    argument: str
    generation: int
    created_at: float
    heartbeat_timeout: float | None = None
    """Optional watchdog: restart the job if it does not call ``heartbeat()`` this often."""
    checkpoint: str | None = None
    """The job's latest checkpoint when this generation was published (a resume,
    an update). A redelivered message's may be stale: its new owner waits for a
    :class:`JobCheckpoint` (see :mod:`orchestratr_core.lifecycle`)."""
    kind: str = DEFAULT_KIND
    """The job's kind: only a server that runs this kind receives the message."""
    constraints: tuple[str, ...] = ()
    """Hard constraints on the labels of the server that runs it (canonical)."""
    spread: str | None = None
    """The job's spread group (anti-affinity), if any."""

    def __post_init__(self) -> None:
        # Checked on decode too: a server never acts on a kind or constraint it
        # cannot read (a ValueError here makes the message malformed).
        validate_kind(self.kind)
        if parse_constraints(self.constraints) != self.constraints:
            raise ValueError("constraints must be canonical (parsed, unique, sorted)")
        validate_spread(self.spread)

    @property
    def pool(self) -> Pool:
        """The pool this message is delivered in."""
        return Pool(self.kind, self.constraints)


@dataclass(frozen=True)
class Command(Message):
    """Base of manager -> server messages."""


@dataclass(frozen=True)
class StopJob(Command):
    """Stop a job. ``drop`` acknowledges its message for good (duplicate or
    cancelled); otherwise the message is released to the queue.
    Applies only to a copy whose fence is ``<= max_fence`` (``None``: any copy)."""

    TYPE: ClassVar[str] = "stop"
    job_id: str
    reason: StopReason
    drop: bool
    max_fence: int | None = None


@dataclass(frozen=True)
class CancelJob(Command):
    """Broadcast: this job is cancelled. Stop it if running, drop its message if
    it is delivered, never start it."""

    TYPE: ClassVar[str] = "cancel"
    job_id: str


@dataclass(frozen=True)
class JobCheckpoint(Command):
    """To the server that started ``job_id`` under ``fence`` from a redelivered
    message: the latest stored checkpoint (``None``: none), read after its start
    was recorded. The server starts the job function with it."""

    TYPE: ClassVar[str] = "checkpoint"
    job_id: str
    fence: int
    checkpoint: str | None = None


@dataclass(frozen=True)
class UpdateJob(Command):
    """To the server running ``job_id`` under ``fence``: the job's argument is now
    ``argument`` (version ``argument_version`` of it). A copy whose function is
    :func:`~orchestratr_core.lifecycle.updatable` takes it without a restart and
    the server reports :class:`JobUpdated`; any other copy (another fence, a
    function that did not opt in, an older version) is left as it is, and the
    sender falls back to a restart. A server of an older version reads this
    command as malformed and ignores it."""

    TYPE: ClassVar[str] = "update"
    job_id: str
    fence: int
    argument_version: int
    argument: str


@dataclass(frozen=True)
class DrainServer(Command):
    """Stop taking jobs, hand every running job back, then exit."""

    TYPE: ClassVar[str] = "drain"


@dataclass(frozen=True)
class ReleaseJobs(Command):
    """Rebalancing: hand ``count`` running jobs back to the queue, and for
    ``hold_for`` seconds take no jobs beyond ``hold`` (``hold=None``: no limit),
    so that the released jobs go to servers below their share."""

    TYPE: ClassVar[str] = "release"
    count: int
    hold: int | None = None
    hold_for: float = 10.0
    pool: str | None = None
    """Only jobs of this pool (its :attr:`~orchestratr_core.placement.Pool.key`),
    and the hold caps only that pool's deliveries; ``None``: any job, the hold caps
    the whole server."""


@dataclass(frozen=True)
class HeartbeatAck(Command):
    """To one server: the manager applied its heartbeat ``seq`` and keeps the set of
    jobs it listed, so later heartbeats may list only what changed since then
    (``ServerHeartbeat.base``). With ``full`` the manager lacks (or distrusts) that
    set: the server's next heartbeat, sent at once, is a complete listing. Sent only
    to servers whose heartbeats are numbered (``seq``): an older server never gets one."""

    TYPE: ClassVar[str] = "heartbeat-ack"
    seq: int
    full: bool = False
    chain: bool = False
    """The manager keeps the set of the last heartbeat it applied, whichever it
    was: the server's next heartbeats may be *chained*, each relative to the one
    sent just before it (``ServerHeartbeat.chained``). A manager of an older
    version leaves it out (false), and a server of an older version ignores it."""


@dataclass(frozen=True)
class Event(Message):
    """Base of server -> manager messages."""

    server_id: str


@dataclass(frozen=True, slots=True)
class RunningJob:
    """One running job inside a :class:`ServerHeartbeat` (a heartbeat may carry
    tens of thousands: no ``__dict__``)."""

    job_id: str
    fence: int
    last_heartbeat: float | None = None
    """When the job function last called ``heartbeat()`` (epoch seconds)."""
    restarts: int = 0
    checkpoint: str | None = None
    """A checkpoint the job recorded since the previous heartbeat (``None``: none
    new). Written as a fifth array value, left out when ``None``."""


@dataclass(frozen=True)
class ServerHeartbeat(Event):
    """Periodic liveness report: the complete set of running jobs, or (``base``
    set) what changed since the heartbeat ``base`` the manager acknowledged (see
    the module docstring)."""

    TYPE: ClassVar[str] = "heartbeat"
    name: str
    max_workers: int
    started_at: float
    sent_at: float
    host: str = ""
    pid: int = 0
    draining: bool = False
    jobs: tuple[RunningJob, ...] = field(default_factory=tuple)
    started: tuple[str, ...] = ()
    """Ids of jobs whose start reports this heartbeat replaces (each also in
    ``jobs``, with its fence): the manager treats them as it treats a
    :class:`JobStarted`. Empty in a periodic heartbeat unless start reports
    waited behind it when it was built."""
    kinds: tuple[str, ...] = ()
    """The job kinds the server runs (empty: only the default kind, as a server
    of an older version)."""
    labels: tuple[str, ...] = ()
    """The server's labels as sorted ``KEY=VALUE`` texts."""
    seq: int = 0
    """This heartbeat's number in the server's life (from 1); 0: an older server,
    whose heartbeats are complete listings and are not acknowledged."""
    base: int = 0
    """0: ``jobs`` is the complete set. Otherwise the ``seq`` of the acknowledged
    heartbeat this one is relative to: ``jobs`` are the jobs started or changed
    since, ``gone`` the ids of those that no longer run."""
    gone: tuple[str, ...] = ()
    chained: bool = False
    """``base`` is the heartbeat the server sent just before this one, not an
    acknowledged one (sent only to a manager whose acknowledgement said
    ``HeartbeatAck.chain``): ``jobs`` and ``gone`` are what changed since that
    heartbeat, so a delta does not grow with the manager's lag."""
    digest: int = 0
    """:func:`jobs_digest` of the complete set of running jobs (with ``seq``)."""
    running: int = 0
    """How many jobs the complete set holds (with ``seq``)."""
    updatable: tuple[str, ...] = ()
    """The kinds whose function is :func:`~orchestratr_core.lifecycle.updatable`:
    this server applies an :class:`UpdateJob` to their running copies. Empty for a
    server of an older version (which reads no ``UpdateJob``)."""
    drops: bool = False
    """The server reads drop marks (``"<id>@<g>!"``, see
    :func:`~orchestratr_core.lifecycle.drop_mark`) and ``UpdateJob``: every server
    of this version sets it, whatever its :attr:`updatable` kinds. False for a
    server of an older version, which would start a message a drop mark covers:
    while such a server is live, updates are never applied in place."""

    def __post_init__(self) -> None:
        for kind in (*self.kinds, *self.updatable):
            validate_kind(kind, error=ValueError)
        parse_labels(self.labels)  # a ConfigurationError is a ValueError: malformed

    @property
    def runs_kinds(self) -> tuple[str, ...]:
        """The kinds the server runs: :attr:`kinds`, or the default kind when empty."""
        return tuple(sorted(self.kinds)) if self.kinds else (DEFAULT_KIND,)


@dataclass(frozen=True)
class JobStarted(Event):
    """The server started (or restarted) a job under this fence."""

    TYPE: ClassVar[str] = "started"
    job_id: str
    fence: int
    at: float
    restarts: int = 0


@dataclass(frozen=True)
class JobStopped(Event):
    """The server stopped a job for good (on this server)."""

    TYPE: ClassVar[str] = "stopped"
    job_id: str
    fence: int
    reason: StopReason
    at: float
    forced: bool = False
    """True if the job ignored its stop token and was cancelled hard (or abandoned)."""
    error: str | None = None


@dataclass(frozen=True)
class JobFailed(Event):
    """The job function raised; the server restarts it after ``retry_in`` seconds."""

    TYPE: ClassVar[str] = "failed"
    job_id: str
    fence: int
    error: str
    restarts: int
    retry_in: float
    at: float


@dataclass(frozen=True)
class JobDiscarded(Event):
    """A delivered message of a cancelled job was dropped without running it."""

    TYPE: ClassVar[str] = "discarded"
    job_id: str
    fence: int
    at: float


@dataclass(frozen=True)
class JobUpdated(Event):
    """The copy of ``job_id`` under ``fence`` took argument version
    ``argument_version`` (an :class:`UpdateJob`) without a restart. Managers of an
    older version read it as malformed and ignore it."""

    TYPE: ClassVar[str] = "job-updated"
    job_id: str
    fence: int
    argument_version: int
    at: float


@dataclass(frozen=True)
class ServerLeft(Event):
    """The server shut down gracefully; everything it ran has been handed back."""

    TYPE: ClassVar[str] = "left"
    at: float


@dataclass(frozen=True)
class ServerDeclaredDead(Event):
    """Published on the events queue by the leader when it declared ``server_id``
    dead (its jobs released in the storage), for the manager that consumes the
    events, which may be another one: that manager drops its copy of the
    server's set of running jobs, so that the server's next heartbeat -- if it
    was alive after all -- is answered with a request for a complete listing,
    which claims its released jobs again (a delta on the copy would not list
    them). Managers of an older version read it as malformed and ignore it."""

    TYPE: ClassVar[str] = "server-declared-dead"
    at: float


_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        JobMessage,
        StopJob,
        CancelJob,
        JobCheckpoint,
        UpdateJob,
        DrainServer,
        ReleaseJobs,
        HeartbeatAck,
        ServerHeartbeat,
        JobStarted,
        JobStopped,
        JobFailed,
        JobDiscarded,
        JobUpdated,
        ServerLeft,
        ServerDeclaredDead,
    )
}


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def encode(message: Message) -> bytes:
    """Serialize a message to compact UTF-8 JSON."""
    # The exact type: a subclass may have more fields for the generic walk.
    body = _heartbeat_body(message) if type(message) is ServerHeartbeat else _plain(message)
    body["v"] = PROTOCOL_VERSION
    body["type"] = message.TYPE
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _heartbeat_body(hb: ServerHeartbeat) -> dict[str, Any]:
    """The heartbeat's fields, its jobs as arrays (see the module docstring)."""
    body: dict[str, Any] = {
        "server_id": hb.server_id,
        "name": hb.name,
        "max_workers": hb.max_workers,
        "started_at": hb.started_at,
        "sent_at": hb.sent_at,
        "host": hb.host,
        "pid": hb.pid,
        "draining": hb.draining,
        # Tuples (written as arrays): the garbage collector stops tracking a tuple
        # of plain values, so tens of thousands of them are not promoted to its
        # oldest generation while the message is written (full collections).
        "jobs": [
            (j.job_id, j.fence, j.last_heartbeat, j.restarts)
            if j.checkpoint is None
            else (j.job_id, j.fence, j.last_heartbeat, j.restarts, j.checkpoint)
            for j in hb.jobs
        ],
    }
    if hb.started:  # left out when empty: a periodic heartbeat is written as before
        body["started"] = list(hb.started)
    if hb.kinds:
        body["kinds"] = list(hb.kinds)
    if hb.labels:
        body["labels"] = list(hb.labels)
    if hb.updatable:
        body["updatable"] = list(hb.updatable)
    if hb.drops:  # left out when false: an older manager ignores it
        body["drops"] = True
    if hb.seq:  # numbered: left out by (and for) older servers
        body["seq"] = hb.seq
        body["digest"] = hb.digest
        body["running"] = hb.running
        if hb.base:
            body["base"] = hb.base
            body["gone"] = list(hb.gone)
            if hb.chained:
                body["chained"] = True
    return body


_DIGEST_MASK = (1 << 63) - 1


def job_digest(job_id: str, fence: int) -> int:
    """One job's share of :func:`jobs_digest`: 63 bits of BLAKE2b over its id and
    fence (the same in every process, unlike ``hash``)."""
    raw = hashlib.blake2b(f"{job_id}:{fence}".encode(), digest_size=8).digest()
    return int.from_bytes(raw, "big") & _DIGEST_MASK


def jobs_digest(shares: Iterable[int]) -> int:
    """The digest of a set of running jobs: the XOR of their :func:`job_digest`,
    so that it does not depend on order and follows a change by one XOR each."""
    digest = 0
    for share in shares:
        digest ^= share
    return digest


_M = TypeVar("_M", bound=Message)
_T = TypeVar("_T")


def decode(data: bytes | str) -> Message:
    """Parse a message; raise :class:`MalformedMessage` (or its subclass
    :class:`UnsupportedProtocolVersion`) with a short reason if it is not one of
    ours. Nothing else escapes: any failure while reading is a malformed message."""
    try:
        return _decode(data)
    except MalformedMessage:
        raise
    except RecursionError:
        raise MalformedMessage("nested too deeply") from None
    except Exception as exc:  # any failure on hostile input is "malformed"
        raise MalformedMessage(f"unreadable ({type(exc).__name__}: {exc})"[:300]) from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number this protocol carries")


_JSON = json.JSONDecoder(parse_constant=_refuse_constant)
"""One decoder for every message: ``json.loads`` with an argument builds a new
decoder per call, which was a tenth of reading a job message."""


def _loads(data: bytes | str) -> Any:
    """``json.loads(data, parse_constant=_refuse_constant)``, without building a
    decoder per call (the same checks: bytes in any JSON encoding, no BOM in text)."""
    if isinstance(data, str):
        if data.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
        return _JSON.decode(data)
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"the JSON object must be str or bytes, not {type(data).__name__}")
    return _JSON.decode(data.decode(json.detect_encoding(data), "surrogatepass"))


def _decode(data: bytes | str) -> Message:
    try:
        body = _loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"not JSON: {exc}"[:300]) from None
    if not isinstance(body, dict):
        raise MalformedMessage("not a JSON object")
    version = body.pop("v", None)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MalformedMessage("no protocol version ('v')")
    if version > PROTOCOL_VERSION:
        raise UnsupportedProtocolVersion(
            f"protocol version {version} is newer than {PROTOCOL_VERSION}; upgrade this process"
        )
    kind = body.pop("type", None)
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MalformedMessage(f"unknown message type {str(kind)[:40]!r}")
    try:
        # Exact type: a job message is read on every delivery (a failover moves
        # thousands at once), so it has a hand-written path like the heartbeat's.
        return _job_message(body) if cls is JobMessage else _build(cls, body)
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"bad {kind!r} message: {exc}"[:300]) from None


def decode_as(data: bytes | str, cls: type[_M]) -> _M:
    """:func:`decode`, then check the message is a ``cls``."""
    message = decode(data)
    if not isinstance(message, cls):
        raise MalformedMessage(f"expected a {cls.__name__}, got {type(message).__name__}")
    return message


_SCALARS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}


def _build(cls: type[_T], body: dict[str, Any]) -> _T:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"missing field {f.name!r}")
            continue
        value = _convert(f.name, str(f.type), body[f.name])
        if value is not None:
            _check_bounds(cls, f.name, value)
        kwargs[f.name] = value
    # Unknown fields are ignored: a newer minor writer may add optional fields.
    return cls(**kwargs)


_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "fence": (0, MAX_FENCE),
    "max_fence": (0, MAX_FENCE),
    "generation": (0, MAX_GENERATION),
    "max_workers": (1, MAX_COUNT),
    "restarts": (0, MAX_COUNT),
    "count": (0, MAX_COUNT),
    "hold": (0, MAX_COUNT),
    "pid": (0, MAX_COUNT),
    "seq": (0, MAX_FENCE),
    "base": (0, MAX_FENCE),
    "digest": (0, _DIGEST_MASK),
    "running": (0, MAX_COUNT),
}
_DURATIONS = frozenset({"heartbeat_timeout", "retry_in", "hold_for"})
_IDENTIFIERS: dict[str, int] = {"job_id": MAX_JOB_ID_LENGTH, "server_id": MAX_SERVER_TEXT_LENGTH}
"""Ids (made by :func:`~orchestratr_core.job.new_id`): printable, bounded length."""


def _check_bounds(cls: type, name: str, value: Any) -> None:
    """Refuse a value no storage or runtime could take (see the module docstring)."""
    if type(value) is int:
        low, high = _INT_BOUNDS.get(name, (0, MAX_COUNT))
        if not low <= value <= high:
            raise ValueError(f"field {name!r} must be within {low}..{high}")
    elif type(value) is float:
        high_f = MAX_DURATION if name in _DURATIONS else MAX_EPOCH
        if not 0.0 <= value <= high_f:  # NaN fails too
            raise ValueError(f"field {name!r} must be a number within 0..{high_f:.0f}")
    elif type(value) is str:
        if name == "argument":
            validate_argument(value)  # InvalidJobInput is a ValueError
        elif name == "checkpoint":
            validate_checkpoint(value)
        elif name == "job_id" and cls is CancelJob:
            _identifier(name, value, MAX_HOLD_MARK_LENGTH)  # a job id or a hold mark
        elif name == "error":
            if len(value) > MAX_ERROR_LENGTH:
                raise ValueError(f"field 'error' is longer than {MAX_ERROR_LENGTH} characters")
        elif name in _IDENTIFIERS:
            _identifier(name, value, _IDENTIFIERS[name])
        else:  # a job name, a server name, a host name
            _text(name, value, MAX_NAME_LENGTH if cls is JobMessage else MAX_SERVER_TEXT_LENGTH)


def _identifier(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise ValueError(f"field {name!r} is longer than {limit} characters")
    if not value.isprintable():
        raise ValueError(f"field {name!r} holds a control character, NUL or lone surrogate")


def _text(name: str, value: str, limit: int) -> None:
    """A name: bounded, and nothing a database cannot store (NUL, lone surrogates)."""
    if len(value) > limit:
        raise ValueError(f"field {name!r} is longer than {limit} characters")
    if "\x00" in value:
        raise ValueError(f"field {name!r} holds NUL")
    if not value.isascii():
        value.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate


def _convert(name: str, annotation: str, value: Any) -> Any:
    optional = annotation.endswith("| None")
    base = annotation.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise ValueError(f"field {name!r} must not be null")
    if base == "StopReason":
        return StopReason(value)
    if base == "tuple[RunningJob, ...]":
        return _running_jobs(name, value)
    if base == "tuple[str, ...]":
        return _strings(name, value)
    expected = _SCALARS.get(base)
    if expected is None:
        raise TypeError(f"no decoder for field {name!r} of type {annotation}")
    if not isinstance(value, expected) or (base != "bool" and isinstance(value, bool)):
        raise ValueError(f"field {name!r} must be {base}")
    return float(value) if base == "float" else value  # type: ignore[arg-type]


def _number(name: str, value: Any, high: float) -> float:
    """A JSON number (not ``true``/``false``) within 0..``high``, as a float."""
    kind = type(value)
    if kind is not float and kind is not int:
        raise ValueError(f"field {name!r} must be float")
    number = float(value)
    if not 0.0 <= number <= high:  # NaN fails too
        raise ValueError(f"field {name!r} must be a number within 0..{high:.0f}")
    return number


def _required(body: dict[str, Any], name: str) -> Any:
    value = body.get(name)
    if value is None:
        if name in body:
            raise ValueError(f"field {name!r} must not be null")
        raise ValueError(f"missing field {name!r}")
    return value


def _job_message(body: dict[str, Any]) -> JobMessage:
    """A :class:`JobMessage` with the same checks as the generic path
    (:func:`_build`), written out: ``type(...) is`` for exact JSON types, so that
    ``true`` is no number (bool is a subclass of int)."""
    job_id = _required(body, "job_id")
    if type(job_id) is not str:
        raise ValueError("field 'job_id' must be str")
    _identifier("job_id", job_id, MAX_JOB_ID_LENGTH)
    name = _required(body, "name")
    if type(name) is not str:
        raise ValueError("field 'name' must be str")
    _text("name", name, MAX_NAME_LENGTH)
    argument = _required(body, "argument")
    if type(argument) is not str:
        raise ValueError("field 'argument' must be str")
    validate_argument(argument)  # InvalidJobInput is a ValueError
    generation = _required(body, "generation")
    if type(generation) is not int:
        raise ValueError("field 'generation' must be int")
    if not 0 <= generation <= MAX_GENERATION:
        raise ValueError(f"field 'generation' must be within 0..{MAX_GENERATION}")
    created_at = _number("created_at", _required(body, "created_at"), MAX_EPOCH)
    timeout = body.get("heartbeat_timeout")
    if timeout is not None:
        timeout = _number("heartbeat_timeout", timeout, MAX_DURATION)
    checkpoint = body.get("checkpoint")
    if checkpoint is not None:
        if type(checkpoint) is not str:
            raise ValueError("field 'checkpoint' must be str")
        validate_checkpoint(checkpoint)
    kind = body.get("kind", DEFAULT_KIND)
    if type(kind) is not str:
        raise ValueError("field 'kind' must be str")
    _text("kind", kind, MAX_NAME_LENGTH)
    constraints = body.get("constraints")
    constraints = (
        ()
        if constraints is None and "constraints" not in body
        else (_strings("constraints", constraints))
    )
    spread = body.get("spread")
    if spread is not None:
        if type(spread) is not str:
            raise ValueError("field 'spread' must be str")
        _text("spread", spread, MAX_NAME_LENGTH)
    # Unknown fields are ignored, as in _build; __post_init__ checks kind,
    # constraints and spread as it does there.
    return JobMessage(
        job_id,
        name,
        argument,
        generation,
        created_at,
        timeout,
        checkpoint,
        kind,
        constraints,
        spread,
    )


_JOB_ARRAY = "[job_id, fence, last_heartbeat, restarts]"


def _running_jobs(name: str, value: Any) -> tuple[RunningJob, ...]:
    """The jobs of a heartbeat, from arrays (what this version writes) or objects
    (what older versions wrote). Hand-written: a heartbeat may carry tens of
    thousands of jobs, and the generic path costs several times as much."""
    if type(value) is not list:
        raise ValueError(f"field {name!r} must be a list")
    jobs: list[RunningJob] = []
    append = jobs.append
    for index, item in enumerate(value):
        if type(item) is list:
            if len(item) < 4:
                raise ValueError(
                    f"item {index} of {name!r} has {len(item)} value(s), expected 4: {_JOB_ARRAY}"
                )
            job_id, fence, beat, restarts = item[0], item[1], item[2], item[3]
            # type(...) is: exact types, so that true/false are no numbers (bool is
            # a subclass of int) -- json.loads only makes exact ints and floats.
            if type(job_id) is not str:
                raise ValueError(f"item {index} of {name!r}: job_id must be str")
            if len(job_id) > MAX_JOB_ID_LENGTH or not job_id.isprintable():
                raise ValueError(
                    f"item {index} of {name!r}: job_id must be printable, "
                    f"at most {MAX_JOB_ID_LENGTH} characters"
                )
            if type(fence) is not int or not 0 <= fence <= MAX_FENCE:
                raise ValueError(f"item {index} of {name!r}: fence must be int in 0..{MAX_FENCE}")
            if beat is not None:
                if type(beat) is not float:
                    if type(beat) is not int:
                        raise ValueError(
                            f"item {index} of {name!r}: last_heartbeat must be float or null"
                        )
                    beat = float(beat)
                if not 0.0 <= beat <= MAX_EPOCH:
                    raise ValueError(
                        f"item {index} of {name!r}: last_heartbeat out of 0..{MAX_EPOCH:.0f}"
                    )
            if type(restarts) is not int or not 0 <= restarts <= MAX_COUNT:
                raise ValueError(
                    f"item {index} of {name!r}: restarts must be int in 0..{MAX_COUNT}"
                )
            checkpoint = item[4] if len(item) > 4 else None
            if checkpoint is not None:
                if type(checkpoint) is not str:
                    raise ValueError(f"item {index} of {name!r}: checkpoint must be str or null")
                validate_checkpoint(checkpoint)
            append(RunningJob(job_id, fence, beat, restarts, checkpoint))
        elif isinstance(item, dict):
            append(_build(RunningJob, item))
        else:
            raise ValueError(f"items of {name!r} must be arrays {_JOB_ARRAY} or objects")
    return tuple(jobs)


_STRING_ITEM_LIMITS: dict[str, int] = {"started": MAX_JOB_ID_LENGTH, "gone": MAX_JOB_ID_LENGTH}
"""Longest item of a list of strings, by field (kinds, labels, constraints: 130)."""

_JOB_ID_LISTS = frozenset({"started", "gone"})
"""Lists of job ids in a heartbeat: up to one item per job the server ran."""


def _strings(name: str, value: Any) -> tuple[str, ...]:
    """A list of strings (``ServerHeartbeat.started`` and ``gone``: up to one per
    job; kinds, labels, constraints: at most 64)."""
    if type(value) is not list:
        raise ValueError(f"field {name!r} must be a list of str")
    limit = _STRING_ITEM_LIMITS.get(name, 130)
    if name not in _JOB_ID_LISTS and len(value) > 64:
        raise ValueError(f"field {name!r} holds more than 64 items")
    for index, item in enumerate(value):
        if type(item) is not str:
            raise ValueError(f"item {index} of {name!r} must be str")
        _identifier(f"{name}[{index}]", item, limit)
    return tuple(value)
