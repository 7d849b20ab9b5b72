"""Job kinds, server labels and placement constraints: the one place that decides
which server may run which job, and that says why a job waits.

* A job has a **kind** (:data:`DEFAULT_KIND` unless given) and a server runs one
  function per kind it names.
* A server has **labels** (``region=eu``); a job may carry hard **constraints**
  on them (``region=eu``, ``region!=us``, ``region=eu|us`` for "in"). A job
  never runs on a server that does not satisfy every constraint.
* A **pool** is a kind with a canonical set of constraints (:class:`Pool`). Jobs
  are delivered per pool (a queue per pool on RabbitMQ), and a server consumes
  exactly the pools it :meth:`~Pool.accepts`: delivery itself is correct, no job
  is handed to a server that cannot run it.
* A job may name a **spread** group: servers avoid running two jobs of one group
  at once while other servers could take them (hand-backs at delivery, and the
  leader moves them apart at rebalancing; see ``docs/architecture.md``, "Kinds,
  labels and placement").

Storages, transports, the manager, the server, the CLI and the web API all use
these functions, so that the rules and the texts are written once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from orchestratr_core.errors import ConfigurationError, InvalidJobInput

__all__ = [
    "DEFAULT_KIND",
    "DEFAULT_POOL",
    "MAX_CONSTRAINTS",
    "MAX_LABELS",
    "MAX_VALUES",
    "VALUE_SEPARATOR",
    "Constraint",
    "Pool",
    "ServerPlacement",
    "format_labels",
    "parse_constraint",
    "parse_constraints",
    "parse_label",
    "parse_labels",
    "pending_reason",
    "validate_kind",
    "validate_spread",
]

DEFAULT_KIND = "default"
"""The kind of a job created without one, and of a server's single job function."""

MAX_CONSTRAINTS = 16
"""Most constraints one job may carry."""
MAX_LABELS = 32
"""Most labels one server may carry."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
"""Kinds, label keys and spread groups: 1..63 characters, safe in a queue name."""
_VALUE = re.compile(r"[A-Za-z0-9_.:/-]{1,63}")
"""Label and constraint values."""


def _check_name(what: str, value: object, error: type[Exception]) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise error(
            f"{what} {value!r} is not valid: 1..63 characters of letters, digits, '_', '.' "
            "or '-', starting with a letter or digit"
        )
    return value


def validate_kind(kind: object, *, error: type[Exception] = InvalidJobInput) -> str:
    """Return ``kind`` if it is a valid job kind, else raise ``error``."""
    return _check_name("job kind", kind, error)


def validate_spread(group: object) -> str | None:
    """Return the spread group (``None``: none) if valid, else raise :class:`InvalidJobInput`."""
    if group is None:
        return None
    return _check_name("spread group", group, InvalidJobInput)


def _check_value(what: str, value: str, error: type[Exception]) -> str:
    if not _VALUE.fullmatch(value):
        raise error(
            f"{what} value {value!r} is not valid: 1..63 characters of letters, digits, "
            "'_', '.', ':', '/' or '-'"
        )
    return value


@dataclass(frozen=True, order=True)
class Constraint:
    """One hard constraint on a server's labels: ``key=value`` (the server has the
    label with that value) or ``key!=value`` (it does not: another value or none).
    ``value`` may name several values as ``eu|us`` (canonical: sorted, unique):
    ``region=eu|us`` is ``region in (eu, us)`` and ``region!=eu|us`` is ``not in``."""

    key: str
    value: str
    negated: bool = False

    def __str__(self) -> str:
        return f"{self.key}{'!=' if self.negated else '='}{self.value}"

    @property
    def values(self) -> frozenset[str]:
        """The values ``value`` names (one, or several joined by ``|``)."""
        return frozenset(self.value.split(VALUE_SEPARATOR))

    def satisfied_by(self, labels: Mapping[str, str]) -> bool:
        """Whether a server with ``labels`` satisfies this constraint."""
        matches = labels.get(self.key) in self.values
        return not matches if self.negated else matches


VALUE_SEPARATOR = "|"
"""Between the values of one constraint (``region=eu|us``): a character that no
label value holds, nor the ``,`` that separates constraints in a pool key and a
stored column; a pool's queue name carries a digest of its constraints, never them."""
MAX_VALUES = 16
"""Most values one constraint may name."""


