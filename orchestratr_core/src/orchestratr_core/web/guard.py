"""What every request passes before the app reads a byte of its body.

:class:`RequestGuard` is ASGI middleware, innermost of the error handling:

* a request that may change something (any method but GET, HEAD and OPTIONS)
  is checked against the :class:`~orchestratr_core.web.auth.AccessPolicy`
  first: without a valid token (or, tokenless, from another origin) it is
  refused with 401/403 and its body is never read;
* a body longer than the limit is refused with 413, at once when
  ``Content-Length`` says so, else as soon as the streamed (chunked) body
  passes the limit; at most the limit plus one chunk is ever held;
* every answer gets the security headers (:func:`security_headers`); the app's
  500 handler adds them too, since that answer bypasses middleware.

Refusals carry ``Connection: close``, so the server drops the connection
instead of reading the rest of an unwanted body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from orchestratr_core.errors import ConfigurationError
from orchestratr_core.web.auth import AccessPolicy
from orchestratr_core.web.problems import ApiProblem

__all__ = ["DEFAULT_MAX_BODY", "RequestGuard", "body_limit", "security_headers"]

DEFAULT_MAX_BODY = 1024 * 1024
"""Largest request body accepted by default (bytes): a job's name and 64 KiB
argument need far less, even with every character JSON-escaped."""

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_App = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
)


def security_headers(path: str) -> dict[str, str]:
    """The headers every answer to ``path`` carries (errors included)."""
    headers = {
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }
    if path.startswith("/api/") or path == "/metrics":
        headers["Cache-Control"] = "no-store"
    else:
        headers["Content-Security-Policy"] = _CSP
    return headers


def body_limit(value: object) -> int:
    """``value`` as a body limit in bytes (a whole number >= 1), else
    :class:`ConfigurationError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"the request body limit must be a whole number of bytes >= 1, not {value!r}"
        )
    return value


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes"


class RequestGuard:
    """ASGI middleware: access check before the body, body limit, security
    headers (see the module docstring).

    :param app: the ASGI app to guard.
    :param policy: who may call.
    :param max_body: largest body accepted, in bytes.
    """

    def __init__(self, app: _App, *, policy: AccessPolicy, max_body: int) -> None:
        self.app = app
        self.policy = policy
        self.max_body = body_limit(max_body)

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = security_headers(str(scope.get("path", "")))

        async def send_with_headers(message: _Message) -> None:
            if message["type"] == "http.response.start":
                present = {bytes(k).lower() for k, _ in message.get("headers", [])}
                added = [
                    (k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in extra.items()
                    if k.lower().encode("latin-1") not in present
                ]
                message["headers"] = [*message.get("headers", []), *added]
            await send(message)

        headers: dict[str, str] = {}
        for key, value in scope.get("headers", []):
            headers[bytes(key).decode("latin-1").lower()] = bytes(value).decode("latin-1")
        try:
            if str(scope.get("method", "GET")).upper() not in SAFE_METHODS:
                self.policy.check(
                    headers.get("authorization"),
                    headers,
                    write=True,
                    scheme=str(scope.get("scheme", "http")),
                )
            length = headers.get("content-length", "").strip()
            if length.isdigit() and int(length) > self.max_body:
                raise ApiProblem(413, "Payload too large", _too_large(self.max_body))
        except ApiProblem as problem:
            problem.headers = {**problem.headers, "Connection": "close"}
            await problem.response()(scope, receive, send_with_headers)
            return

        received = 0

        async def limited_receive() -> _Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    # Raised inside the app's body read: it answers with its 413 problem.
                    raise HTTPException(
                        413, _too_large(self.max_body), headers={"Connection": "close"}
                    )
            return message

        await self.app(scope, limited_receive, send_with_headers)
