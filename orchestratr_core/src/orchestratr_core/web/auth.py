"""Who may call the API: a bearer token, or nobody from outside the host.

The rules (one place, :meth:`AccessPolicy.check`):

* with a token configured (parameter or ``ORCHESTRATR_API_TOKEN``), every API
  call must carry ``Authorization: Bearer <token>``; it is compared in constant
  time and never echoed;
* without a token, calls are allowed only when the app is bound to a loopback
  address *and* the request did not come through a proxy (no ``Forwarded`` /
  ``X-Forwarded-For`` header): a proxy on the same host would otherwise open the
  API to the world;
* in that tokenless mode a call must also *look* local to a browser: its
  ``Host`` is a loopback name (no DNS rebinding) and it carries no foreign
  ``Origin`` / ``Sec-Fetch-Site: cross-site`` (no cross-site request from a page
  the operator happens to have open);
* anything else is refused (401 without or with a wrong token, 403 when no
  token is configured but one is needed).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from orchestratr_core.web.problems import ApiProblem

__all__ = ["TOKEN_ENV", "AccessPolicy", "is_loopback", "resolve_token"]

TOKEN_ENV = "ORCHESTRATR_API_TOKEN"  # noqa: S105 - a variable name, not a secret
"""Environment variable holding the API token."""

_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")


def resolve_token(token: str | None) -> str | None:
    """``token`` if given and not blank, else ``$ORCHESTRATR_API_TOKEN``, else ``None``."""
    if token is not None and token.strip():
        return token.strip()
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    return from_env or None


def is_loopback(host: str | None) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``::1``; False for anything
    else, ``0.0.0.0`` and ``None`` (unknown) included."""
    if host is None:
        return False
    value = host.strip().strip("[]").lower()
    if value == "localhost":
        return True
    try:
        return ipaddress.ip_address(value).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AccessPolicy:
    """The API's access rule for one app.

    :param token: the configured bearer token, or ``None``.
    :param loopback: the app is bound to a loopback address only.
    """

    token: str | None
    loopback: bool

    @property
    def open_locally(self) -> bool:
        """True when calls without a token are allowed (loopback, no token)."""
        return self.token is None and self.loopback

    def check(self, authorization: str | None, headers: dict[str, str], *, write: bool) -> None:
        """Allow the call or raise :class:`ApiProblem` (401/403).

        :param authorization: the ``Authorization`` header, if any.
        :param headers: the request's headers, lower-cased names.
        :param write: the call changes something (create, cancel, drain).
        """
        if self.token is None:
            proxied = any(name in headers for name in _PROXY_HEADERS)
            if self.loopback and not proxied:
                _require_local_browser_context(headers)
                return
            raise ApiProblem(
                403,
                "API token required",
                "this API is reachable from other hosts (bound to a non-loopback address or "
                f"behind a proxy) and no token is configured: set {TOKEN_ENV}",
                kind="token-not-configured",
            )
        presented = _bearer(authorization)
        if presented is None:
            action = "changing anything" if write else "reading"
            raise ApiProblem(
                401,
                "Authentication required",
                f"send 'Authorization: Bearer <token>' before {action}",
                kind="unauthenticated",
                headers={"WWW-Authenticate": 'Bearer realm="orchestratr"'},
            )
        if not hmac.compare_digest(presented.encode("utf-8"), self.token.encode("utf-8")):
            raise ApiProblem(
                401,
                "Invalid token",
                "the bearer token is not valid",
                kind="invalid-token",
                headers={"WWW-Authenticate": 'Bearer realm="orchestratr", error="invalid_token"'},
            )


def _host_of(value: str) -> str | None:
    try:
        return urlsplit(f"//{value}").hostname
    except ValueError:
        return None


def _require_local_browser_context(headers: dict[str, str]) -> None:
    """Without a token, refuse what a hostile web page could make a browser on
    this host send: a rebound DNS name, or a cross-site request."""
    host = headers.get("host")
    if host is not None and not is_loopback(_host_of(host)):
        raise ApiProblem(
            403,
            "Forbidden host",
            "without an API token only loopback host names are served "
            "(use http://127.0.0.1:PORT/ or configure a token)",
            kind="forbidden-host",
        )
    origin = headers.get("origin")
    cross_site = headers.get("sec-fetch-site", "").lower() == "cross-site"
    if cross_site or (origin is not None and not is_loopback(urlsplit(origin).hostname)):
        raise ApiProblem(
            403,
            "Cross-site request refused",
            "without an API token, calls from other web sites are refused",
            kind="cross-site",
        )


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
