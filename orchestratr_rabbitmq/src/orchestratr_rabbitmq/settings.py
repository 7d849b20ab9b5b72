"""Options of the RabbitMQ transport: where the broker is and the timings that keep
jobs single-owner.

Any option may also be given in the URL query (``amqp://h/vhost?namespace=blue``);
keyword options win. The URL comes from the constructor, else ``ORCHESTRATR_RABBITMQ_URL``, else
``amqp://guest:guest@localhost:5672/``. The URL may name several nodes of one cluster,
comma-separated in its authority (``amqp://user:pw@h1:5682,h2:5683,h3/vhost``; a node
without a port uses the scheme's default): the transport connects to the first that
answers, and after losing a connection tries the next one first (see
``docs/rabbitmq.md``). A password missing from the URL is taken from
``ORCHESTRATR_RABBITMQ_PASSWORD``. TLS (``amqps://``) options are the URL query
parameters aiormq understands (``cafile``, ``certfile``, ``keyfile``,
``no_verify_ssl``) or an ``ssl_context`` option. Nothing here ever logs the URL
with its password: use :func:`orchestratr_core.plugin.manager.mask_url`.

Signing (``docs/reliability.md``): ``signer`` (an :class:`orchestratr_core.signing.Signer`)
or ``signing_key_file`` (a path, also as a URL query parameter); without either, the
keys named by ``ORCHESTRATR_SIGNING_KEY_FILE`` or held by ``ORCHESTRATR_SIGNING_KEY``.
With a key every message is signed and every message received must be.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import SplitResult, quote, unquote, urlsplit

from orchestratr_core.errors import ConfigurationError
from orchestratr_core.options import OptionKind, check_known, coerce, merge, split_query
from orchestratr_core.signing import Signer, load_signer

__all__ = ["DEFAULT_URL", "PASSWORD_ENV", "URL_ENV", "Settings"]

URL_ENV = "ORCHESTRATR_RABBITMQ_URL"
"""Environment variable read when no URL is given."""
PASSWORD_ENV = "ORCHESTRATR_RABBITMQ_PASSWORD"  # noqa: S105 - a variable name, not a secret
"""Environment variable that supplies the password when the URL carries none."""
DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
"""The broker used when neither the caller nor the environment names one."""

_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")

QueueType = Literal["quorum", "classic"]


@dataclass(frozen=True)
class Settings:
    """Validated options of one :class:`~orchestratr_rabbitmq.RabbitMQTransport`.

    Timings are in seconds. ``fence_timeout`` must stay below twice the heartbeat:
    RabbitMQ drops a silent connection no sooner than two heartbeat periods after
    the last byte it received, and the transport must give its jobs up before that
    (see ``docs/rabbitmq.md``).
    """

    url: str
    namespace: str = "orchestratr"
    queue_type: QueueType = "quorum"
    heartbeat: int = 3
    fence_timeout: float = 4.5
    ping_interval: float = 1.5
    connect_timeout: float = 10.0
    connect_attempts: int = 3
    publish_timeout: float = 10.0
    reconnect_delay: float = 0.2
    reconnect_max_delay: float = 5.0
    snapshot_timeout: float = 10.0
    prefetch_step: int = 500
    """Most job deliveries a server lets the broker push ahead of what it has taken
    in. A server with room for 20,000 jobs raises its prefetch this many at a time,
    so that the answer to a fence ping never waits behind thousands of unread
    deliveries (which made loaded servers fence themselves falsely)."""
    dead_letter_limit: int = 10_000
    """Most messages ``<ns>.dead`` keeps; beyond it the oldest are dropped. Takes
    effect when the queue is declared (see ``docs/rabbitmq.md`` for an existing one)."""
    consumer_timeout: float | None = None
    """The broker's delivery acknowledgement timeout, when the operator knows it
    (RabbitMQ 3.10 cannot tell a client). Deliveries are then handed back before it
    expires instead of being torn away by the broker."""
    connection_name: str | None = None
    ssl_context: ssl.SSLContext | None = None
    signing_key_file: str | None = None
    """A key file (one or two keys, current first); see :mod:`orchestratr_core.signing`."""
    signer: Signer | None = None
    """Signs what this transport publishes and checks what it receives (``None``: neither)."""
    signature_max_age: float = 300.0
    """With a key, a command signed longer ago than this (or this far in the future)
    is refused as a replay. Jobs, events and the cancellation set have no age limit:
    a job message lives as long as its job."""

    @classmethod
    def build(cls, url: str | None, options: Mapping[str, Any]) -> Settings:
        """Merge ``url``, the environment and keyword ``options``; raise
        :class:`ConfigurationError` for anything invalid."""
        known = {f for f in cls.__dataclass_fields__ if f != "url"}
        check_known(options, sorted(known), "RabbitMQ transport")
        # What the query holds besides our options (cafile, certfile...) is aiormq's.
        resolved, from_query = split_query(
            _resolve_url(url),
            known - {"ssl_context", "signer"},
            aliases={"name": "connection_name"},
            plus_is_space=False,
        )
        values: dict[str, Any] = {
            name: coerce(name, value, _KINDS[name], optional=name == "consumer_timeout")
            if name in _KINDS
            else value
            for name, value in merge(from_query, options).items()
        }
        if values.get("signer") is None:
            values["signer"] = load_signer(values.get("signing_key_file"))
        elif not isinstance(values["signer"], Signer):
            raise ConfigurationError("signer must be an orchestratr_core.signing.Signer")
        heartbeat = values.get("heartbeat", cls.heartbeat)
        if not isinstance(heartbeat, int) or isinstance(heartbeat, bool) or heartbeat < 0:
            raise ConfigurationError(
                f"heartbeat must be a whole number of seconds >= 0, got {heartbeat!r}"
            )
        if "fence_timeout" not in values and heartbeat > 0:
            # 1.5 T: three unanswered pings before a false fence, and still 0.5 T
            # before the broker could reassign (it waits at least 2 T).
            values["fence_timeout"] = 1.5 * heartbeat
        if "ping_interval" not in values:
            values["ping_interval"] = float(values.get("fence_timeout", cls.fence_timeout)) / 3
        settings = cls(url=resolved, **values)
        settings._check()
        return settings

    def _check(self) -> None:
        if not _NAMESPACE.match(self.namespace):
            raise ConfigurationError(
                f"namespace {self.namespace!r} must be 1-100 characters of letters, "
                "digits, '_', '.', '-'"
            )
        if self.queue_type not in ("quorum", "classic"):
            raise ConfigurationError(
                f"queue_type must be 'quorum' or 'classic', got {self.queue_type!r}"
            )
        if self.fence_timeout <= 0:
            raise ConfigurationError("fence_timeout must be > 0")
        if self.heartbeat and self.fence_timeout >= 2 * self.heartbeat:
            raise ConfigurationError(
                f"fence_timeout ({self.fence_timeout:g}s) must be shorter than two heartbeats "
                f"({2 * self.heartbeat}s): the broker may hand jobs to another server after that"
            )
        if self.ping_interval <= 0 or self.ping_interval >= self.fence_timeout:
            raise ConfigurationError("ping_interval must be > 0 and shorter than fence_timeout")
        for name in ("connect_timeout", "publish_timeout", "reconnect_delay", "snapshot_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be > 0")
        if self.reconnect_max_delay < self.reconnect_delay:
            raise ConfigurationError("reconnect_max_delay must be >= reconnect_delay")
        if isinstance(self.prefetch_step, bool) or not isinstance(self.prefetch_step, int):
            raise ConfigurationError(
                f"prefetch_step must be a whole number, got {self.prefetch_step!r}"
            )
        if self.prefetch_step < 1:
            raise ConfigurationError("prefetch_step must be >= 1")
        limit = self.dead_letter_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 2**31 - 1:
            raise ConfigurationError(
                f"dead_letter_limit must be a whole number within 1..{2**31 - 1}, got {limit!r}"
            )
        if self.connect_attempts < 1:
            raise ConfigurationError("connect_attempts must be >= 1")
        if self.signature_max_age <= 0:
            raise ConfigurationError("signature_max_age must be > 0 seconds")
        if self.consumer_timeout is not None and self.consumer_timeout <= 0:
            raise ConfigurationError("consumer_timeout must be > 0 seconds (or None if unknown)")

    def __repr__(self) -> str:  # never show the password
        from orchestratr_core.plugin.manager import mask_url

        return (
            f"Settings(url={mask_url(self.url)!r}, namespace={self.namespace!r}, "
            f"signer={self.signer!r})"
        )

    @property
    def nodes(self) -> tuple[str, ...]:
        """``host:port`` of each node the URL names, in the URL's order."""
        parts = urlsplit(self.url)
        default = 5671 if parts.scheme == "amqps" else 5672
        return tuple(
            f"{node.hostname or 'localhost'}:{node.port or default}"
            for node in map(_node, _hosts(parts.netloc))
        )

    def connection_url(self, node: int = 0) -> str:
        """The URL handed to aio-pika for node number ``node`` of :attr:`nodes`,
        with our heartbeat (it decides the fence)."""
        parts = urlsplit(split_query(self.url, {"heartbeat", "name"}, plus_is_space=False)[0])
        query = "&".join(q for q in (parts.query, f"heartbeat={self.heartbeat}") if q)
        user, at, _ = parts.netloc.rpartition("@")
        netloc = f"{user}{at}{_hosts(parts.netloc)[node]}"
        return parts._replace(netloc=netloc, query=query).geturl()

    @property
    def vhost(self) -> str:
        """The virtual host named by the URL (``/`` when it names none)."""
        path = urlsplit(self.url).path
        return "/" if path in ("", "/") else path[1:].replace("%2F", "/")

    @property
    def user(self) -> str | None:
        """The broker user named by the URL (``None``: the client's default login)."""
        name = urlsplit(self.url).username
        return unquote(name) if name else None

    @property
    def host(self) -> str:
        """``host:port`` of the broker (of each node, comma-separated), for messages
        (never the credentials)."""
        return ",".join(self.nodes)


