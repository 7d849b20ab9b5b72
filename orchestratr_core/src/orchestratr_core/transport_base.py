"""What every transport shares, so that each concrete one stays small (the way
kombu's virtual transport base serves its transports): the order in which
subscriptions are re-attached after a reconnect, and the task plumbing a transport
uses (re-exported from the core's ``_aio``, the one implementation, so that a
backend imports only public core modules).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Protocol, TypeVar

from orchestratr_core._aio import cancel_and_log, spawn, wait_first

__all__ = [
    "Reattachable",
    "SubscriptionKind",
    "cancel_and_log",
    "reattach_order",
    "spawn",
    "wait_first",
]


class SubscriptionKind(enum.IntEnum):
    """The kinds of subscription, in the order a transport re-attaches them to a new
    connection: commands first (the cancellation set is read again and every id
    added while away is handed over before any job delivery of the new connection),
    then events, then jobs, then pool watchers (which name every registered pool
    again: a server opens the consumers of pools it learns of only then)."""

    COMMANDS = 0
    EVENTS = 1
    JOBS = 2
    POOLS = 3


class Reattachable(Protocol):
    """A subscription that a transport re-attaches after a reconnect."""

    @property
    def kind(self) -> SubscriptionKind:
        """Which kind it is (decides its place in :func:`reattach_order`)."""
        ...

    @property
    def closed(self) -> bool:
        """True once closed: a closed subscription is not re-attached."""
        ...


_R = TypeVar("_R", bound=Reattachable)


def reattach_order(subscriptions: Iterable[_R]) -> list[_R]:
    """The open ``subscriptions`` in the one re-attach order (:class:`SubscriptionKind`);
    subscriptions of one kind keep the order in which they were made."""
    return sorted((s for s in subscriptions if not s.closed), key=lambda s: s.kind)
