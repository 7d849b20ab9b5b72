"""Error classification of the RabbitMQ transport: what a failed connection, a dying
channel or a refused declaration means for OrchestratR, without credentials."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from urllib.parse import unquote, urlsplit

import aiormq

from orchestratr_core.errors import BackendUnavailable, OrchestratrError, PermanentBackendError
from orchestratr_rabbitmq.settings import Settings

__all__ = [
    "Quiet",
    "classify_connect_error",
    "describe",
    "refused_namespace",
    "setup_failed",
]


class Quiet(contextlib.AbstractContextManager[None]):
    """Suppress what a dying connection raises while we tidy up: any error, and a
    ``CancelledError`` that aiormq raises from a cancelled RPC — but never the
    cancellation of the task we run in."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None:
            return False
        if issubclass(exc_type, asyncio.CancelledError):
            task = asyncio.current_task()
            return not (task is not None and task.cancelling())
        return issubclass(exc_type, Exception)


def describe(exc: BaseException | None) -> str:
    """One short line for a log or an error message."""
    if exc is None:
        return "closed"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


def classify_connect_error(
    exc: BaseException, settings: Settings, node: str | None = None
) -> OrchestratrError:
    """What a failed ``aio_pika.connect`` (to ``node``, ``host:port``; default: the
    URL's nodes) means: a refused login or virtual host is permanent, anything else
    is the broker being unavailable. The password never appears in the message."""
    s = settings
    where = node or s.host
    parts = urlsplit(s.url)
    user = unquote(parts.username or "guest")
    text = describe(exc)
    if parts.password:
        text = text.replace(unquote(parts.password), "***").replace(parts.password, "***")
    if (
        isinstance(
            exc,
            aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError,
        )
        or "ACCESS_REFUSED" in text
    ):
        return PermanentBackendError(
            f"RabbitMQ at {where} refused the login of user {user!r} (ACCESS_REFUSED): "
            "check the user name and password"
        )
    if isinstance(exc, aiormq.exceptions.ConnectionNotAllowed) or (
        isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in text
    ):
        return PermanentBackendError(
            f"RabbitMQ at {where} refused access to virtual host {s.vhost!r} (NOT_ALLOWED): "
            f"it does not exist or user {user!r} has no permissions on it"
        )
    if isinstance(exc, ConnectionError | OSError | TimeoutError | aiormq.exceptions.AMQPError):
        reason = text
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {s.connect_timeout:g}s"
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        elif isinstance(exc, aiormq.exceptions.AMQPConnectionError) and len(exc.args) >= 2:
            reason = str(exc.args[1])
        return BackendUnavailable(f"RabbitMQ at {where} cannot be reached: {reason}")
    return BackendUnavailable(f"RabbitMQ at {where}: {type(exc).__name__}: {text}")


def setup_failed(exc: Exception, settings: Settings) -> OrchestratrError:
    """What a failure while opening a session (declaring the namespace) means."""
    return _refused_or_unavailable(
        exc,
        f"RabbitMQ at {settings.host} refused access to the {settings.namespace!r} "
        f"queues: {describe(exc)}",
        f"RabbitMQ at {settings.host}: declaring the {settings.namespace!r} namespace failed "
        f"({describe(exc)})",
    )


def refused_namespace(exc: Exception, settings: Settings) -> OrchestratrError:
    """What a failure while subscribing means (a role's broker user may lack rights)."""
    return _refused_or_unavailable(
        exc,
        f"RabbitMQ at {settings.host}: broker user "
        f"{settings.user or 'guest'!r} may not consume what this role needs "
        f"({describe(exc)}); see docs/deployment.md, 'Broker permissions by role'",
        f"subscribing on RabbitMQ at {settings.host} failed: {describe(exc)}",
    )


def _refused_or_unavailable(exc: Exception, refused: str, other: str) -> OrchestratrError:
    if isinstance(exc, OrchestratrError):
        return exc
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return PermanentBackendError(refused)
    return BackendUnavailable(other)
