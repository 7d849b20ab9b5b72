"""Structured logs, OpenTelemetry, and the optional extras' missing-driver errors."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from typing import Literal

import pytest

from orchestratr_core import JobArgument, StopToken
from orchestratr_core.errors import MissingDriver
from orchestratr_core.logs import add_secret, configure_logging, job_context
from orchestratr_core.plugin.manager import get_plugin_manager
from tests.support.cluster import Cluster, eventually


@contextlib.contextmanager
def captured_log(
    level: str, fmt: Literal["text", "json"], secrets: tuple[str, ...] = ()
) -> Iterator[io.StringIO]:
    """Log lines as configure_logging writes them; the root logger is restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure_logging(level, fmt, stream=stream, secrets=secrets)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    with captured_log("info", "json") as stream:
        yield stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_every_job_line_carries_job_server_and_fence(
    cluster: Cluster, json_log: io.StringIO
) -> None:
    job_log = logging.getLogger("tenant.job")

    async def job(arg: JobArgument, token: StopToken, heartbeat: object) -> None:
        job_log.info("polling the feed")
        await token.wait()

    server = await cluster.add_server("alpha", 2, job=job)
    job_id = await cluster.client.create_job("logged")
    await eventually(lambda: job_id in server.running(), 5, what="job running")
    fence = server.running()[job_id].fence
    await cluster.client.mark_on_deleting(job_id)
    await eventually(lambda: job_id not in server.running(), 5, what="job stopped")
    await eventually(
        lambda: any("job stopped" in r["message"] for r in lines(json_log)), 5, what="stop logged"
    )

    about_job = [
        r for r in lines(json_log) if job_id in r["message"] or r["logger"] == "tenant.job"
    ]
    assert {r["logger"] for r in about_job} >= {"tenant.job", "orchestratr.server"}
    for record in about_job:
        assert record["job_id"] == job_id, record
        assert record["server_id"] == server.id, record
        assert record["fence"] == fence, record
    unrelated = [r for r in lines(json_log) if r["message"].startswith("server started")]
    assert unrelated and unrelated[0]["job_id"] is None


def test_text_format_is_key_value_and_masks_credentials() -> None:
    with captured_log("debug", "text", secrets=("tok-123456",)) as stream:
        log = logging.getLogger("orchestratr.test")
        log.info("connecting to amqp://user:hunter2@broker:5672/ with tok-123456")
        with job_context("j-1", "s-1", 42):
            log.warning("job went wrong")
        log.info("stop job_id=j-2 fence=7 reason=cancelled")
    first, second, third = stream.getvalue().splitlines()
    assert "hunter2" not in first and "tok-123456" not in first
    assert "amqp://user:***@broker:5672/" in first
    assert first.split(" ")[1:3] == ["level=info", "logger=orchestratr.test"]
    assert second.endswith('msg="job went wrong" job_id=j-1 server_id=s-1 fence=42')
    assert "job_id=j-2" in third and third.endswith("fence=7")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_url_that_does_not_parse_cleanly_is_hidden_whole_in_log_lines(
    fmt: Literal["text", "json"],
) -> None:
    with captured_log("debug", fmt) as stream:
        log = logging.getLogger("orchestratr.test")
        log.warning("cannot reach postgresql://u:ab/cdefSECRET@host/db: refused")
        log.warning("cannot reach 'postgresql://u:p@ssSECRET@host/db', retrying")
        log.warning("cannot reach (postgresql://u:ab?cdSECRET@host:5432/db)")
        log.warning("clean: amqp://guest:hunter2@broker:5672/vhost")
    out = stream.getvalue()
    assert "SECRET" not in out and "hunter2" not in out, out
    assert out.count("postgresql://***") == 3, out
    assert "amqp://guest:***@broker:5672/vhost" in out


def test_text_log_lines_escape_terminal_control_characters() -> None:
    from orchestratr_core.logs import KeyValueFormatter

    record = logging.LogRecord(
        "orchestratr.test", logging.WARNING, __file__, 1, "job failed: %s",
        ("\x1b[2J\x9b31m",), None,
    )  # fmt: skip
    line = KeyValueFormatter().format(record)
    assert "\x1b" not in line and "\x9b" not in line
    assert "\\u001b[2J\\u009b31m" in line


