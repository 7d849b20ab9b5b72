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
* and a call that changes something (create, cancel, drain) must come from the
  app's **own origin**: an ``Origin`` other than ``scheme://Host`` of the
  request, or ``Sec-Fetch-Site`` other than ``same-origin`` / ``none``, is
  refused. A page served on another local port is same-*site* but not
  same-*origin*; without this rule it could cancel jobs through the
  operator's browser. Clients that send neither header (curl, scripts) pass;
* anything else is refused (401 without or with a wrong token, 403 when no
  token is configured but one is needed).

Tokens are printable ASCII (refused at configuration time otherwise: HTTP
clients disagree on how to encode anything else in a header), compared as
SHA-256 digests in constant time, and a token under
:data:`MIN_TOKEN_LENGTH` characters is accepted with a warning.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from orchestratr_core.errors import ConfigurationError
from orchestratr_core.web.problems import ApiProblem

__all__ = ["MIN_TOKEN_LENGTH", "TOKEN_ENV", "AccessPolicy", "is_loopback", "resolve_token"]

TOKEN_ENV = "ORCHESTRATR_API_TOKEN"  # noqa: S105 - a variable name, not a secret
"""Environment variable holding the API token."""

MIN_TOKEN_LENGTH = 16
"""Shorter tokens are accepted with a warning: they can be guessed."""

_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def resolve_token(token: str | None) -> str | None:
    """``token`` if given and not blank, else ``$ORCHESTRATR_API_TOKEN``, else ``None``.

    :raises ConfigurationError: the token holds anything but printable ASCII
        (the message does not show it).
    """
    if token is not None and token.strip():
        value: str | None = token.strip()
    else:
        value = os.environ.get(TOKEN_ENV, "").strip() or None
    if value is not None:
        _require_ascii(value)
    return value


def _require_ascii(token: str) -> None:
    if not all(" " <= c <= "~" for c in token):
        raise ConfigurationError(
            "the API token must be printable ASCII (letters, digits, punctuation): HTTP "
            "clients encode other characters in headers differently; for example "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


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
    :raises ConfigurationError: a token that is not printable ASCII.
    """

    token: str | None
    loopback: bool
    _expected: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.token is not None:
            _require_ascii(self.token)
        token = self.token.encode("ascii") if self.token is not None else b""
        object.__setattr__(self, "_expected", _digest(token))

    @property
    def open_locally(self) -> bool:
        """True when calls without a token are allowed (loopback, no token)."""
        return self.token is None and self.loopback

    def check(
        self,
        authorization: str | None,
        headers: dict[str, str],
        *,
        write: bool,
        scheme: str = "http",
    ) -> None:
        """Allow the call or raise :class:`ApiProblem` (401/403).

        :param authorization: the ``Authorization`` header, if any.
        :param headers: the request's headers, lower-cased names.
        :param write: the call changes something (create, cancel, drain).
        :param scheme: the request's scheme (for the app's own origin).
        """
        if self.token is None:
            proxied = any(name in headers for name in _PROXY_HEADERS)
            if self.loopback and not proxied:
                _require_local_browser_context(headers)
                if write:
                    _require_same_origin(headers, scheme)
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
        # Headers arrive as latin-1 text: back to the bytes sent, then digests of
        # equal length, so that neither content nor length shows in the timing.
        sent = _digest(presented.encode("latin-1", "replace"))
        if not hmac.compare_digest(sent, self._expected):
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


def _origin(scheme: str, host: str | None, port: int | None) -> tuple[str, str, int | None]:
    scheme = scheme.lower()
    return scheme, (host or "").lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


def _require_same_origin(headers: dict[str, str], scheme: str) -> None:
    """Without a token, refuse a change requested by a page of another origin
    (another port on this host included)."""
    fetch_site = headers.get("sec-fetch-site", "").strip().lower()
    origin = headers.get("origin")
    refused = fetch_site not in ("", "same-origin", "none")
    if origin is not None and not refused:
        try:
            sent = urlsplit(origin.strip())
            own = urlsplit(f"//{headers.get('host', '')}")
            refused = not own.hostname or _origin(sent.scheme, sent.hostname, sent.port) != (
                _origin(scheme, own.hostname, own.port)
            )
        except ValueError:
            refused = True
    if refused:
        raise ApiProblem(
            403,
            "Cross-origin request refused",
            "without an API token, only the dashboard's own origin may change anything "
            "(open it at this address, or configure a token)",
            kind="cross-origin",
        )


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
