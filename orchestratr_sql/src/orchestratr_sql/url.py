"""Database URLs and storage options: parsed once, validated, never logged unmasked."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from orchestratr_core.display import mask_url, url_secrets
from orchestratr_core.errors import ConfigurationError
from orchestratr_core.options import coerce, merge, split_query

__all__ = ["DIALECTS", "SCHEMES", "DatabaseUrl", "StorageOptions", "parse_url"]

SCHEMES: dict[str, str] = {
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
    "mssql": "sqlserver",
}
"""URL scheme -> plugin (and dialect) name."""

DIALECTS = ("sqlite", "postgresql", "mysql", "sqlserver")
"""The SQL dialects this package ships queries and migrations for."""

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "sqlserver": 1433}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class StorageOptions:
    """Tuning of a SQL storage. Every field can be given as a URL query
    parameter (``?pool_max=5``) or as a keyword option of the backend spec."""

    migrate: bool = True
    """Bring the schema up to date in :meth:`Storage.open`."""
    pool_min: int = 1
    """Connections opened at start (SQLite: ignored)."""
    pool_max: int = 10
    """Most connections held at once (SQLite file: 4 by default; ``:memory:``: 1)."""
    connect_timeout: float = 10.0
    """Seconds to establish one connection."""
    command_timeout: float = 30.0
    """Seconds one statement may run (where the driver supports it)."""
    acquire_timeout: float = 30.0
    """Seconds to wait for a free pooled connection."""
    retries: int = 5
    """Attempts of one storage operation on transient failures (lost connection,
    deadlock, serialization failure) before :class:`BackendUnavailable`."""
    retry_initial: float = 0.05
    """Backoff before the second attempt, in seconds; doubles each attempt."""
    retry_max: float = 2.0
    """Longest backoff between attempts, in seconds."""
    schema: str | None = None
    """PostgreSQL: the schema to use (``search_path``); created by migrations."""
    statement_cache_size: int = 100
    """PostgreSQL: prepared statements cached per connection (0 behind PgBouncer)."""
    idle_in_transaction_timeout: float = 5.0
    """PostgreSQL: the server ends a session of ours that sits this long inside a
    transaction (``idle_in_transaction_session_timeout``). Our transactions send
    their statements back to back, so only a client cut off mid-transaction (a
    partition: nothing closes) sits there -- holding row locks that every other
    manager would wait on until TCP gave up, hours later."""
    target_session_attrs: str | None = None
    """PostgreSQL: which of the URL's hosts to use, as libpq's option of that
    name: ``read-write`` (the default when the URL names several hosts: the
    first host that accepts writes, i.e. the primary), ``primary`` or ``any``.
    The storage writes, so the standby targets are refused."""
    odbc: Mapping[str, str] = field(default_factory=dict)
    """SQL Server plugin only: further ODBC connection-string keywords
    (``Encrypt``, ``TrustServerCertificate``, ...)."""


_INT_FIELDS = {"pool_min", "pool_max", "retries", "statement_cache_size"}
_FLOAT_FIELDS = {
    "connect_timeout",
    "command_timeout",
    "acquire_timeout",
    "retry_initial",
    "retry_max",
    "idle_in_transaction_timeout",
}
_BOOL_FIELDS = {"migrate"}
_STR_FIELDS = {"schema", "target_session_attrs"}
_WRITABLE_TARGETS = ("read-write", "primary", "any")
_KNOWN = _INT_FIELDS | _FLOAT_FIELDS | _BOOL_FIELDS | _STR_FIELDS


@dataclass(frozen=True)
class DatabaseUrl:
    """A parsed database URL. ``repr`` and :attr:`masked` never show the password."""

    dialect: str
    """``sqlite``, ``postgresql``, ``mysql`` or ``sqlserver`` (the plugin name)."""
    raw: str = field(repr=False)
    host: str | None = None
    """The first (or only) host."""
    port: int | None = None
    """The first (or only) host's port."""
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    database: str | None = None
    """Database name; for SQLite the file path or ``:memory:``."""
    driver: str | None = None
    """SQL Server: the ODBC driver name."""
    options: StorageOptions = field(default_factory=StorageOptions)
    hosts: tuple[tuple[str, int], ...] = ()
    """Every ``(host, port)`` the URL names, in order (PostgreSQL may name
    several: ``postgresql://user@h1:5432,h2:5432/db``); empty for SQLite."""

    @property
    def masked(self) -> str:
        """The URL with the password replaced by ``***``."""
        return mask_url(self.raw) or ""

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never appear in a log line or an error."""
        found = [*url_secrets(self.raw), *((self.password,) if self.password else ())]
        return tuple(dict.fromkeys(found))

    @property
    def in_memory(self) -> bool:
        """True for ``sqlite:///:memory:``."""
        return self.dialect == "sqlite" and self.database == ":memory:"