def parse_constraint(text: object) -> Constraint:
    """``"region=eu"``, ``"region!=us"``, or with several values ``"region=eu|us"``
    (in) and ``"region!=eu|us"`` (not in), as a :class:`Constraint` whose values
    are sorted and unique; raises :class:`InvalidJobInput` with the reason otherwise."""
    if isinstance(text, Constraint):
        return text
    if not isinstance(text, str):
        raise InvalidJobInput(f"a constraint must be a string KEY=VALUE, not {type(text).__name__}")
    negated = "!=" in text
    key, sep, value = text.partition("!=" if negated else "=")
    if not sep:
        raise InvalidJobInput(f"constraint {text!r} must be KEY=VALUE or KEY!=VALUE")
    _check_name("constraint key", key, InvalidJobInput)
    values = value.split(VALUE_SEPARATOR)
    if len(values) > MAX_VALUES:
        raise InvalidJobInput(f"constraint {text!r} names more than {MAX_VALUES} values")
    for one in values:
        _check_value("constraint", one, InvalidJobInput)
    return Constraint(key, VALUE_SEPARATOR.join(sorted(set(values))), negated)


def parse_constraints(items: object) -> tuple[str, ...]:
    """Constraints in their canonical form: parsed, unique, sorted, as text. Raises
    :class:`InvalidJobInput` for a malformed one, for more than
    :data:`MAX_CONSTRAINTS`, and for constraints that no server can satisfy at once
    (``region=eu`` with ``region=us``, ``region=eu`` with ``region!=eu``, or
    ``region=eu|us`` with ``region!=eu|us``)."""
    if items is None:
        return ()
    if not isinstance(items, list | tuple | set | frozenset):
        raise InvalidJobInput(
            f"constraints must be a list of KEY=VALUE strings, not {type(items).__name__}"
        )
    parsed = sorted({parse_constraint(item) for item in items})
    if len(parsed) > MAX_CONSTRAINTS:
        raise InvalidJobInput(f"a job may carry at most {MAX_CONSTRAINTS} constraints")
    allowed: dict[str, frozenset[str]] = {}
    said: dict[str, list[str]] = {}
    for c in parsed:
        if not c.negated:
            allowed[c.key] = allowed.get(c.key, c.values) & c.values
            said.setdefault(c.key, []).append(str(c))
    for c in parsed:
        if c.negated and c.key in allowed:
            allowed[c.key] = allowed[c.key] - c.values
            said[c.key].append(str(c))
    for key, values in allowed.items():
        if not values:
            both = "both" if len(said[key]) == 2 else "all"
            raise InvalidJobInput(f"constraints {' and '.join(said[key])} can never {both} hold")
    return tuple(str(c) for c in parsed)


