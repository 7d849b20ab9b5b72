"""Where the PostgreSQL transport's tables live and the timings that keep jobs single-owner.

URL: the storage's (``postgresql://user:password@host:5432/dbname?schema=name``), plus
the transport options below as query parameters or keyword options (which win). The
storage options a URL may carry (``schema``, ``connect_timeout``, ``command_timeout``,
``statement_cache_size``...) mean what they mean for the storage, so one URL can serve
``--storage`` and ``--transport``; pool options are accepted and unused.

The timing options and the inequality between them are the fencing arithmetic of
``docs/postgresql-transport.md``: a server stops its jobs ``fence_timeout`` seconds
after its last answered statement was sent; PostgreSQL ends the silent session, and
with it the lock that says the jobs are held, no sooner than ``session_timeout``
seconds after the last statement it received.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from orchestratr_core.errors import ConfigurationError
from orchestratr_core.options import check_known, coerce, merge, split_query
from orchestratr_core.signing import Signer, load_signer
from orchestratr_sql.url import DatabaseUrl, parse_url

__all__ = ["DEFAULTS", "PgTransportSettings"]

DEFAULTS: dict[str, Any] = {
    "namespace": "orchestratr",
    "heartbeat": 1.0,
    "fence_timeout": 3.0,
    "session_timeout": 8.0,
    "poll_interval": 5.0,
    "reconnect_delay": 0.1,
    "reconnect_max_delay": 2.0,
    "event_retry_delay": 0.2,
    "claim_batch": 100,
    "command_retention": 600.0,
    "connect_attempts": 3,
    "signing_key_file": None,
}
"""Every transport option with its default (seconds where a time)."""

_FLOATS = {
    "heartbeat",
    "fence_timeout",
    "session_timeout",
    "poll_interval",
    "reconnect_delay",
    "reconnect_max_delay",
    "event_retry_delay",
    "command_retention",
}
_INTS = {"claim_batch", "connect_attempts"}


@dataclass(frozen=True)
class PgTransportSettings:
    """The parsed URL and options of one :class:`~orchestratr_sql.pgtransport.PostgresTransport`."""

    url: DatabaseUrl
    namespace: str = "orchestratr"
    """Table prefix (``<namespace>_jobs``...): several fleets may share one schema."""
    heartbeat: float = 1.0
    """Seconds between the pings that prove the session alive."""
    fence_timeout: float = 3.0
    """Seconds after the last answered statement was sent before every held job is lost."""
    session_timeout: float = 8.0
    """PostgreSQL's side: ``idle_session_timeout``, ``tcp_user_timeout`` and the keepalive
    budget of the session that holds the jobs. Must exceed ``fence_timeout`` + ``heartbeat``."""
    poll_interval: float = 5.0
    """The slow safety poll, in case a NOTIFY was missed."""
    reconnect_delay: float = 0.1
    reconnect_max_delay: float = 2.0
    event_retry_delay: float = 0.2
    """Seconds before an event whose handler raised is handed over again."""
    claim_batch: int = 100
    """Most jobs claimed by one statement."""
    command_retention: float = 600.0
    """Seconds a command row is kept for servers that are reconnecting."""
    connect_attempts: int = 3
    """Tries of :meth:`connect` before it raises."""
    signer: Signer | None = field(default=None, repr=False)

    @property
    def schema(self) -> str:
        """The schema of the tables (the URL's ``schema``, else ``public``)."""
        return self.url.options.schema or "public"

    @property
    def lock_class(self) -> int:
        """The first key of every advisory lock of this namespace (a signed int4)."""
        digest = hashlib.sha256(f"orchestratr:{self.schema}:{self.namespace}".encode()).digest()
        return int.from_bytes(digest[:4], "big", signed=True)

    @property
    def channel(self) -> str:
        """The prefix of the NOTIFY channels (database-wide, hence hashed)."""
        digest = hashlib.sha256(f"{self.schema}:{self.namespace}".encode()).hexdigest()
        return f"orchestratr_{digest[:16]}"

    def table(self, what: str) -> str:
        """The qualified, quoted name of table ``what`` (``jobs``, ``events``...)."""
        return f'"{self.schema}"."{self.namespace}_{what}"'

    @classmethod
    def build(cls, url: str | None, options: dict[str, Any]) -> PgTransportSettings:
        """Settings from ``url`` and keyword ``options``; :class:`ConfigurationError` if bad."""
        if not url:
            raise ConfigurationError(
                "the postgresql transport needs a URL (postgresql://user@host/dbname)"
            )
        rest, from_url = split_query(url, DEFAULTS)
        merged = merge(from_url, {k: v for k, v in options.items() if k in DEFAULTS})
        storage_options = {k: v for k, v in options.items() if k not in DEFAULTS and k != "signer"}
        parsed = parse_url(rest, storage_options)
        if parsed.dialect != "postgresql":
            raise ConfigurationError(
                f"the postgresql transport takes postgresql:// URLs, not {parsed.masked}"
            )
        check_known(merged, DEFAULTS, "postgresql transport")
        values: dict[str, Any] = {}
        for key, raw in merged.items():
            if key in _FLOATS:
                values[key] = coerce(key, raw, float, unit="seconds")
                if values[key] <= 0:
                    raise ConfigurationError(f"option {key} must be > 0")
            elif key in _INTS:
                values[key] = coerce(key, raw, int)
                if values[key] < 1:
                    raise ConfigurationError(f"option {key} must be >= 1")
            elif key == "namespace":
                values[key] = coerce(key, raw, str)
            else:
                values[key] = coerce(key, raw, str, optional=True)
        namespace = values.get("namespace", DEFAULTS["namespace"])
        if not namespace.replace("_", "").isalnum() or not namespace.isascii():
            raise ConfigurationError(f"namespace {namespace!r} must be letters, digits and _")
        if len(namespace) > 40:
            raise ConfigurationError("namespace must be at most 40 characters")
        signer = options.get("signer")
        key_file = values.pop("signing_key_file", None)
        if signer is None:
            signer = load_signer(key_file)
        elif not isinstance(signer, Signer):
            raise ConfigurationError("signer must be an orchestratr_core.signing.Signer")
        settings = cls(url=parsed, signer=signer, **values)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.fence_timeout < 2 * self.heartbeat:
            raise ConfigurationError(
                "fence_timeout must be at least 2 x heartbeat: one late ping must not fence"
            )
        if self.session_timeout < self.fence_timeout + self.heartbeat + 1:
            raise ConfigurationError(
                "session_timeout must exceed fence_timeout + heartbeat + 1 s: PostgreSQL must "
                "not give a job away before its server has stopped it "
                "(docs/postgresql-transport.md)"
            )
        if self.reconnect_max_delay < self.reconnect_delay:
            raise ConfigurationError("reconnect_max_delay must be >= reconnect_delay")
