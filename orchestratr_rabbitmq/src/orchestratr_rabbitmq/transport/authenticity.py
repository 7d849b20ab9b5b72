"""Signing what the transport publishes and checking what it receives
(``docs/reliability.md``): the authenticator covers the body, the exchange, the
routing key, the broker user (``user_id``, validated by the broker) and the time."""

from __future__ import annotations

import math
import time
from typing import Any

import aiormq.abc

from orchestratr_core.signing import SignatureError, Signer

__all__ = ["SIGNATURE", "SIGNED_AT", "Authenticity"]

SIGNATURE = "x-orchestratr-signature"
"""Header holding the authenticator."""
SIGNED_AT = "x-orchestratr-signed-at"
"""Header holding the signing time (whole seconds since the epoch)."""


class Authenticity:
    """Signs and verifies with ``signer``; with ``None`` it does neither."""

    def __init__(self, signer: Signer | None) -> None:
        self.signer = signer

    def headers(
        self, body: bytes, exchange: str, routing_key: str, user: str | None
    ) -> dict[str, Any]:
        """The headers that sign ``body`` as published now by ``user`` (empty without a key)."""
        if self.signer is None:
            return {}
        signed_at = int(time.time())
        return {
            SIGNED_AT: signed_at,
            SIGNATURE: self.signer.sign(body, (exchange, routing_key, user or "", str(signed_at))),
        }

    def verify(self, raw: aiormq.abc.DeliveredMessage, *, max_age: float | None = None) -> None:
        """With a signing key, raise :class:`SignatureError` unless ``raw`` carries a
        valid authenticator for its body, exchange, routing key, ``user_id`` and
        signing time (and, with ``max_age``, was signed that recently)."""
        signer = self.signer
        if signer is None:
            return
        properties = raw.header.properties
        headers: dict[str, Any] = dict(properties.headers or {})
        user = properties.user_id or ""
        signed_at = headers.get(SIGNED_AT)
        context = (
            getattr(raw.delivery, "exchange", "") or "",
            getattr(raw.delivery, "routing_key", "") or "",
            user,
            str(signed_at),
        )
        origin = f"published by broker user {user!r}" if user else "publisher not identified"
        try:
            signer.verify(headers.get(SIGNATURE), raw.body, context)
        except SignatureError as exc:
            raise SignatureError(f"{exc}; {origin}") from None
        if max_age is not None:
            age = time.time() - signed_at if isinstance(signed_at, int) else math.inf
            if not -max_age <= age <= max_age:
                raise SignatureError(
                    f"signed {age:.0f}s ago, beyond signature_max_age ({max_age:g}s): "
                    f"a replay?; {origin}"
                )
