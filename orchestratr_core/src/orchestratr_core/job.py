"""The job domain: records, statuses, the one state machine, validation, ids and fences.

Every status change of a job goes through :data:`TRANSITIONS`. A storage backend
applies a transition as one guarded, atomic update (``UPDATE ... WHERE status IN
(...) AND <guard>``): a transition whose guard does not hold changes nothing and
is reported as not applied. Nothing in OrchestratR checks a status in Python and
then writes it.
"""

from __future__ import annotations

import enum
import json
import os
import threading
import time
import unicodedata
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime

from orchestratr_core.errors import InvalidJobInput
from orchestratr_core.placement import DEFAULT_KIND

__all__ = [
    "FENCE_GENERATION_SHIFT",
    "MAX_ARGUMENT_BYTES",
    "MAX_COUNT",
    "MAX_DURATION",
    "MAX_EPOCH",
    "MAX_ERROR_LENGTH",
    "MAX_FENCE",
    "MAX_GENERATION",
    "MAX_JOB_ID_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_SERVER_TEXT_LENGTH",
    "TRANSITIONS",
    "Guard",
    "JobArgument",
    "JobEvent",
    "JobPage",
    "JobQuery",
    "JobRecord",
    "JobStatus",
    "NewJob",
    "ServerQuery",
    "ServerRecord",
    "ServerStatus",
    "Transition",
    "TransitionResult",
    "bounded_text",
    "clean_text",
    "make_fence",
    "new_id",
    "split_fence",
    "utcnow",
    "validate_argument",
    "validate_name",
]

MAX_NAME_LENGTH = 200
"""Longest job name accepted, in characters."""

MAX_ARGUMENT_BYTES = 64 * 1024
"""Largest job argument accepted, in UTF-8 bytes. Job messages carry it whole."""

FENCE_GENERATION_SHIFT = 32
"""A fencing token is ``generation << 32 | delivery_count``."""

MAX_FENCE = 2**63 - 1
"""Largest fencing token: the largest value of a signed 64-bit column (``BIGINT``)."""

MAX_GENERATION = MAX_FENCE >> FENCE_GENERATION_SHIFT
"""Largest generation of a job message (2^31 - 1): the largest whose fencing
tokens still fit in :data:`MAX_FENCE`."""

MAX_COUNT = 2**31 - 1
"""Largest count (``max_workers``, restarts, a rebalancing count, a pid): the
largest value of a signed 32-bit column (``INTEGER``)."""

MAX_JOB_ID_LENGTH = 36
"""Longest job id, in characters (a UUID string; the id columns are this wide)."""

MAX_SERVER_TEXT_LENGTH = 255
"""Longest server id, server name and host name, in characters (their columns)."""

MAX_ERROR_LENGTH = 2000
"""Longest error text a server reports and a storage keeps, in characters."""

MAX_EPOCH = 253402300799.0
"""Latest time a message may carry, in epoch seconds (9999-12-31T23:59:59Z: the
end of every database's timestamp range)."""

MAX_DURATION = float(MAX_COUNT)
"""Longest duration a message may carry, in seconds (about 68 years)."""


def utcnow() -> datetime:
    """The current time, timezone-aware UTC, at microsecond precision."""
    return datetime.now(UTC)


_last_id = (0, 0)  # (millisecond, 12-bit sequence) of the last id this process made
_id_lock = threading.Lock()