_INTS = frozenset({"heartbeat", "connect_attempts", "prefetch_step", "dead_letter_limit"})
_FLOATS = frozenset(
    {
        "fence_timeout",
        "ping_interval",
        "connect_timeout",
        "publish_timeout",
        "reconnect_delay",
        "reconnect_max_delay",
        "snapshot_timeout",
        "consumer_timeout",
        "signature_max_age",
    }
)
_KINDS: dict[str, OptionKind] = {**dict.fromkeys(_INTS, int), **dict.fromkeys(_FLOATS, float)}


def _resolve_url(url: str | None) -> str:
    value = (url or os.environ.get(URL_ENV) or DEFAULT_URL).strip()
    try:
        parts = urlsplit(value)
        for host in _hosts(parts.netloc):
            if not host:
                raise ValueError("an empty node")
            _node(host).port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigurationError(
            "the RabbitMQ URL cannot be parsed (it is not shown: it may hold a password)"
        ) from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigurationError(
            f"a RabbitMQ URL must start with amqp:// or amqps://, not {parts.scheme!r}://"
        )
    password = os.environ.get(PASSWORD_ENV)
    if parts.password is None and password and parts.hostname:
        user = parts.username or "guest"
        host = parts.netloc.rpartition("@")[2]
        value = parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}").geturl()
    return value


def _hosts(netloc: str) -> list[str]:
    """The ``host[:port]`` parts of an authority that may name several nodes."""
    return netloc.rpartition("@")[2].split(",")


def _node(host: str) -> SplitResult:
    return urlsplit(f"//{host}")
