"""Prometheus metrics for OrchestratR, as a lifecycle-observer plugin.

The plugin implements the observer hooks of :mod:`orchestratr_core.plugin.spec`
exactly as a third-party plugin would, and is registered through the
``orchestratr.extensions`` entry point (``metrics = "orchestratr_core.metrics:observer"``)
or by :func:`install`. Each process counts what happens in it: a server process
counts the jobs it starts and stops, a manager process counts the servers it
sees join and leave.

Metrics (all prefixed ``orchestratr_``):

=====================================  =========  ===========================================
name                                   type       meaning
=====================================  =========  ===========================================
``job_starts_total``                   counter    job function started (first start or restart)
``job_restarts_total``                 counter    job function started again after it failed
``job_stops_total{reason}``            counter    job stopped; ``reason`` is a ``StopReason``
``job_failures_total``                 counter    job function raised (it will be restarted)
``job_handovers_total{reason}``        counter    stops that hand the job to another server
                                                  (``released``, ``superseded``)
``jobs_running``                       gauge      jobs running in this process now
``server_joins_total``                 counter    servers started here / seen by this manager
``server_leaves_total{reason}``        counter    servers stopped here / found dead or gone
``broker_reconnects_total{transport}`` counter    :func:`record_reconnect` calls
``heartbeat_lag_seconds``              histogram  :func:`record_heartbeat_lag` calls
=====================================  =========  ===========================================

``prometheus_client`` is optional: without it the observer does nothing, the
``record_*`` functions do nothing (so transports may call them unconditionally)
and :func:`start_metrics_server` raises :class:`~orchestratr_core.errors.MissingDriver`.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestratr_core.errors import MissingDriver
from orchestratr_core.plugin.spec import hookimpl

if TYPE_CHECKING:
    from orchestratr_core.health import HealthProbe
    from orchestratr_core.plugin.manager import PluginManager

__all__ = [
    "HANDOVER_REASONS",
    "PLUGIN_NAME",
    "MetricsObserver",
    "MetricsServer",
    "install",
    "observer",
    "parse_listen_address",
    "prometheus_available",
    "record_heartbeat_lag",
    "record_reconnect",
    "start_metrics_server",
]

PLUGIN_NAME = "metrics"
"""The name the observer is registered under (also its entry-point name)."""

HANDOVER_REASONS = frozenset({"released", "superseded"})
"""Stop reasons that mean the job goes on elsewhere (a hand-over)."""

_INSTALL = "orchestratr-core[metrics]"


def prometheus_available() -> bool:
    """True if ``prometheus_client`` can be imported."""
    return importlib.util.find_spec("prometheus_client") is not None


class _Instruments:
    """The metric objects, created once per process in the default registry."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.starts = Counter(
            "orchestratr_job_starts", "Job functions started (first starts and restarts)"
        )
        self.restarts = Counter(
            "orchestratr_job_restarts", "Job functions started again after they failed"
        )
        self.stops = Counter("orchestratr_job_stops", "Jobs stopped, by stop reason", ["reason"])
        self.failures = Counter("orchestratr_job_failures", "Job functions that raised")
        self.handovers = Counter(
            "orchestratr_job_handovers",
            "Jobs stopped here to run elsewhere (released or superseded)",
            ["reason"],
        )
        self.running = Gauge("orchestratr_jobs_running", "Jobs running in this process")
        self.joins = Counter("orchestratr_server_joins", "Servers started here or seen joining")
        self.leaves = Counter(
            "orchestratr_server_leaves", "Servers stopped here or found dead or gone", ["reason"]
        )
        self.reconnects = Counter(
            "orchestratr_broker_reconnects", "Reconnections to the broker", ["transport"]
        )
        self.heartbeat_lag = Histogram(
            "orchestratr_heartbeat_lag_seconds",
            "Delay between a heartbeat being sent and being applied",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
        )


_lock = threading.Lock()
_instruments: _Instruments | None = None
_unavailable = False


def _get() -> _Instruments | None:
    """The process's instruments, or ``None`` without ``prometheus_client``."""
    global _instruments, _unavailable  # noqa: PLW0603 - one set of metrics per process
    if _instruments is not None or _unavailable:
        return _instruments
    with _lock:
        if _instruments is None and not _unavailable:
            if prometheus_available():
                _instruments = _Instruments()
            else:
                _unavailable = True
    return _instruments


