"""Queue and exchange names, and the arguments each RabbitMQ version needs.

Everything lives under one namespace prefix ``<ns>`` so that several clusters can
share a vhost:

``<ns>.jobs``           durable (quorum by default) queue of job messages only
``<ns>.jobs.in``        direct exchange bound to ``<ns>.jobs``: managers publish jobs here
``<ns>.events``         durable single-active-consumer queue, servers -> managers
``<ns>.events.in``      direct exchange bound to ``<ns>.events``: servers publish events here
``<ns>.cancellations``  durable queue holding the cancellation set (one message at
                        rest; taking it with ``basic.get`` is the lock under which it
                        is read and replaced)
``<ns>.cancellations.in``  direct exchange bound to ``<ns>.cancellations``: managers
                        publish the set here
``<ns>.cancellations.lock``  no longer declared: versions before the cluster work
                        locked the set with an exclusive consumer on this classic
                        queue (one node); still removed with the namespace
``<ns>.cancellations.written``  marker exchange: a set has been written once
``<ns>.commands``       direct exchange; routing key = server id
``<ns>.broadcast``      fanout exchange to every live server
``<ns>.commands.<server>.<tag>``  one exclusive, auto-delete queue per server connection
``<ns>.dlx`` / ``<ns>.dead``      dead-letter exchange and the queue that keeps
                        malformed messages (and events a manager refused for
                        good) for inspection; bounded, the oldest dropped first;
                        of the namespace's queue type (replicated when quorum)

Each role publishes through exchanges of its own (never the default exchange, which
can reach every queue), so that RabbitMQ permissions can tell the roles apart: see
:func:`permissions` and ``docs/deployment.md``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestratr_core.placement import Pool

__all__ = [
    "CONSUMER_TIMEOUT_MS",
    "DEAD_LETTER_LIMIT",
    "DEAD_LETTER_MAX_BYTES",
    "ROLES",
    "BrokerVersion",
    "Permissions",
    "Topology",
    "permissions",
]

CONSUMER_TIMEOUT_MS = 2**31 - 1
"""The acknowledgement timeout we ask for where a version lets us (about 24.8 days):
the largest value every version accepts. Jobs held longer are handed back just
before it by the transport, never torn away by the broker."""

DEAD_LETTER_LIMIT = 10_000
"""Default most messages ``<ns>.dead`` keeps (option ``dead_letter_limit``)."""

DEAD_LETTER_MAX_BYTES = 256 * 1024 * 1024
"""Most bytes of message bodies ``<ns>.dead`` keeps (a heartbeat of 10,000 jobs is
about 600 KB, so the count alone would not bound the disk)."""


@dataclass(frozen=True, order=True)
class BrokerVersion:
    """The RabbitMQ version reported in the connection's ``server_properties``."""

    major: int
    minor: int
    patch: int = 0

    @classmethod
    def from_server_properties(cls, properties: Mapping[str, Any]) -> BrokerVersion:
        """Parse ``server_properties['version']``; an unreadable one counts as 0.0.0."""
        raw = properties.get("version", "")
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return cls.parse(text)

    @classmethod
    def parse(cls, text: str) -> BrokerVersion:
        """Parse ``"3.10.8"``, ``"4.0.5"``, ``"4.3.0-beta.1"``..."""
        numbers = [int(n) for n in re.findall(r"\d+", text)[:3]]
        while len(numbers) < 3:
            numbers.append(0)
        return cls(*numbers)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def known(self) -> bool:
        """False when the broker did not say which version it is."""
        return self > BrokerVersion(0, 0, 0)

    @property
    def queue_consumer_timeout(self) -> bool:
        """3.12-4.2: ``x-consumer-timeout`` is a queue argument."""
        return BrokerVersion(3, 12) <= self < BrokerVersion(4, 3)

    @property
    def consumer_argument_timeout(self) -> bool:
        """4.3+: quorum queues take ``x-consumer-timeout`` per consumer and cancel
        (not close) on expiry; classic queues never time out."""
        return self >= BrokerVersion(4, 3)

    @property
    def default_delivery_limit(self) -> bool:
        """4.0+: quorum queues drop or dead-letter a message after 20 redeliveries
        unless ``x-delivery-limit`` says otherwise."""
        return self >= BrokerVersion(4, 0)