def parse_label(text: str) -> tuple[str, str]:
    """``"region=eu"`` as ``("region", "eu")``; raises :class:`ConfigurationError`."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigurationError(f"label {text!r} must be KEY=VALUE")
    _check_name("label key", key, ConfigurationError)
    _check_value("label", value, ConfigurationError)
    return key, value


def parse_labels(labels: Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    """A server's labels from a mapping or ``KEY=VALUE`` strings, checked; raises
    :class:`ConfigurationError` (a key given twice with two values, too many)."""
    if labels is None:
        return {}
    pairs = (
        [(str(k), str(v)) for k, v in labels.items()]
        if isinstance(labels, Mapping)
        else [parse_label(text) for text in labels]
    )
    result: dict[str, str] = {}
    for key, value in pairs:
        _check_name("label key", key, ConfigurationError)
        _check_value("label", value, ConfigurationError)
        if key in result and result[key] != value:
            raise ConfigurationError(f"label {key!r} given twice ({result[key]!r}, {value!r})")
        result[key] = value
    if len(result) > MAX_LABELS:
        raise ConfigurationError(f"a server may carry at most {MAX_LABELS} labels")
    return dict(sorted(result.items()))


def format_labels(labels: Mapping[str, str]) -> tuple[str, ...]:
    """Labels as sorted ``KEY=VALUE`` texts (how heartbeats and storages carry them)."""
    return tuple(f"{k}={v}" for k, v in sorted(labels.items()))


@dataclass(frozen=True)
class Pool:
    """A kind and a canonical set of constraints: the unit jobs are delivered in.

    The default pool (:data:`DEFAULT_POOL`: the default kind, no constraint) is
    today's single jobs queue, so a fleet that uses no kinds works as before."""

    kind: str = DEFAULT_KIND
    constraints: tuple[str, ...] = ()
    """Canonical (:func:`parse_constraints`)."""

    @classmethod
    def of(cls, kind: str = DEFAULT_KIND, constraints: Iterable[object] | None = None) -> Pool:
        """The pool of a job of ``kind`` with ``constraints`` (validated, canonical)."""
        return cls(validate_kind(kind), parse_constraints(constraints))

    @property
    def is_default(self) -> bool:
        """True for the default kind without constraints."""
        return self.kind == DEFAULT_KIND and not self.constraints

    @property
    def key(self) -> str:
        """``kind`` or ``kind[k=v,k2!=w]``: the pool's name in logs and registries."""
        return f"{self.kind}[{','.join(self.constraints)}]" if self.constraints else self.kind

    @classmethod
    def from_key(cls, key: str) -> Pool:
        """Inverse of :attr:`key`; raises :class:`InvalidJobInput` for a malformed key."""
        if key.endswith("]") and "[" in key:
            kind, _, rest = key[:-1].partition("[")
            return cls.of(kind, [c for c in rest.split(",") if c])
        return cls.of(key)

    def queue_suffix(self) -> str:
        """What names this pool's queue after the namespace's jobs queue, in the
        characters every broker takes in a queue name (letters, digits, ``_.:-``):
        empty for the default pool, the kind for a kind without constraints, else
        the kind and a digest of the constraints (``feed.c-1f2e...``). Brokers
        list the key of each pool's queue in their registry."""
        if self.is_default:
            return ""
        if not self.constraints:
            return self.kind
        digest = hashlib.sha256(",".join(self.constraints).encode()).hexdigest()[:20]
        return f"{self.kind}.c-{digest}"

    def accepts(self, kinds: Collection[str], labels: Mapping[str, str]) -> bool:
        """Whether a server running ``kinds`` with ``labels`` may run this pool's jobs."""
        if self.kind not in kinds:
            return False
        return all(parse_constraint(c).satisfied_by(labels) for c in self.constraints)


DEFAULT_POOL = Pool()
"""The default kind without constraints: the namespace's original jobs queue."""


@dataclass(frozen=True)
class ServerPlacement:
    """What placement needs to know of a live server."""

    kinds: frozenset[str]
    labels: Mapping[str, str]
    free: int = 1
    """Free job slots (0: full)."""


def pending_reason(pool: Pool, servers: Iterable[ServerPlacement]) -> str | None:
    """Why a pending job of ``pool`` waits, given the live servers, for example
    ``waiting: no live server runs kind 'socket' with region=eu``; ``None`` when
    a live server with room may run it (it is on its way)."""
    runs_kind = [s for s in servers if pool.kind in s.kinds]
    where = f" with {', '.join(pool.constraints)}" if pool.constraints else ""
    if not runs_kind:
        return f"waiting: no live server runs kind {pool.kind!r}"
    eligible = [s for s in runs_kind if pool.accepts(s.kinds, s.labels)]
    if not eligible:
        return f"waiting: no live server runs kind {pool.kind!r}{where}"
    if all(s.free <= 0 for s in eligible):
        return f"waiting: every live server that runs kind {pool.kind!r}{where} is full"
    return None
