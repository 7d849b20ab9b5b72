"""What every transport shares (``orchestratr_core.transport_base``)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestratr_core.transport_base import SubscriptionKind, reattach_order


@dataclass
class _Sub:
    name: str
    kind: SubscriptionKind
    closed: bool = False


def test_subscriptions_are_reattached_commands_first_then_events_then_jobs() -> None:
    subs = [
        _Sub("jobs", SubscriptionKind.JOBS),
        _Sub("events-1", SubscriptionKind.EVENTS),
        _Sub("closed", SubscriptionKind.COMMANDS, closed=True),
        _Sub("commands", SubscriptionKind.COMMANDS),
        _Sub("events-2", SubscriptionKind.EVENTS),
    ]
    assert [s.name for s in reattach_order(subs)] == ["commands", "events-1", "events-2", "jobs"]