class MetricsObserver:
    """The lifecycle-observer plugin that feeds the Prometheus metrics.

    Its methods are pluggy hook implementations; they never raise and return at
    once (a counter increment), as the hook specifications require.
    """

    def __init__(self) -> None:
        self._running: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    @hookimpl
    def orchestratr_job_started(
        self, server_id: str, job_id: str, name: str, fence: int, restarts: int
    ) -> None:
        """Count a start (and a restart when ``restarts`` > 0); the job now runs."""
        metrics = _get()
        if metrics is None:
            return
        metrics.starts.inc()
        if restarts > 0:
            metrics.restarts.inc()
        with self._lock:
            self._running.add((server_id, job_id))
            metrics.running.set(len(self._running))

    @hookimpl
    def orchestratr_job_stopped(
        self, server_id: str, job_id: str, name: str, fence: int, reason: str, forced: bool
    ) -> None:
        """Count a stop by reason, and a hand-over for ``released``/``superseded``."""
        metrics = _get()
        if metrics is None:
            return
        metrics.stops.labels(reason=reason).inc()
        if reason in HANDOVER_REASONS:
            metrics.handovers.labels(reason=reason).inc()
        with self._lock:
            self._running.discard((server_id, job_id))
            metrics.running.set(len(self._running))

    @hookimpl
    def orchestratr_job_failed(
        self,
        server_id: str,
        job_id: str,
        name: str,
        fence: int,
        error: str,
        restarts: int,
        retry_in: float,
    ) -> None:
        """Count a failure of a job function."""
        metrics = _get()
        if metrics is not None:
            metrics.failures.inc()

    @hookimpl
    def orchestratr_server_joined(self, server_id: str, name: str, max_workers: int) -> None:
        """Count a server joining."""
        metrics = _get()
        if metrics is not None:
            metrics.joins.inc()

    @hookimpl
    def orchestratr_server_left(self, server_id: str, name: str, reason: str) -> None:
        """Count a server leaving, by reason (``stopped``, ``dead``, ``left``)."""
        metrics = _get()
        if metrics is None:
            return
        metrics.leaves.labels(reason=reason or "unknown").inc()
        with self._lock:
            # A server that is gone runs nothing any more (a killed one says nothing).
            gone = {key for key in self._running if key[0] == server_id}
            if gone:
                self._running -= gone
                metrics.running.set(len(self._running))


observer = MetricsObserver()
"""The process-wide observer; the ``orchestratr.extensions`` entry point names it."""


def install(plugins: PluginManager | None = None) -> MetricsObserver:
    """Register :data:`observer` with ``plugins`` (default: the process-wide
    plugin manager) under the name ``metrics``. Registering twice is harmless."""
    from orchestratr_core.plugin.manager import get_plugin_manager

    manager = plugins or get_plugin_manager()
    if not manager.pluggy.is_registered(observer):
        manager.register(observer, name=PLUGIN_NAME)
    return observer


def record_reconnect(transport_name: str) -> None:
    """Count one reconnection of a transport to its broker (for transport authors).

    :param transport_name: the transport's plugin name, e.g. ``"rabbitmq"``.
    """
    metrics = _get()
    if metrics is not None:
        metrics.reconnects.labels(transport=transport_name).inc()


def record_heartbeat_lag(seconds: float) -> None:
    """Record how late a heartbeat was applied (``now - sent_at``), in seconds."""
    metrics = _get()
    if metrics is not None:
        metrics.heartbeat_lag.observe(max(0.0, seconds))


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint (see :func:`start_metrics_server`)."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """The address to scrape."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def parse_listen_address(value: str, default_port: int) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[::1]:PORT"``, ``":PORT"`` (loopback) or ``"HOST"`` ->
    ``(host, port)``, for ``--http`` and ``--metrics`` options.

    :raises ConfigurationError: a malformed address or a port outside 0..65535.
    """
    from orchestratr_core.errors import ConfigurationError

    text = value.strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:  # a bare IPv6 address, no port
        try:
            ipaddress.ip_address(text)
        except ValueError:
            host = ""
    host = host or ("127.0.0.1" if text.startswith((":", "[]")) else "")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        port = -1
    if not 0 <= port <= 65535 or not host or any(c.isspace() for c in host):
        raise ConfigurationError(f"not a listen address: {value!r} (use HOST:PORT)")
    return host, port


def start_metrics_server(
    host: str = "127.0.0.1",
    port: int = 9464,
    *,
    plugins: PluginManager | None = None,
    probe: HealthProbe | None = None,
) -> MetricsServer:
    """Serve this process's metrics at ``http://host:port/metrics`` from a
    background thread (for server processes, which have no web app), and make
    sure the observer is registered. With ``probe``, ``/healthz`` and ``/readyz``
    too (:mod:`orchestratr_core.health`).

    :param port: ``0`` picks a free port (see :attr:`MetricsServer.port`).
    :raises MissingDriver: ``prometheus_client`` is not installed.
    """
    if not prometheus_available():
        raise MissingDriver("metrics", "prometheus-client", _INSTALL)
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    install(plugins)
    _get()
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if probe is not None and path in ("/healthz", "/readyz"):
            verdict = probe.live() if path == "/healthz" else probe.ready()
            body = (verdict.reason + "\n").encode()
            status = "200 OK" if verdict.ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [body]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    class _Threaded(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class _Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Probes every few seconds are not worth a log line each."""

    if ":" in host:
        _Threaded.address_family = socket.AF_INET6
    server = make_server(host, port, app, server_class=_Threaded, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="orchestratr-metrics", daemon=True)
    thread.start()
    return MetricsServer(host, int(server.server_address[1]), server, thread)
