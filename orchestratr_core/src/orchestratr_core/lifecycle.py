"""Lifecycle controls of a long-running job: pause and resume, checkpoints, and
the restart budget.

Held jobs (``pausing``, ``paused``, ``quarantined``; :attr:`JobStatus.held`) are
kept off every server the way cancelled ones are: through the durable
cancellation set that servers read before their first job delivery. A held job
is written there as a *hold mark*, ``"<job id>@<generation>"``: a server drops
every message of the job whose generation is at most the mark's, and stops a
copy it runs of such a generation. Unlike a cancellation, a hold is reversible:
``resume`` raises the job's generation, and the message of the new generation
is not covered by the old mark (servers never forget a mark, and need not).

A *drop mark*, ``"<job id>@<generation>!"`` (:func:`drop_mark`), makes servers drop
every message of the job up to that generation without stopping a running copy
of it: for a copy that took a new argument in place (:func:`updatable`), whose
older message must never start again.

A server of an older version reads a hold mark as the id of a job that does not
exist, and a ``CancelJob`` carrying one as malformed: it ignores both, so a mixed
fleet keeps running (such a server does not pause jobs; the manager still stops
its copies with a ``StopJob`` when its heartbeats show them).

Checkpoints (``heartbeat(checkpoint=...)``) travel with the server's heartbeats
and are stored under a fence guard: a checkpoint is kept only if its writer is
the job's recorded owner under its fencing token (``Guard.OWNER``) and that
token is not below the stored checkpoint's. What is
promised: the next owner receives the last checkpoint that reached the manager
before it took the job; a checkpoint recorded between the last heartbeat and a
crash is lost.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from orchestratr_core.errors import InvalidJobInput
from orchestratr_core.job import (
    MAX_COUNT,
    MAX_GENERATION,
    MAX_JOB_ID_LENGTH,
    JobRecord,
    bounded_text,
)

__all__ = [
    "CHECKPOINTED_ATTRIBUTE",
    "DEFAULT_MAX_RESTARTS",
    "DEFAULT_RESTART_WINDOW",
    "DROP_SUFFIX",
    "FAILURE_LOG_LENGTH",
    "HOLD_SEPARATOR",
    "MAX_CHECKPOINT_BYTES",
    "MAX_HOLD_MARK_LENGTH",
    "MAX_RESTART_WINDOW",
    "UPDATABLE_ATTRIBUTE",
    "Failure",
    "checkpointed",
    "count_failure",
    "drop_mark",
    "failure_log",
    "hold_mark",
    "is_checkpointed",
    "is_updatable",
    "parse_drop",
    "parse_hold",
    "updatable",
    "validate_checkpoint",
    "validate_restart_budget",
]

CHECKPOINTED_ATTRIBUTE = "orchestratr_checkpointed"
"""Set on a job function by :func:`checkpointed`."""

UPDATABLE_ATTRIBUTE = "orchestratr_updatable"
"""Set on a job function by :func:`updatable`."""

MAX_CHECKPOINT_BYTES = 64 * 1024
"""Largest checkpoint a job may record, in UTF-8 bytes."""

HOLD_SEPARATOR = "@"
"""Between the job id and the generation in a hold mark (never in a job id)."""

DROP_SUFFIX = "!"
"""Ends a drop mark (:func:`drop_mark`)."""

MAX_HOLD_MARK_LENGTH = MAX_JOB_ID_LENGTH + 1 + len(str(MAX_GENERATION)) + len(DROP_SUFFIX)
"""Longest mark: a job id, the separator, a generation (and a drop mark's suffix)."""

DEFAULT_MAX_RESTARTS = 20
"""Failures (exceptions and owner deaths) a job may have within its window
before it is quarantined, when it was created without a budget of its own."""

DEFAULT_RESTART_WINDOW = 600.0
"""Seconds of the default restart budget's window."""

MAX_RESTART_WINDOW = 30 * 86400.0
"""Longest restart window accepted, in seconds."""


_F = TypeVar("_F", bound=Callable[..., Any])


def checkpointed(func: _F) -> _F:
    """Mark a job function that resumes from ``arg.checkpoint``: a server running
    it waits, when it takes a *redelivered* message (the previous owner died,
    handed it back or was cut off), for the manager to send the latest stored
    checkpoint before it calls the function (at most
    ``ServerOptions.checkpoint_wait``). Unmarked functions start at once with the
    checkpoint their message carries (the one stored when it was published),
    so that a fleet without checkpoints fails over as fast as before, also while
    no manager runs."""
    setattr(func, CHECKPOINTED_ATTRIBUTE, True)
    return func


def is_checkpointed(func: object) -> bool:
    """True if :func:`checkpointed` marked ``func``."""
    return getattr(func, CHECKPOINTED_ATTRIBUTE, False) is True


def updatable(func: _F) -> _F:
    """Mark a job function that takes a new argument while it runs: its
    ``heartbeat`` (an :class:`~orchestratr_core.runner.UpdatableHeartbeat`) has
    ``heartbeat.argument`` (the latest :class:`~orchestratr_core.job.JobArgument`)
    and ``async for arg in heartbeat.updates()`` (each newer one, until the job is
    told to stop). A server running it announces the kind in its heartbeats
    (``ServerHeartbeat.updatable``) and applies a manager's
    :class:`~orchestratr_core.protocol.UpdateJob` to the running copy, reporting
    :class:`~orchestratr_core.protocol.JobUpdated`. Unmarked functions never see an
    update in place: ``client.update`` restarts them with the new argument."""
    setattr(func, UPDATABLE_ATTRIBUTE, True)
    return func


def is_updatable(func: object) -> bool:
    """True if :func:`updatable` marked ``func``."""
    return getattr(func, UPDATABLE_ATTRIBUTE, False) is True


def hold_mark(job_id: str, generation: int) -> str:
    """The cancellation-set entry that holds every message of ``job_id`` up to
    ``generation``."""
    return f"{job_id}{HOLD_SEPARATOR}{generation}"


def parse_hold(entry: str) -> tuple[str, int] | None:
    """``(job_id, generation)`` of a hold mark, ``None`` for a plain job id (a
    cancellation) or anything else."""
    job_id, separator, generation = entry.rpartition(HOLD_SEPARATOR)
    if not separator or not job_id or len(job_id) > MAX_JOB_ID_LENGTH:
        return None
    if not generation.isascii() or not generation.isdigit() or len(generation) > 10:
        return None
    value = int(generation)
    return (job_id, value) if value <= MAX_GENERATION else None


def drop_mark(job_id: str, generation: int) -> str:
    """The cancellation-set entry that makes servers drop every undelivered or
    redelivered message of ``job_id`` up to ``generation``, *without* stopping a
    copy that runs one (a hold mark stops it): for a job whose running copy took a
    new argument in place, so that its older message never starts again with the
    old one. A server of an older version reads it as the id of a job that does
    not exist and ignores it."""
    return f"{hold_mark(job_id, generation)}{DROP_SUFFIX}"


def parse_drop(entry: str) -> tuple[str, int] | None:
    """``(job_id, generation)`` of a drop mark, ``None`` for anything else."""
    if not entry.endswith(DROP_SUFFIX):
        return None
    return parse_hold(entry[: -len(DROP_SUFFIX)])


def validate_checkpoint(checkpoint: object) -> str:
    """Return ``checkpoint`` if a job may record it, else raise
    :class:`InvalidJobInput`: a string of at most :data:`MAX_CHECKPOINT_BYTES`
    bytes of UTF-8, without NUL (no storage keeps it everywhere)."""
    return bounded_text(
        checkpoint,
        "checkpoint",
        MAX_CHECKPOINT_BYTES,
        " (keep a checkpoint small: a position, an offset, a cursor)",
    )


def validate_restart_budget(
    max_restarts: object, restart_window: object
) -> tuple[int | None, float | None]:
    """A job's restart budget as given at create (``None``: the default), checked;
    :class:`InvalidJobInput` for anything else."""
    if max_restarts is not None and (
        isinstance(max_restarts, bool)
        or not isinstance(max_restarts, int)
        or not 0 <= max_restarts <= MAX_COUNT
    ):
        raise InvalidJobInput(f"max_restarts must be a whole number within 0..{MAX_COUNT}")
    if restart_window is not None and (
        isinstance(restart_window, bool)
        or not isinstance(restart_window, int | float)
        or not 0 < restart_window <= MAX_RESTART_WINDOW
    ):
        raise InvalidJobInput(
            f"restart_window must be a number of seconds in (0, {MAX_RESTART_WINDOW:.0f}]"
        )
    return max_restarts, None if restart_window is None else float(restart_window)


FAILURE_LOG_LENGTH = 10
"""How many of a job's latest failures its record keeps (``failure_log``)."""

_LOGGED_ERROR_LENGTH = 500


@dataclass(frozen=True)
class Failure:
    """One failure of a job: its function raised, or its server died holding it."""

    at: float
    """When, in epoch seconds."""
    error: str
    """What happened (an exception's text, or ``owner died: <server>``)."""

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {"at": self.at, "error": self.error}


def failure_log(job: JobRecord) -> list[Failure]:
    """The job's latest failures, oldest first (an unreadable log reads as empty)."""
    if not job.failure_log:
        return []
    try:
        items = json.loads(job.failure_log)
        return [Failure(float(at), str(error)) for at, error in items]
    except (ValueError, TypeError):
        return []


def count_failure(job: JobRecord, at: float, error: str) -> tuple[str, str | None]:
    """The job's failure log with one more failure, and the quarantine reason if
    that spends its restart budget (more than ``max_restarts`` failures within
    ``restart_window`` seconds up to ``at``), else ``None``."""
    limit = DEFAULT_MAX_RESTARTS if job.max_restarts is None else job.max_restarts
    window = DEFAULT_RESTART_WINDOW if job.restart_window is None else job.restart_window
    failures = [*failure_log(job), Failure(at, error[:_LOGGED_ERROR_LENGTH])]
    failures = failures[-max(FAILURE_LOG_LENGTH, min(limit + 1, 100)) :]
    recent = sum(1 for f in failures if f.at > at - window)
    text = json.dumps([[f.at, f.error] for f in failures], ensure_ascii=False)
    if recent > limit:
        return text, (
            f"restart budget spent: {recent} failures within {window:g} s "
            f"(at most {limit} allowed); last: {error[:200]}"
        )
    return text, None
