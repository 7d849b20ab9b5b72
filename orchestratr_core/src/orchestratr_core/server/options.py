"""What a server is told at construction: its timings (:class:`ServerOptions`)
and the checks of its name."""

from __future__ import annotations

from dataclasses import dataclass

from orchestratr_core.errors import ConfigurationError
from orchestratr_core.job import MAX_SERVER_TEXT_LENGTH

__all__ = ["ServerOptions", "check_server_name"]


@dataclass(frozen=True)
class ServerOptions:
    """Timings of a server. The defaults suit most fleets."""

    heartbeat_interval: float = 2.0
    """Seconds between heartbeats to the manager (one message for all jobs)."""
    stop_grace: float = 10.0
    """Seconds a job has to honour its stop token before it is cancelled hard."""
    restart_initial: float = 1.0
    """Backoff before the first restart of a job function that raised."""
    restart_max: float = 60.0
    """Longest backoff between restarts."""
    restart_reset_after: float = 60.0
    """A job that ran this long before raising starts its backoff afresh."""
    connect_retry_max: float = 30.0
    """Longest wait between attempts to reach the broker at start."""
    freeze_gc: bool = True
    """Keep the objects of long-running jobs out of the garbage collector's full
    passes once a server holds thousands of them (:class:`GcFreezer`)."""
    checkpoint_wait: float = 5.0
    """Seconds a job taken from a redelivered message (its previous owner died or
    handed it back) waits for the manager to send its latest checkpoint before
    the job function starts without it (no manager running, or one of an older
    version). Only for job functions marked
    :func:`~orchestratr_core.lifecycle.checkpointed`."""
    move_after_failures: int = 3
    """After this many failures in a row of a job function here (exceptions and
    watchdog stops, restarted in place with backoff), the server hands the job's
    message back so that a different server takes the next start, and bounces
    it for :attr:`avoid_for` seconds (a few times at most: with no other server
    it comes back and runs here). ``0`` keeps restarting in place for ever."""
    avoid_for: float = 30.0
    """Seconds a server hands back a job that it moved away after failures."""

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval", "restart_initial", "restart_max"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be > 0")
        if self.stop_grace < 0:
            raise ConfigurationError("stop_grace must be >= 0")
        if self.move_after_failures < 0 or self.avoid_for < 0:
            raise ConfigurationError("move_after_failures and avoid_for must be >= 0")


def check_server_name(name: object) -> None:
    """A server name every storage keeps: 1..255 characters, not blank, no
    control characters (heartbeats carry it to the manager's database)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError("server name must be a non-empty string")
    if len(name) > MAX_SERVER_TEXT_LENGTH:
        raise ConfigurationError(
            f"server name is {len(name)} characters long; the limit is {MAX_SERVER_TEXT_LENGTH}"
        )
    if not name.isprintable():
        raise ConfigurationError("server name must not hold control characters (NUL, newline...)")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError("server name is not valid Unicode (lone surrogate)") from None
