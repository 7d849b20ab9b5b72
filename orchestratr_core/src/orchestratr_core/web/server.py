"""Serving the app with uvicorn inside the caller's event loop.

A manager process runs the API beside its own work: :func:`serve` (or
:func:`start_server` for a handle) runs ``uvicorn.Server.serve()`` as a task of
the running loop, never touches the process's signal handlers (the manager owns
SIGTERM/SIGINT) and never configures logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from typing import Any

import uvicorn
from fastapi import FastAPI

from orchestratr_core._aio import cancel_and_log, run_until_signal
from orchestratr_core.errors import ConfigurationError
from orchestratr_core.web.app import create_app
from orchestratr_core.web.auth import is_loopback, resolve_token

__all__ = ["WebServer", "run_web", "serve", "start_server"]

log = logging.getLogger("orchestratr.web")


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class WebServer:
    """A running web app (see :func:`start_server`)."""

    def __init__(
        self, app: FastAPI, server: _EmbeddedServer, task: asyncio.Task[None], host: str, port: int
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server = server
        self._task = task

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8080``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def wait(self) -> None:
        """Wait until the server stops."""
        await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop serving (open connections get a few seconds to finish)."""
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=5.0)
        except TimeoutError:
            self._server.force_exit = True
            # Not wait_for + suppress(CancelledError): that would swallow our own cancellation.
            await asyncio.wait({self._task}, timeout=2.0)
            if not self._task.done():
                await cancel_and_log([self._task], logger=log)
            elif not self._task.cancelled():
                self._task.result()  # what stopped it, as on the first path


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot resolve the HTTP address {host!r}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def start_server(
    target: Any,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    **app_options: Any,
) -> WebServer:
    """Start serving ``target`` in the running event loop and return once it listens.

    :param target: a :class:`~orchestratr_core.manager.ServerManager`, a
        :class:`~orchestratr_core.web.WebBackend` or an app from :func:`create_app`
        (then ``token`` and ``app_options`` are ignored: the app has its own).
    :param host: the address to bind. Without a token only loopback is allowed.
    :param port: ``0`` picks a free port (see :attr:`WebServer.port`).
    :param token: the bearer token; ``None`` reads ``ORCHESTRATR_API_TOKEN``.
    :param app_options: further keyword arguments of :func:`create_app`.
    :raises ConfigurationError: no token for a non-loopback address, or the
        address cannot be bound.
    """
    if isinstance(target, FastAPI):
        app = target
    else:
        if resolve_token(token) is None and not is_loopback(host):
            raise ConfigurationError(
                f"refusing to serve the API on {host} without a token: set "
                "ORCHESTRATR_API_TOKEN (or pass a token), or bind to 127.0.0.1"
            )
        app = create_app(target, token, host=host, **app_options)
    sock = _bind(host, port)
    bound_port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=3,
        server_header=False,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(_run(server, sock), name="orchestratr-web")
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise ConfigurationError(f"the web server on {host}:{bound_port} did not start")
        await asyncio.sleep(0.01)
    log.info("web API and dashboard on http://%s:%d/", host, bound_port)
    return WebServer(app, server, task, host, bound_port)


async def _run(server: _EmbeddedServer, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits the process when start-up fails
        raise ConfigurationError("the web server failed to start (see the log)") from exc
    finally:
        sock.close()


async def serve(
    target: Any,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    **app_options: Any,
) -> None:
    """Serve ``target`` in the running event loop until cancelled (run it as a
    task beside a manager: ``asyncio.create_task(serve(manager, ...))``).

    Parameters as for :func:`start_server`.
    """
    server = await start_server(target, host, port, token, **app_options)
    try:
        await server.wait()
    finally:
        await server.stop()


async def run_web(
    storage: Any,
    transport: Any,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    *,
    install_signal_handlers: bool = True,
    **app_options: Any,
) -> None:
    """``orchestratr web``: open the storage and the transport, serve the API and
    the dashboard until SIGTERM/SIGINT (or cancellation), then close both.

    :param storage: a storage object, plugin name or URL.
    :param transport: a transport object, plugin name or URL (create, cancel and
        drain send messages through it).
    :raises ConfigurationError: no token for a non-loopback address, or the
        address cannot be bound (before anything is opened).
    """
    from orchestratr_core.web.app import WebBackend

    if resolve_token(token) is None and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to serve the API on {host} without a token: set "
            "ORCHESTRATR_API_TOKEN (or pass a token), or bind to 127.0.0.1"
        )
    backend = await WebBackend.open(storage, transport)
    server: WebServer | None = None

    async def start() -> None:
        nonlocal server
        server = await start_server(backend, host, port, token, **app_options)

    async def serving() -> None:
        if server is not None:
            await server.wait()

    async def stop() -> None:
        if server is not None:
            await server.stop()

    try:
        await run_until_signal(
            start, stop, stopped=serving, install_signal_handlers=install_signal_handlers
        )
    finally:
        await backend.close()