class Topology:
    """Names and declaration arguments for one namespace on one broker version."""

    def __init__(
        self,
        namespace: str,
        queue_type: str,
        version: BrokerVersion,
        dead_letter_limit: int = DEAD_LETTER_LIMIT,
    ) -> None:
        self.namespace = namespace
        self.dead_letter_limit = dead_letter_limit
        self.queue_type = queue_type
        self.version = version
        self.jobs = f"{namespace}.jobs"
        self.jobs_exchange = f"{namespace}.jobs.in"
        self.events = f"{namespace}.events"
        self.events_exchange = f"{namespace}.events.in"
        self.cancellations = f"{namespace}.cancellations"
        self.cancellations_exchange = f"{namespace}.cancellations.in"
        self.cancellations_lock = f"{namespace}.cancellations.lock"
        self.cancellations_marker = f"{namespace}.cancellations.written"
        self.commands_exchange = f"{namespace}.commands"
        self.broadcast_exchange = f"{namespace}.broadcast"
        self.dead_letter_exchange = f"{namespace}.dlx"
        self.dead = f"{namespace}.dead"
        self.pools = f"{namespace}.pools"

    def pool_queue(self, pool: Pool) -> str:
        """The jobs queue of a pool: ``<ns>.jobs`` for the default pool (what a fleet
        without kinds always used), ``<ns>.jobs.<kind>[<constraints>]`` otherwise."""
        suffix = pool.queue_suffix()
        return f"{self.jobs}.{suffix}" if suffix else self.jobs

    def command_queue(self, server_id: str) -> str:
        """A fresh name for one connection's command queue. Unique per connection:
        after a fence the old connection may still own the previous one for a while."""
        return f"{self.namespace}.commands.{server_id}.{uuid.uuid4().hex[:8]}"

    def _durable(self, **extra: Any) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": self.queue_type,
            "x-dead-letter-exchange": self.dead_letter_exchange,
        }
        if self.queue_type == "quorum" and self.version.default_delivery_limit:
            # 4.0+ would drop a job after 20 crashes of its servers.
            args["x-delivery-limit"] = -1
        args.update(extra)
        return args

    def jobs_arguments(self) -> dict[str, Any]:
        """The jobs queue: no TTL, no length limit, no delivery limit, no timeout."""
        extra: dict[str, Any] = {}
        if self.version.queue_consumer_timeout:
            extra["x-consumer-timeout"] = CONSUMER_TIMEOUT_MS
        return self._durable(**extra)

    def pools_arguments(self) -> dict[str, Any]:
        """The pool registry: an append-only stream of pool keys. Every server reads
        it from the first entry and then hears each new pool as it is appended (no
        polling); reading takes nothing away from other readers."""
        return {"x-queue-type": "stream"}

    def events_arguments(self) -> dict[str, Any]:
        """The events queue: one active consumer at a time keeps events in order."""
        return self._durable(**{"x-single-active-consumer": True})

    def cancellations_arguments(self) -> dict[str, Any]:
        """The snapshot queue. No ``x-max-length``: a quorum queue counts a message
        held by a reader, and would drop a newer set published meanwhile; old sets
        are removed under the lock instead."""
        return self._durable()

    def dead_arguments(self) -> dict[str, Any]:
        """The dead-letter queue: bounded; when full, the oldest message is dropped
        (``drop-head``), so a flood of bad messages never fills the broker's disk.
        A quorum queue in a quorum namespace: a classic queue lives on one node, and
        while that node is down nobody can declare the namespace (a manager could
        not reconnect)."""
        return {
            "x-queue-type": "quorum" if self.queue_type == "quorum" else "classic",
            "x-max-length": self.dead_letter_limit,
            "x-max-length-bytes": DEAD_LETTER_MAX_BYTES,
            "x-overflow": "drop-head",
        }

    def command_queue_arguments(self) -> dict[str, Any]:
        """Per-connection command queue (exclusive queues are always classic)."""
        return {"x-dead-letter-exchange": self.dead_letter_exchange}

    def jobs_consumer_arguments(self) -> dict[str, Any]:
        """Arguments of the jobs ``basic.consume``."""
        if self.version.consumer_argument_timeout and self.queue_type == "quorum":
            return {"x-consumer-timeout": CONSUMER_TIMEOUT_MS}
        return {}

    def consumer_timeout_ms(self) -> int | None:
        """The acknowledgement timeout this topology configures, or ``None`` when the
        version leaves it to the broker's global setting (3.10/3.11) or never times
        out (classic queues on 4.3+)."""
        if self.version.queue_consumer_timeout:
            return CONSUMER_TIMEOUT_MS
        if self.version.consumer_argument_timeout:
            return CONSUMER_TIMEOUT_MS if self.queue_type == "quorum" else None
        return None

    @property
    def consumer_timeout_configurable(self) -> bool:
        """False on 3.10/3.11, where only the broker-wide setting exists."""
        return self.version.queue_consumer_timeout or self.version.consumer_argument_timeout

    def names(self) -> list[str]:
        """Every durable queue of the namespace (for clean-up in tests and tools)."""
        return [
            self.jobs,
            self.events,
            self.cancellations,
            self.cancellations_lock,
            self.dead,
            self.pools,
        ]

    def exchanges(self) -> list[str]:
        """Every exchange of the namespace."""
        return [
            self.commands_exchange,
            self.broadcast_exchange,
            self.dead_letter_exchange,
            self.cancellations_marker,
            self.jobs_exchange,
            self.events_exchange,
            self.cancellations_exchange,
        ]

    def bindings(self) -> list[tuple[str, str]]:
        """``(queue, exchange)`` pairs a manager binds, each with the queue's name as
        routing key."""
        return [
            (self.jobs, self.jobs_exchange),
            (self.events, self.events_exchange),
            (self.cancellations, self.cancellations_exchange),
        ]