def test_short_secrets_are_not_masked_everywhere() -> None:
    add_secret("ab")
    from orchestratr_core.logs import redact

    assert redact("a cab ride") == "a cab ride"


def test_configure_logging_rejects_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="'text' or 'json'"):
        configure_logging("info", "xml")  # type: ignore[arg-type]


async def test_otel_observer_emits_a_span_per_ownership_and_metrics(cluster: Cluster) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from orchestratr_core.otel import OtelObserver

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    observer = OtelObserver(tracer_provider, MeterProvider(metric_readers=[reader]))
    plugins = get_plugin_manager()
    plugins.register(observer, name=f"otel-test-{uuid.uuid4().hex}")
    try:
        runs = 0

        async def job(arg: JobArgument, token: StopToken, heartbeat: object) -> None:
            nonlocal runs
            runs += 1
            if runs == 1:
                raise RuntimeError("first run fails")
            await token.wait()

        server = await cluster.add_server("alpha", 2, job=job)
        job_id = await cluster.client.create_job("traced")
        await eventually(lambda: runs == 2, 5, what="restarted after the failure")
        await cluster.client.mark_on_deleting(job_id)

        def job_spans() -> list:
            return [s for s in exporter.get_finished_spans() if s.name == "orchestratr.job"]

        await eventually(job_spans, 5, what="job span ended")
    finally:
        plugins.pluggy.unregister(observer)

    (span,) = job_spans()
    assert span.attributes is not None
    assert span.attributes["orchestratr.job.id"] == job_id
    assert span.attributes["orchestratr.server.id"] == server.id
    assert span.attributes["orchestratr.job.stop_reason"] == "cancelled"
    assert [e.name for e in span.events] == ["job.failed", "job.restarted"]
    assert "orchestratr.server.joined" in {s.name for s in exporter.get_finished_spans()}

    data = reader.get_metrics_data()
    assert data is not None
    sums = {
        m.name: sum(p.value for p in m.data.data_points)  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert sums["orchestratr.job.starts"] == 2
    assert sums["orchestratr.job.restarts"] == 1
    assert sums["orchestratr.job.failures"] == 1
    assert sums["orchestratr.job.stops"] == 1
    assert sums["orchestratr.jobs.running"] == 0


def test_otel_without_the_api_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "orchestratr_core.otel", raising=False)
    with pytest.raises(MissingDriver, match=r"orchestratr-core\[otel\]"):
        importlib.import_module("orchestratr_core.otel")


def test_web_without_fastapi_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)
    for name in [n for n in sys.modules if n.startswith("orchestratr_core.web")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(MissingDriver, match=r"orchestratr-core\[web\]"):
        importlib.import_module("orchestratr_core.web")


async def test_a_job_started_without_a_supervisor_does_not_tag_the_servers_other_lines(
    cluster: Cluster, json_log: io.StringIO
) -> None:
    """The job context is set for the job's own task only: a job started without a
    supervising task (nearly every job) is started from the server's delivery
    task, and its context used to stay set there, so later lines of that task --
    about other jobs, or about none -- carried the last started job's id."""

    async def job(arg: JobArgument, token: StopToken, heartbeat: object) -> None:
        await token.wait()

    server = await cluster.add_server("alpha", 5, job=job)
    ids = [await cluster.client.create_job(f"tagged-{i}") for i in range(3)]
    await eventually(lambda: set(ids) <= set(server.running()), 5, what="jobs running")
    for job_id in ids:
        await cluster.client.pause(job_id)
    await eventually(lambda: not server.running(), 5, what="jobs stopped")
    await eventually(
        lambda: sum("job stopped" in r["message"] for r in lines(json_log)) == 3, 5, what="stops"
    )

    records = [r for r in lines(json_log) if r["logger"].startswith("orchestratr")]
    named = [(r, [j for j in ids if f"job_id={j}" in r["message"]]) for r in records]
    held = {js[0] for r, js in named if js and r["message"].startswith("hold ")}
    assert held == set(ids), records  # lines of the delivery/command side, after the starts
    for record, in_text in named:
        assert record["job_id"] == (in_text[0] if in_text else None), record