def new_id() -> str:
    """A new time-ordered UUID (version 7 layout, RFC 9562 method 1: a counter in
    the 12 ``rand_a`` bits) as a string.

    Ids a process makes sort in the order it made them, even within one
    millisecond, so keyset paging on the id alone lists jobs in creation order,
    on every storage.
    """
    global _last_id  # noqa: PLW0603 - the per-process monotonic counter
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, seq = _last_id
        if ms <= last_ms:
            ms, seq = last_ms, seq + 1
            if seq > 0xFFF:  # 4096 ids in one millisecond: borrow the next one
                ms, seq = ms + 1, 0
        else:
            seq = 0
        _last_id = (ms, seq)
    rand = int.from_bytes(os.urandom(8), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76
    value |= seq << 64
    value |= 0b10 << 62
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF
    return str(uuid.UUID(int=value))


def make_fence(generation: int, delivery_count: int) -> int:
    """Combine the manager's generation of a job message and the broker's delivery
    count of that message into one fencing token.

    The generation grows each time the manager publishes a new message for the
    job; the delivery count grows each time the broker hands that message to a
    consumer. So the token grows with every new ownership.
    """
    if generation < 0 or delivery_count < 0:
        raise ValueError("generation and delivery count must not be negative")
    return (generation << FENCE_GENERATION_SHIFT) | min(delivery_count, 0xFFFF_FFFF)


def split_fence(fence: int) -> tuple[int, int]:
    """Inverse of :func:`make_fence`: ``(generation, delivery_count)``."""
    return fence >> FENCE_GENERATION_SHIFT, fence & 0xFFFF_FFFF


def validate_name(name: object) -> str:
    """Return ``name`` if it is an acceptable job name, else raise :class:`InvalidJobInput`.

    A name is 1 to :data:`MAX_NAME_LENGTH` characters, not blank, without leading
    or trailing white space and without control or format characters.
    """
    if not isinstance(name, str):
        raise InvalidJobInput(f"job name must be a string, not {type(name).__name__}")
    if name == "":
        raise InvalidJobInput("job name must not be empty")
    if name.strip() == "":
        raise InvalidJobInput("job name must not be blank")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidJobInput(
            f"job name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    if name != name.strip():
        raise InvalidJobInput("job name must not start or end with white space")
    for index, char in enumerate(name):
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise InvalidJobInput(
                f"job name contains the control character U+{ord(char):04X} at position {index}"
            )
    return name


def validate_argument(argument: object) -> str:
    """Return ``argument`` if it is an acceptable job argument, else raise
    :class:`InvalidJobInput`. Any string up to :data:`MAX_ARGUMENT_BYTES` bytes of
    UTF-8 is accepted (serialize structured data yourself, e.g. as JSON) except
    one holding NUL (U+0000), which PostgreSQL cannot store: refused here so that
    every storage accepts the same arguments."""
    return bounded_text(argument, "job argument", MAX_ARGUMENT_BYTES)


def bounded_text(value: object, what: str, limit: int, hint: str = "") -> str:
    """Return ``value`` if it is a string every storage keeps whole (no NUL, no
    lone surrogate) of at most ``limit`` bytes of UTF-8, else raise
    :class:`InvalidJobInput` naming it ``what`` (``hint`` ends the size error)."""
    if not isinstance(value, str):
        raise InvalidJobInput(f"{what} must be a string, not {type(value).__name__}")
    nul = value.find("\x00")
    if nul >= 0:
        raise InvalidJobInput(
            f"{what} contains NUL (U+0000) at position {nul}; no storage can keep it "
            "on every database (escape or encode binary data, e.g. as base64)"
        )
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidJobInput(f"{what} is not valid Unicode (lone surrogate)") from exc
    if size > limit:
        raise InvalidJobInput(f"{what} is {size} bytes; the limit is {limit} bytes{hint}")
    return value


def clean_text(text: str, limit: int = MAX_ERROR_LENGTH) -> str:
    """``text`` as every storage can keep it: NUL written as ``\\x00`` and lone
    surrogates as ``\\udXXX`` (no database stores those), cut to ``limit``
    characters. For free texts a server reports (a job's error), which may come
    from a C library or a binary protocol. Idempotent."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:limit]


class JobStatus(enum.StrEnum):
    """Where a job is in its life. ``deleted`` and ``completed`` are final."""

    PENDING = "pending"
    """Created or handed back; its message waits in the jobs queue (or is between servers)."""
    PROCESSING = "processing"
    """A server reported that it runs the job (``server_id``, ``fence``)."""
    DELETING = "deleting"
    """Cancellation requested and durable; not yet confirmed by a server."""
    DELETED = "deleted"
    """Cancelled and confirmed: the job will never run again."""
    COMPLETED = "completed"
    """The job function returned normally; the job will not run again."""
    PAUSING = "pausing"
    """Pause requested and durable; not yet confirmed stopped by a server."""
    PAUSED = "paused"
    """Paused and confirmed: no server runs it until it is resumed."""
    QUARANTINED = "quarantined"
    """Its restart budget is spent; held like a paused job until it is resumed."""

    @property
    def final(self) -> bool:
        """True for statuses a job never leaves."""
        return self in (JobStatus.DELETED, JobStatus.COMPLETED)

    @property
    def held(self) -> bool:
        """True for statuses in which no server may run the job, until a resume."""
        return self in (JobStatus.PAUSING, JobStatus.PAUSED, JobStatus.QUARANTINED)


class ServerStatus(enum.StrEnum):
    """What the manager believes about a server process."""

    ALIVE = "alive"
    DRAINING = "draining"
    DEAD = "dead"
    """Missed heartbeats for longer than the manager's server timeout."""
    LEFT = "left"
    """Said goodbye after a graceful shutdown."""


class Guard(enum.StrEnum):
    """The condition, besides the source status, under which a transition applies.

    ``:server`` and ``:fence`` are the values reported with the event.
    """

    NONE = "none"
    """No further condition."""
    OWNER = "owner"
    """``server_id = :server AND fence = :fence``: only the current owner may do it."""
    NEWER = "newer"
    """``fence < :fence OR (fence = :fence AND (server_id IS NULL OR server_id = :server))``:
    a report wins if its token is newer; an equal token wins only if nobody else owns it."""
    NOT_OLDER = "not_older"
    """``server_id IS NULL OR fence <= :fence``: nobody owns it, or the report is
    at least as new as the recorded owner (who is then stale: it already moved)."""
    UNOWNED = "unowned"
    """``server_id IS NULL``: no server holds a copy (a held job confirmed stopped)."""


class JobEvent(enum.StrEnum):
    """The events that change a job's row. See :data:`TRANSITIONS`."""

    START = "start"
    """A server reports it runs the job with a token (from a start or a heartbeat)."""
    RELEASE = "release"
    """The owner stopped the job and gave its message back (drain, rebalance, loss)."""
    COMPLETE = "complete"
    """The owner's job function returned normally."""
    FAIL = "fail"
    """The owner's job function raised; it will be restarted (``restarts``, ``last_error``)."""
    CANCEL = "cancel"
    """A client asked for the job to be cancelled."""
    CONFIRM_DELETED = "confirm_deleted"
    """A server stopped a cancelled job, or dropped a queued message of one."""
    SERVER_LOST = "server_lost"
    """The job's server is dead or left; its message went back to the queue."""
    PAUSE = "pause"
    """A client asked for the job to be paused (durable, like a cancel)."""
    CONFIRM_HELD = "confirm_held"
    """A server stopped a held job's copy, or dropped a queued message of it:
    ``pausing`` becomes ``paused``, ``quarantined`` stays, the owner is cleared."""
    RESUME = "resume"
    """A client resumed a paused or quarantined job: ``pending`` with a new generation."""
    QUARANTINE = "quarantine"
    """The job's restart budget is spent: held until resumed."""


@dataclass(frozen=True)
class Transition:
    """One edge set of the state machine.

    :param sources: the statuses the job must be in.
    :param target: the status afterwards; ``None`` keeps the current one.
    :param guard: further condition on ``server_id`` / ``fence``.
    :param sets_owner: on success ``server_id := :server`` and ``fence := :fence``
        (and ``started_at := now`` when the owner or fence changed,
        ``last_heartbeat := now``).
    :param clears_owner: on success ``server_id := NULL`` (the fence is kept: it
        only ever grows).
    """

    sources: frozenset[JobStatus]
    target: JobStatus | None
    guard: Guard
    sets_owner: bool = False
    clears_owner: bool = False


_LIVE = frozenset({JobStatus.PENDING, JobStatus.PROCESSING})

TRANSITIONS: dict[JobEvent, Transition] = {
    JobEvent.START: Transition(_LIVE, JobStatus.PROCESSING, Guard.NEWER, sets_owner=True),
    JobEvent.RELEASE: Transition(
        frozenset({JobStatus.PROCESSING}), JobStatus.PENDING, Guard.OWNER, clears_owner=True
    ),
    JobEvent.COMPLETE: Transition(
        frozenset({JobStatus.PROCESSING, JobStatus.PENDING}),
        JobStatus.COMPLETED,
        Guard.NOT_OLDER,
        clears_owner=True,
    ),
    JobEvent.FAIL: Transition(frozenset({JobStatus.PROCESSING}), None, Guard.OWNER),
    JobEvent.CANCEL: Transition(
        _LIVE | {JobStatus.PAUSING, JobStatus.PAUSED, JobStatus.QUARANTINED},
        JobStatus.DELETING,
        Guard.NONE,
    ),
    JobEvent.CONFIRM_DELETED: Transition(
        frozenset({JobStatus.DELETING}),
        JobStatus.DELETED,
        Guard.NOT_OLDER,
        clears_owner=True,
    ),
    JobEvent.SERVER_LOST: Transition(
        frozenset(
            {JobStatus.PROCESSING, JobStatus.DELETING, JobStatus.PAUSING, JobStatus.QUARANTINED}
        ),
        None,  # processing -> pending is special-cased below; deleting stays deleting
        Guard.NONE,
        clears_owner=True,
    ),
    # Lifecycle controls (orchestratr_core.lifecycle): a held job is kept off every
    # server by a hold mark in the servers' cancellation set.
    JobEvent.PAUSE: Transition(_LIVE, JobStatus.PAUSING, Guard.NONE),
    JobEvent.CONFIRM_HELD: Transition(
        frozenset({JobStatus.PAUSING, JobStatus.QUARANTINED}),
        None,  # pausing -> paused is special-cased; quarantined stays quarantined
        Guard.NOT_OLDER,
        clears_owner=True,
    ),
    JobEvent.RESUME: Transition(
        frozenset({JobStatus.PAUSED, JobStatus.QUARANTINED}), JobStatus.PENDING, Guard.UNOWNED
    ),
    JobEvent.QUARANTINE: Transition(
        frozenset({JobStatus.PROCESSING}), JobStatus.QUARANTINED, Guard.OWNER
    ),
}
"""The one job state machine. Storage backends implement these rows exactly.

``SERVER_LOST`` is applied in bulk to every job whose ``server_id`` is the lost
server: ``processing`` becomes ``pending``, ``deleting``, ``pausing`` and
``quarantined`` stay as they are, and the owner is cleared in every case.

``CONFIRM_HELD`` of a ``pausing`` job with ``update_pending`` (its argument was
updated while it ran or waited: ``Storage.request_update``) makes it ``pending``
instead of ``paused``, with ``generation + 1``, ``fence`` raised to
``make_fence(generation + 1, 0)`` (a copy of any older message, which carries the
old argument, fails ``START``'s guard), ``update_pending`` cleared and a
``PUBLISH`` outbox row, in the same transaction: the restart with the new
argument is never lost, and starts only once the old copy is confirmed stopped.

``START`` of a job updated in place (``inplace_floor`` set:
``Storage.request_update_in_place``) also needs a fence of a generation above
``inplace_floor``, unless it is the recorded owner's own fence (its copy took the
new argument): a copy of an older message carries the old argument. Every
release of a ``processing`` job with ``inplace_floor >= generation``
(``RELEASE``, ``SERVER_LOST``) makes it ``pending`` under ``generation + 1``, its
fence raised to ``make_fence(generation + 1, 0)``, with a ``PUBLISH`` outbox row,
in the same transaction (``Storage.expire_servers``).

``RESUME`` also raises the job's ``generation`` by one (its new message is not
covered by the hold mark of the old one) and empties its failure log (a fresh
restart budget). ``PAUSE`` keeps
the owner (it confirms, as for a cancel); ``QUARANTINE`` keeps it too.

A deleted or completed job never changes again: no transition has a final
status as a source (this is defect 7 of the original: any "started" report used
to move a job back to processing, even a deleted one).
"""


@dataclass(frozen=True)
class JobArgument:
    """What a job function receives as its first parameter."""

    job_id: str
    """The job's id (time-ordered UUID string)."""
    name: str
    """The job's name, unique in the cluster among jobs that are not deleted."""
    argument: str
    """The argument string given to ``create_job``."""
    fence: int
    """The fencing token of this ownership: every new owner of the job gets a
    larger one. Pass it to downstream systems so they can reject a stale owner."""
    checkpoint: str | None = None
    """The latest checkpoint an earlier owner recorded (``heartbeat(checkpoint=...)``)
    that reached the manager, or ``None`` (first start, or none recorded)."""
    kind: str = DEFAULT_KIND
    """The job's kind (the function a server runs it with is the one for this kind)."""


@dataclass(frozen=True)
class NewJob:
    """A validated request to create a job."""

    id: str
    name: str
    argument: str
    created_at: datetime
    generation: int = 1
    heartbeat_timeout: float | None = None
    """Watchdog: restart the job if it does not call ``heartbeat()`` this often (s)."""
    max_restarts: int | None = None
    """The restart budget (see :attr:`JobRecord.max_restarts`)."""
    restart_window: float | None = None
    """The restart budget's window in seconds (see :attr:`JobRecord.restart_window`)."""
    kind: str = DEFAULT_KIND
    """The job's kind (validated)."""
    constraints: tuple[str, ...] = ()
    """Hard constraints on server labels, canonical (``placement.parse_constraints``)."""
    spread: str | None = None
    """Spread group (anti-affinity), if any."""

    def record(self) -> JobRecord:
        """The job as a storage holds it right after creating it: ``pending``, on
        no server, fence 0."""
        return JobRecord(
            id=self.id,
            name=self.name,
            argument=self.argument,
            status=JobStatus.PENDING,
            server_id=None,
            fence=0,
            generation=self.generation,
            created_at=self.created_at,
            updated_at=self.created_at,
            heartbeat_timeout=self.heartbeat_timeout,
            max_restarts=self.max_restarts,
            restart_window=self.restart_window,
            kind=self.kind,
            constraints=self.constraints,
            spread=self.spread,
        )


@dataclass(frozen=True)
class JobRecord:
    """A job as the storage knows it."""

    id: str
    name: str
    argument: str
    status: JobStatus
    server_id: str | None
    fence: int
    generation: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    last_heartbeat: datetime | None = None
    restarts: int = 0
    last_error: str | None = None
    reason: str | None = None
    """Why the job last changed status when that was not obvious (e.g. ``server dead``)."""
    heartbeat_timeout: float | None = None
    """The job's watchdog timeout in seconds, if it has one."""
    checkpoint: str | None = None
    """The latest checkpoint the job recorded (see :class:`JobArgument`)."""
    checkpoint_fence: int | None = None
    """The fencing token of the owner that wrote ``checkpoint`` (it only grows)."""
    checkpoint_at: datetime | None = None
    """When ``checkpoint`` was stored."""
    max_restarts: int | None = None
    """The restart budget: at most this many failures within ``restart_window``
    (``None``: the default of :mod:`orchestratr_core.lifecycle`)."""
    restart_window: float | None = None
    """Seconds of the restart budget's window (``None``: the default)."""
    failure_seq: int = 0
    """The compare-and-set token of ``failure_log``: one more per failure counted
    and per resume (which empties the log: a count read before it must lose)."""
    failure_log: str | None = None
    """The latest failures as JSON ``[[epoch, error], ...]``
    (:func:`orchestratr_core.lifecycle.failure_log` reads it)."""
    kind: str = DEFAULT_KIND
    """The job's kind."""
    constraints: tuple[str, ...] = ()
    """Hard constraints on the labels of the server that runs it (canonical texts)."""
    spread: str | None = None
    """The job's spread group, if any."""
    pending_reason: str | None = None
    """Why a pending job waits, as the leading manager last worked it out from the
    live servers' kinds and labels (``None`` while it runs)."""
    server_seen: datetime | None = None
    """When the server running the job was last heard, for a job ``processing`` on
    a live server (filled by the monitor's reads; ``None`` otherwise)."""
    argument_version: int = 0
    """How many times the argument was updated (``OrchestratorClient.update``)."""
    argument_updated_at: datetime | None = None
    """When the argument was last updated (``None``: never)."""
    update_pending: bool = False
    """An update waits for the running copy to stop: once a server confirms it
    stopped (``CONFIRM_HELD`` of the ``pausing`` job), the job is ``pending``
    again under a new generation, with the new argument."""
    update_floor: int | None = None
    """The generation the latest update superseded: servers drop every message of
    the job up to it (they carry an older argument)."""
    inplace_floor: int | None = None
    """The generation whose running copy was given the latest argument in place
    (``Storage.request_update`` of a job whose owner runs its kind
    :func:`~orchestratr_core.lifecycle.updatable`): servers drop every message of
    the job up to it without stopping that copy (a drop mark), and while
    ``inplace_floor >= generation`` every release of the job republishes it
    under a new generation with the new argument."""
    argument_applied_version: int = 0
    """The latest argument version the running copy acknowledged taking in place
    (``JobUpdated``); 0: none."""

    @property
    def update_mode(self) -> str | None:
        """How the latest update reaches the job's current generation:
        ``"in_place"`` (its running copy is given the argument without a
        restart; applied once ``argument_applied_version`` reaches
        ``argument_version``), ``"restart"`` (a restart with it, or the next start
        carries it), or ``None`` (never updated)."""
        if self.argument_version == 0:
            return None
        if self.inplace_floor is not None and self.inplace_floor >= self.generation:
            return "in_place"
        return "restart"

    @property
    def liveness(self) -> datetime | None:
        """When the job was last known to be alive: its server's last heartbeat
        while it runs on a live server (a healthy job is as alive as its server,
        and idle jobs are not in every heartbeat), else the job's own stored beat
        (``last_heartbeat``: kept fresh for jobs with a watchdog)."""
        return self.server_seen if self.server_seen is not None else self.last_heartbeat

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (datetimes as ISO 8601)."""
        return {
            "id": self.id,
            "name": self.name,
            "argument": self.argument,
            "status": self.status.value,
            "server_id": self.server_id,
            "fence": self.fence,
            "generation": self.generation,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "started_at": _iso(self.started_at),
            "last_heartbeat": _iso(self.last_heartbeat),
            "restarts": self.restarts,
            "last_error": self.last_error,
            "reason": self.reason,
            "heartbeat_timeout": self.heartbeat_timeout,
            "checkpoint_size": (
                None if self.checkpoint is None else len(self.checkpoint.encode("utf-8"))
            ),
            "checkpoint_fence": self.checkpoint_fence,
            "checkpoint_at": _iso(self.checkpoint_at),
            "max_restarts": self.max_restarts,
            "restart_window": self.restart_window,
            "quarantine_reason": self.reason if self.status is JobStatus.QUARANTINED else None,
            "failures": self.failure_seq,
            "last_errors": _errors(self.failure_log),
            "kind": self.kind,
            "constraints": list(self.constraints),
            "spread": self.spread,
            "pending_reason": self.pending_reason if self.status is JobStatus.PENDING else None,
            "liveness": _iso(self.liveness),
            "argument_version": self.argument_version,
            "argument_updated_at": _iso(self.argument_updated_at),
            "update_pending": self.update_pending,
            "update_mode": self.update_mode,
            "argument_applied_version": self.argument_applied_version,
        }


@dataclass(frozen=True)
class ServerRecord:
    """A server process as the manager knows it."""

    id: str
    name: str
    max_workers: int
    status: ServerStatus
    started_at: datetime
    last_seen: datetime
    host: str = ""
    pid: int = 0
    running: tuple[JobRecord, ...] = ()
    """Jobs the storage records as running on this server (filled by monitor queries)."""
    kinds: tuple[str, ...] = (DEFAULT_KIND,)
    """The job kinds the server runs."""
    labels: tuple[str, ...] = ()
    """The server's labels, sorted ``KEY=VALUE`` texts."""
    updatable: tuple[str, ...] | None = None
    """The kinds the server applies argument updates to in place
    (``ServerHeartbeat.updatable``); ``None``: a server that reads no drop marks
    (of an older version), so that no update is applied in place while it lives."""

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict, shaped like the original's server JSON."""
        return {
            "id": self.id,
            "name": self.name,
            "max_workers": self.max_workers,
            "status": self.status.value,
            "started_at": _iso(self.started_at),
            "last_seen": _iso(self.last_seen),
            "host": self.host,
            "pid": self.pid,
            "kinds": list(self.kinds),
            "labels": dict(label.split("=", 1) for label in self.labels),
            "updatable": None if self.updatable is None else list(self.updatable),
            "jobs": [
                {"id": j.id, "name": j.name, "status": j.status.value, "fence": j.fence}
                for j in self.running
            ],
        }


@dataclass(frozen=True)
class TransitionResult:
    """The outcome of applying a :class:`JobEvent` to one job."""

    applied: bool
    """True if the guarded update changed the row."""
    job: JobRecord | None
    """The row after the attempt (unchanged when not applied); ``None`` if no such job."""


@dataclass(frozen=True)
class JobQuery:
    """Filters and paging for job listings.

    Jobs are listed in creation order (ascending id). Use ``after`` (the last id
    of the previous page) for keyset paging, which stays fast at any depth;
    ``offset`` is accepted for convenience and costs more the deeper it goes.
    """

    statuses: frozenset[JobStatus] | None = None
    name_prefix: str | None = None
    server_id: str | None = None
    kind: str | None = None
    """Only jobs of this kind."""
    include_deleted: bool = False
    """When ``statuses`` is None, deleted jobs are left out unless this is True."""
    after: str | None = None
    offset: int = 0
    limit: int | None = 100
    """``None`` means no limit (admin monitor)."""


@dataclass(frozen=True)
class JobPage:
    """One page of jobs."""

    items: tuple[JobRecord, ...]
    next_cursor: str | None
    """Pass as ``JobQuery.after`` to get the next page; ``None`` on the last page."""
    total: int | None = None
    """How many jobs match the filters (when asked for)."""


@dataclass(frozen=True)
class ServerQuery:
    """Filters for server listings."""

    statuses: frozenset[ServerStatus] | None = field(
        default_factory=lambda: frozenset({ServerStatus.ALIVE, ServerStatus.DRAINING})
    )
    """``None`` lists every server ever seen, dead and left ones too."""
    name_prefix: str | None = None
    with_jobs: bool = True
    label: str | None = None
    """Only servers with this ``KEY=VALUE`` label."""
    kind: str | None = None
    """Only servers that run this kind."""


def _errors(log: str | None) -> list[dict[str, object]]:
    """A failure log as JSON-ready dicts (``at`` in ISO 8601), oldest first."""
    if not log:
        return []
    try:
        return [
            {"at": datetime.fromtimestamp(float(at), UTC).isoformat(), "error": str(error)}
            for at, error in json.loads(log)
        ]
    except (ValueError, TypeError):
        return []


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def statuses_of(values: Collection[str]) -> frozenset[JobStatus]:
    """Parse status names (case-insensitive); raise :class:`InvalidJobInput` on an unknown one."""
    out = set()
    for value in values:
        try:
            out.add(JobStatus(value.strip().lower()))
        except ValueError as exc:
            known = ", ".join(s.value for s in JobStatus)
            raise InvalidJobInput(f"unknown job status {value!r}; known: {known}") from exc
    return frozenset(out)