ROLES = ("manager", "server", "web")
"""The roles :func:`permissions` knows."""


@dataclass(frozen=True)
class Permissions:
    """RabbitMQ's three permission regular expressions for one user on one vhost."""

    configure: str
    write: str
    read: str

    def command(self, user: str, vhost: str = "/") -> str:
        """The ``rabbitmqctl set_permissions`` line that grants them."""
        return (
            f"rabbitmqctl set_permissions -p '{vhost}' '{user}' "
            f"'{self.configure}' '{self.write}' '{self.read}'"
        )


def permissions(role: str, namespace: str = "orchestratr") -> Permissions:
    """The least RabbitMQ permissions a ``role`` ("manager", "server" or "web") needs
    in ``namespace`` (see ``docs/deployment.md``, "Broker permissions by role").

    * manager: declares everything, publishes jobs, commands, broadcasts and the
      cancellation set, consumes events and takes the set's lock;
    * server: declares nothing but its exclusive per-connection command queues,
      publishes events only, consumes jobs and commands, reads the set (read-only);
    * web: the manager's publishing without consuming events; it declares only the
      marker exchange that says "a cancellation set was written".
    """
    patterns = _ROLE_PATTERNS.get(role)
    if patterns is None:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
    ns = re.escape(namespace)
    configure, write, read = (p.replace("NS", ns) for p in patterns)
    return Permissions(configure=configure, write=write, read=read)


# (configure, write, read) per role; NS stands for the escaped namespace.
_ROLE_PATTERNS: dict[str, tuple[str, str, str]] = {
    "manager": (
        r"^NS\.",
        r"^NS\.(jobs|jobs\.in|jobs\..+|events|commands|broadcast|cancellations|cancellations\.in"
        r"|dlx|dead|pools)$",
        r"^NS\.(jobs|jobs\.in|jobs\..+|events|events\.in|cancellations|cancellations\.in"
        r"|cancellations\.lock|dlx|pools)$",
    ),
    "server": (
        r"^NS\.commands\..+$",
        r"^NS\.(events\.in|dlx|commands\..+)$",
        r"^NS\.(jobs|jobs\..+|commands|broadcast|cancellations|cancellations\.lock|pools"
        r"|commands\..+)$",
    ),
    "web": (
        r"^NS\.cancellations\.written$",
        r"^NS\.(jobs\.in|commands|broadcast|cancellations\.in)$",
        r"^NS\.(cancellations|cancellations\.lock)$",
    ),
}