def parse_url(url: str, options: Mapping[str, Any] | None = None) -> DatabaseUrl:
    """Parse ``url`` (and keyword ``options``, which win over URL parameters).

    Raises :class:`ConfigurationError` for an unknown scheme, a missing database
    name or an invalid option; the message shows the URL masked.
    """
    try:
        parts = urlsplit(url)
        hosts = _hosts(parts.netloc.rpartition("@")[2])
    except ValueError as exc:
        # The parser's reason may quote a piece of the password ("port 'ab'").
        reason = "a password must percent-encode '/', '?', '#' and '@'" if "@" in url else str(exc)
        raise ConfigurationError(f"invalid database URL {mask_url(url)!r}: {reason}") from None
    scheme = parts.scheme.lower()
    dialect = SCHEMES.get(scheme)
    if dialect is None:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigurationError(f"unsupported database URL scheme {scheme!r}; known: {known}")
    merged = merge(split_query(url)[1], options or {})
    driver = merged.pop("driver", None)
    opts = _options(dialect, merged, mask_url(url) or "")
    if dialect == "sqlite":
        return DatabaseUrl(dialect=dialect, raw=url, database=_sqlite_path(url), options=opts)
    database = unquote(parts.path.lstrip("/")) or None
    if not database:
        raise ConfigurationError(
            f"database URL {mask_url(url)!r} names no database (expected {scheme}://host/dbname)"
        )
    if dialect == "sqlserver" and not driver:
        driver = "ODBC Driver 18 for SQL Server"
    if len(hosts) > 1 and dialect != "postgresql":
        raise ConfigurationError(
            f"database URL {mask_url(url)!r} names several hosts; only PostgreSQL "
            "URLs may (postgresql://user@host1:5432,host2:5432/db)"
        )
    if dialect == "postgresql" and len(hosts) > 1 and opts.target_session_attrs is None:
        opts = replace(opts, target_session_attrs="read-write")
    default_port = _DEFAULT_PORTS[dialect]
    all_hosts = tuple((host or "localhost", port or default_port) for host, port in hosts)
    return DatabaseUrl(
        dialect=dialect,
        raw=url,
        hosts=all_hosts,
        host=all_hosts[0][0],
        port=all_hosts[0][1],
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        database=database,
        driver=str(driver) if driver else None,
        options=opts,
    )


def _hosts(netloc_hosts: str) -> list[tuple[str | None, int | None]]:
    """``host[:port]`` items of a comma-separated list (``[v6]:port`` too);
    ``ValueError`` for a port that is not a number in range."""
    found: list[tuple[str | None, int | None]] = []
    for spec in netloc_hosts.split(","):
        parts = urlsplit(f"//{spec}")
        port = parts.port
        found.append((unquote(parts.hostname) if parts.hostname else None, port))
    return found


def _sqlite_path(url: str) -> str:
    # sqlite:///relative.db -> relative.db ; sqlite:////abs.db -> /abs.db
    rest = url.split("://", 1)[1]
    path = rest.split("?", 1)[0]
    if not path.startswith("/"):
        raise ConfigurationError(
            "SQLite URLs look like sqlite:///relative.db, sqlite:////abs/path.db "
            "or sqlite:///:memory:"
        )
    path = unquote(path[1:])
    if not path:
        raise ConfigurationError("SQLite URL names no file (sqlite:///file.db)")
    return path


def _options(dialect: str, values: Mapping[str, Any], masked: str) -> StorageOptions:
    kwargs: dict[str, Any] = {}
    odbc: dict[str, str] = {}
    for key, value in values.items():
        if key in _INT_FIELDS:
            kwargs[key] = coerce(key, value, int)
        elif key in _FLOAT_FIELDS:
            kwargs[key] = _positive(key, coerce(key, value, float))
        elif key in _BOOL_FIELDS:
            kwargs[key] = coerce(key, value, bool)
        elif key in _STR_FIELDS:
            kwargs[key] = coerce(key, value, str)
        elif key == "odbc" and isinstance(value, Mapping):
            odbc.update({str(k): str(v) for k, v in value.items()})
        elif dialect == "sqlserver":
            # Anything else on an mssql:// URL is an ODBC connection-string keyword.
            odbc[str(key)] = str(value)
        else:
            known = ", ".join(sorted(_KNOWN))
            raise ConfigurationError(
                f"unknown option {key!r} for {dialect} storage ({masked}); known: {known}"
            )
    target = kwargs.get("target_session_attrs")
    if target is not None and (dialect != "postgresql" or target not in _WRITABLE_TARGETS):
        raise ConfigurationError(
            f"target_session_attrs={target!r} is not possible for a {dialect} storage "
            f"({masked}): PostgreSQL only, one of {', '.join(_WRITABLE_TARGETS)} "
            "(the storage writes, so it needs a server that accepts writes)"
        )
    schema = kwargs.get("schema")
    if schema is not None and not _IDENTIFIER.match(schema):
        raise ConfigurationError(f"schema {schema!r} is not a plain SQL identifier")
    opts = StorageOptions(odbc=odbc, **kwargs)
    if opts.pool_max < 1 or opts.pool_min < 0 or opts.pool_min > opts.pool_max:
        raise ConfigurationError(
            "pool sizes must satisfy 0 <= pool_min <= pool_max and 1 <= pool_max"
        )
    if opts.retries < 1:
        raise ConfigurationError("retries must be >= 1")
    return opts


def _positive(key: str, value: float) -> float:
    if value <= 0:
        raise ConfigurationError(f"option {key} must be > 0")
    return value
