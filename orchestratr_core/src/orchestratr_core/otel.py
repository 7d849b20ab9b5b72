"""OpenTelemetry traces and metrics for OrchestratR, as a lifecycle-observer plugin.

Needs the ``otel`` extra (``pip install 'orchestratr-core[otel]'``); importing
this module without ``opentelemetry-api`` raises
:class:`~orchestratr_core.errors.MissingDriver`.

Only the OpenTelemetry *API* is used: the spans and measurements go wherever
the process's SDK sends them (configure a ``TracerProvider`` / ``MeterProvider``
with an exporter, or run under ``opentelemetry-instrument``); without an SDK
they cost next to nothing.

Traces: one span ``orchestratr.job`` per ownership of a job (from its start on a
server to its stop there), with the events ``job.restarted`` and ``job.failed``
on it; a short span ``orchestratr.server.joined`` / ``orchestratr.server.left``
per server event. Metrics: the counters ``orchestratr.job.starts``,
``orchestratr.job.restarts``, ``orchestratr.job.stops`` (attribute ``reason``),
``orchestratr.job.failures``, ``orchestratr.job.handovers``,
``orchestratr.server.joins``, ``orchestratr.server.leaves`` and the up-down
counter ``orchestratr.jobs.running``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from orchestratr_core.errors import MissingDriver
from orchestratr_core.plugin.spec import hookimpl

try:
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
    from opentelemetry.trace import Status, StatusCode
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess test
    raise MissingDriver("otel", "opentelemetry-api", "orchestratr-core[otel]") from _exc

if TYPE_CHECKING:
    from orchestratr_core.plugin.manager import PluginManager

__all__ = ["PLUGIN_NAME", "OtelObserver", "install"]

PLUGIN_NAME = "otel"
"""The name :func:`install` registers the observer under."""

_SCOPE = "orchestratr"
_HANDOVER = frozenset({"released", "superseded"})


class OtelObserver:
    """Emits spans and metrics for the lifecycle hooks.

    :param tracer_provider: defaults to the global one.
    :param meter_provider: defaults to the global one.
    """

    def __init__(
        self,
        tracer_provider: _trace.TracerProvider | None = None,
        meter_provider: _metrics.MeterProvider | None = None,
    ) -> None:
        from orchestratr_core import __version__

        self._tracer = _trace.get_tracer(_SCOPE, __version__, tracer_provider)
        meter = _metrics.get_meter(_SCOPE, __version__, meter_provider)
        self._starts = meter.create_counter("orchestratr.job.starts", description="Job starts")
        self._restarts = meter.create_counter(
            "orchestratr.job.restarts", description="Job restarts after a failure"
        )
        self._stops = meter.create_counter("orchestratr.job.stops", description="Job stops")
        self._failures = meter.create_counter(
            "orchestratr.job.failures", description="Job functions that raised"
        )
        self._handovers = meter.create_counter(
            "orchestratr.job.handovers", description="Jobs handed to another server"
        )
        self._running = meter.create_up_down_counter(
            "orchestratr.jobs.running", description="Jobs running in this process"
        )
        self._joins = meter.create_counter("orchestratr.server.joins", description="Server joins")
        self._leaves = meter.create_counter(
            "orchestratr.server.leaves", description="Server leaves"
        )
        self._spans: dict[tuple[str, str], _trace.Span] = {}
        self._lock = threading.Lock()

    @hookimpl
    def orchestratr_job_started(
        self, server_id: str, job_id: str, name: str, fence: int, restarts: int
    ) -> None:
        """Open the job's span (or mark a restart on it) and count the start."""
        attributes: dict[str, str | int] = {
            "orchestratr.server.id": server_id,
            "orchestratr.job.id": job_id,
            "orchestratr.job.name": name,
            "orchestratr.job.fence": fence,
        }
        self._starts.add(1)
        with self._lock:
            span = self._spans.get((server_id, job_id))
            if span is not None:
                span.add_event("job.restarted", {"orchestratr.job.restarts": restarts})
                self._restarts.add(1)
                return
            self._spans[(server_id, job_id)] = self._tracer.start_span(
                "orchestratr.job",
                kind=_trace.SpanKind.INTERNAL,
                attributes={**attributes, "orchestratr.job.restarts": restarts},
            )
        if restarts > 0:
            self._restarts.add(1)
        self._running.add(1)

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
        """Record the failure as an event on the job's span and count it."""
        self._failures.add(1)
        with self._lock:
            span = self._spans.get((server_id, job_id))
        if span is not None:
            span.add_event(
                "job.failed",
                {
                    "exception.message": error,
                    "orchestratr.job.restarts": restarts,
                    "orchestratr.job.retry_in": retry_in,
                },
            )

    @hookimpl
    def orchestratr_job_stopped(
        self, server_id: str, job_id: str, name: str, fence: int, reason: str, forced: bool
    ) -> None:
        """Close the job's span with the stop reason and count the stop."""
        self._stops.add(1, {"reason": reason})
        if reason in _HANDOVER:
            self._handovers.add(1, {"reason": reason})
        with self._lock:
            span = self._spans.pop((server_id, job_id), None)
        if span is None:
            return
        self._running.add(-1)
        span.set_attribute("orchestratr.job.stop_reason", reason)
        span.set_attribute("orchestratr.job.forced", forced)
        if reason == "lost":
            span.set_status(Status(StatusCode.ERROR, "delivery lost"))
        span.end()

    @hookimpl
    def orchestratr_server_joined(self, server_id: str, name: str, max_workers: int) -> None:
        """A short span for the join, and a count."""
        self._joins.add(1)
        with self._tracer.start_as_current_span(
            "orchestratr.server.joined",
            attributes={
                "orchestratr.server.id": server_id,
                "orchestratr.server.name": name,
                "orchestratr.server.max_workers": max_workers,
            },
        ):
            pass

    @hookimpl
    def orchestratr_server_left(self, server_id: str, name: str, reason: str) -> None:
        """A short span for the leave, a count, and the end of the server's job spans."""
        self._leaves.add(1, {"reason": reason})
        with self._tracer.start_as_current_span(
            "orchestratr.server.left",
            attributes={
                "orchestratr.server.id": server_id,
                "orchestratr.server.name": name,
                "orchestratr.server.reason": reason,
            },
        ):
            pass
        with self._lock:
            keys = [key for key in self._spans if key[0] == server_id]
            spans = [self._spans.pop(key) for key in keys]
        for span in spans:
            self._running.add(-1)
            span.set_attribute("orchestratr.job.stop_reason", f"server {reason}")
            span.end()


def install(
    plugins: PluginManager | None = None,
    *,
    tracer_provider: _trace.TracerProvider | None = None,
    meter_provider: _metrics.MeterProvider | None = None,
) -> OtelObserver:
    """Create an :class:`OtelObserver` and register it with ``plugins`` (default:
    the process-wide plugin manager) under the name ``otel``. A second call
    returns the observer already registered."""
    from orchestratr_core.plugin.manager import get_plugin_manager

    manager = plugins or get_plugin_manager()
    existing = manager.pluggy.get_plugin(PLUGIN_NAME)
    if isinstance(existing, OtelObserver):
        return existing
    plugin = OtelObserver(tracer_provider, meter_provider)
    manager.register(plugin, name=PLUGIN_NAME)
    return plugin
