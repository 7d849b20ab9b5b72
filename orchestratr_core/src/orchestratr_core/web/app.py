"""The FastAPI application: JSON API under ``/api``, the dashboard at ``/``,
Prometheus metrics at ``/metrics``, the OpenAPI document at ``/api/openapi.json``."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.staticfiles import StaticFiles

from orchestratr_core import metrics as _metrics
from orchestratr_core.client import OrchestratorClient
from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    DuplicateJobName,
    InvalidJobInput,
    JobNotUpdatable,
    OrchestratrError,
    PermanentBackendError,
    UnknownJob,
    UnknownServer,
)
from orchestratr_core.job import (
    JobQuery,
    JobStatus,
    ServerQuery,
    ServerStatus,
)
from orchestratr_core.logs import add_secret
from orchestratr_core.monitor import MAX_PAGE_SIZE, OrchestratorMonitor
from orchestratr_core.web.auth import MIN_TOKEN_LENGTH, AccessPolicy, is_loopback, resolve_token
from orchestratr_core.web.guard import (
    DEFAULT_MAX_BODY,
    RequestGuard,
    body_limit,
    security_headers,
)
from orchestratr_core.web.history import FleetHistory
from orchestratr_core.web.models import (
    CreateJob,
    Health,
    HistoryOut,
    JobOut,
    JobPageOut,
    ServerOut,
    UpdateJob,
    job_out,
    plain,
    problem_responses,
    server_out,
)
from orchestratr_core.web.problems import ApiProblem, problem_response

__all__ = ["WebBackend", "create_app"]

log = logging.getLogger("orchestratr.web")

# Declares the bearer scheme in the OpenAPI document; AccessPolicy does the checking.
_BEARER = HTTPBearer(auto_error=False, description="The API token (ORCHESTRATR_API_TOKEN)")


# -- what the app talks to ------------------------------------------------------------


@dataclass
class WebBackend:
    """The parts of a manager the app needs: a client, a monitor and a way to
    drain a server. Build it from a running :class:`ServerManager` with
    :meth:`of`, or from URLs with :meth:`open` (for ``orchestratr web``, which
    serves the API beside the managers without being one)."""

    client: OrchestratorClient
    monitor: OrchestratorMonitor
    drain: Callable[[str], Awaitable[None]]
    ready: Callable[[], Awaitable[str | None]] | None = None
    """``/readyz``: ``None`` when ready, else why not (see :mod:`orchestratr_core.health`)."""
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, manager: Any) -> WebBackend:
        """The backend of a :class:`~orchestratr_core.manager.ServerManager`
        (started by its owner)."""
        return cls(
            client=manager.client,
            monitor=manager.monitor,
            drain=manager.drain_server,
            ready=manager.readiness,
        )

    @classmethod
    async def open(cls, storage: Any, transport: Any) -> WebBackend:
        """Open a storage and connect a transport (objects, plugin names or URLs)
        and build a backend on them; :meth:`close` closes both.

        :raises ConfigurationError: a transport whose broker lives in this
            process (``memory://``) beside a storage other processes share: jobs
            created here would be marked sent to a broker no server listens
            to, and stay pending.
        :raises PluginNotFound, MissingDriver, BackendUnavailable,
            PermanentBackendError: as the plugin system and backends raise them.
        """
        from orchestratr_core.manager import ServerManager

        manager = ServerManager(storage=storage, transport=transport)
        if manager.transport.process_local and not manager.storage.process_local:
            raise ConfigurationError(
                "the memory transport reaches only servers inside this process, and the web "
                "API runs none: jobs created or cancelled here would be marked sent into a "
                "broker no server listens to and stay pending. Give the fleet's broker "
                "(--transport amqp://...), or --storage memory to try the API on its own"
            )
        await manager.storage.open()
        try:
            await manager.transport.connect()
        except BaseException:
            await manager.storage.close()
            raise
        backend = cls.of(manager)

        async def ready() -> str | None:
            if not manager.transport.connected:
                return "no live broker session (reconnecting)"
            return None if await manager.storage_answers() else "the storage does not answer"

        backend.ready = ready
        backend._closers += [manager.transport.close, manager.storage.close]
        return backend

    async def close(self) -> None:
        """Close what :meth:`open` opened (nothing for :meth:`of`)."""
        closers, self._closers = self._closers, []
        for close in closers:
            with contextlib.suppress(OrchestratrError, OSError):
                await close()


# -- the app ------------------------------------------------------------------------


def create_app(
    source: Any,
    token: str | None = None,
    *,
    host: str | None = None,
    history_interval: float = 1.0,
    history_window: float = 600.0,
    public_metrics: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> FastAPI:
    """Build the web app for a manager or its parts.

    :param source: a :class:`~orchestratr_core.manager.ServerManager` or a
        :class:`WebBackend`.
    :param token: the API's bearer token; ``None`` reads ``ORCHESTRATR_API_TOKEN``.
    :param host: the address the app is bound to. Calls without a token are
        allowed only if this is a loopback address and no token is configured;
        ``None`` (unknown) counts as not loopback. :func:`serve` sets it.
    :param history_interval: seconds between samples of the chart.
    :param history_window: seconds of samples the chart keeps.
    :param public_metrics: serve ``/metrics`` without the token (for a scraper
        on a network you trust).
    :param max_body_bytes: largest request body accepted; longer ones get 413
        (checked from ``Content-Length`` and while a chunked body streams in).
    :raises ConfigurationError: a token that is not printable ASCII, or a body
        limit below 1.
    """
    max_body = body_limit(max_body_bytes)
    backend = source if isinstance(source, WebBackend) else WebBackend.of(source)
    secret = resolve_token(token)
    add_secret(secret)
    if secret is not None and len(secret) < MIN_TOKEN_LENGTH:
        log.warning(
            "the API token is only %d characters long: use at least %d random characters "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')",
            len(secret),
            MIN_TOKEN_LENGTH,
        )
    policy = AccessPolicy(token=secret, loopback=is_loopback(host))
    history = FleetHistory(backend.monitor, interval=history_interval, window=history_window)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        history.start()
        try:
            yield
        finally:
            await history.stop()

    app = FastAPI(
        title="OrchestratR",
        version=_version(),
        description="Run infinite jobs across a fleet of servers: create, cancel, list and "
        "watch them; drain servers. Every call needs `Authorization: Bearer <token>` "
        "unless the API is bound to loopback and no token is configured.",
        openapi_url="/api/openapi.json",
        docs_url=None,  # Swagger UI loads from a CDN; the dashboard is the UI
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.backend = backend
    app.state.policy = policy
    app.state.history = history

    def _check(request: Request, write: bool) -> None:
        headers = {k.lower(): v for k, v in request.headers.items()}
        policy.check(
            request.headers.get("authorization"), headers, write=write, scheme=request.url.scheme
        )

    async def can_read(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        _check(request, write=False)

    async def can_write(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        _check(request, write=True)

    reader = [Depends(can_read)]
    writer = [Depends(can_write)]

    # -- errors ---------------------------------------------------------------------

    @app.exception_handler(ApiProblem)
    async def _api_problem(_: Request, exc: ApiProblem) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        malformed = any(e.get("type") == "json_invalid" for e in exc.errors())
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
        if malformed:
            return problem_response(400, "Malformed request", detail, "malformed-request")
        return problem_response(422, "Invalid request", detail, "invalid-request", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {404: "Not found", 405: "Method not allowed", 413: "Payload too large"}.get(
            exc.status_code, "Error"
        )
        return problem_response(
            exc.status_code,
            title,
            str(exc.detail),
            title.lower().replace(" ", "-"),
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(OrchestratrError)
    async def _orchestratr(_: Request, exc: OrchestratrError) -> JSONResponse:
        if isinstance(exc, InvalidJobInput):
            return problem_response(422, "Invalid job input", str(exc), "invalid-job-input")
        if isinstance(exc, DuplicateJobName):
            return problem_response(409, "Duplicate job name", str(exc), "duplicate-job-name")
        if isinstance(exc, JobNotUpdatable):
            return problem_response(409, "Job not updatable", str(exc), "job-not-updatable")
        if isinstance(exc, UnknownJob):
            return problem_response(404, "Unknown job", str(exc), "unknown-job")
        if isinstance(exc, UnknownServer):
            return problem_response(404, "Unknown server", str(exc), "unknown-server")
        if isinstance(exc, BackendUnavailable | PermanentBackendError):
            log.warning("backend error answering an API call: %s", exc)
            return problem_response(
                503,
                "Backend unavailable",
                str(exc),
                "backend-unavailable",
                headers={"Retry-After": "5"},
            )
        log.error("API call failed: %s", exc)
        return problem_response(500, "Internal error", str(exc), "internal-error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("API call failed unexpectedly")
        # This answer is sent from outside every middleware: it brings its own headers.
        return problem_response(
            500,
            "Internal error",
            "the server could not answer; see its log",
            "internal-error",
            headers=security_headers(request.url.path),
        )

    # Innermost of the error handling: checks access before any body is read.
    app.add_middleware(RequestGuard, policy=policy, max_body=max_body)

    # -- jobs -----------------------------------------------------------------------

    @app.post(
        "/api/jobs",
        status_code=201,
        response_model=JobOut,
        dependencies=writer,
        responses=problem_responses(400, 409, 422, 503),
        tags=["jobs"],
        summary="Create a job",
    )
    async def create_job(body: CreateJob, response: Response) -> JobOut:
        """Create a job; it starts on one server as soon as one has room."""
        job_id = await backend.client.create_job(
            body.name,
            body.argument,
            kind=body.kind,
            require=body.require,
            spread=body.spread,
            max_restarts=body.max_restarts,
            restart_window=body.restart_window,
        )
        response.headers["Location"] = f"/api/jobs/{job_id}"
        return job_out(await backend.monitor.job(job_id))

    @app.get(
        "/api/jobs",
        response_model=JobPageOut,
        dependencies=reader,
        responses=problem_responses(422, 503),
        tags=["jobs"],
        summary="List jobs (filtered, keyset-paged)",
    )
    async def list_jobs(
        status: Annotated[
            list[JobStatus] | None,
            Query(description="Only these statuses (repeat the parameter for several)"),
        ] = None,
        name_prefix: Annotated[str | None, Query(description="Names starting with this")] = None,
        server_id: Annotated[str | None, Query(description="Jobs on this server")] = None,
        kind: Annotated[str | None, Query(description="Jobs of this kind")] = None,
        include_deleted: Annotated[
            bool, Query(description="Also deleted jobs (when no status is given)")
        ] = False,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Page size")] = 50,
        cursor: Annotated[
            str | None, Query(description="`next_cursor` of the previous page")
        ] = None,
        total: Annotated[bool, Query(description="Also count the matching jobs")] = False,
    ) -> JobPageOut:
        """Jobs in creation order, one page at a time. Paging by cursor stays fast
        at any depth."""
        if name_prefix is not None:
            plain(name_prefix, "name_prefix", status=422)
        if server_id is not None:
            plain(server_id, "server_id", status=422)
        if cursor is not None:
            plain(cursor, "cursor", status=422)
        if kind is not None:
            plain(kind, "kind", status=422)
        query = JobQuery(
            kind=kind or None,
            statuses=frozenset(status) if status else None,
            name_prefix=name_prefix or None,
            server_id=server_id or None,
            include_deleted=include_deleted,
            after=cursor or None,
            limit=limit,
        )
        page = await backend.monitor.jobs(query, with_total=total)
        return JobPageOut(
            items=[job_out(j) for j in page.items],
            next_cursor=page.next_cursor,
            total=page.total if total else None,
        )

    @app.get(
        "/api/jobs/{job_id}",
        response_model=JobOut,
        dependencies=reader,
        responses=problem_responses(404, 503),
        tags=["jobs"],
        summary="Show a job",
    )
    async def get_job(job_id: str) -> JobOut:
        """One job, whatever its status."""
        return job_out(await backend.monitor.job(plain(job_id, "job", status=404)))

    @app.post(
        "/api/jobs/{job_id}/cancel",
        status_code=202,
        response_model=JobOut,
        dependencies=writer,
        responses=problem_responses(404, 503),
        tags=["jobs"],
        summary="Cancel a job",
    )
    async def cancel_job(job_id: str) -> JobOut:
        """Cancel a job, durably: it stops wherever it runs and never runs again
        (``deleting`` until a server confirms, then ``deleted``). Cancelling a job
        that is already cancelled or completed changes nothing."""
        return job_out(await backend.client.mark_on_deleting(plain(job_id, "job", status=404)))

    @app.post(
        "/api/jobs/{job_id}/pause",
        status_code=202,
        response_model=JobOut,
        dependencies=writer,
        responses=problem_responses(404, 503),
        tags=["jobs"],
        summary="Pause a job",
    )
    async def pause_job(job_id: str) -> JobOut:
        """Pause a job, durably: it stops wherever it runs (``pausing`` until a
        server confirms, then ``paused``) and does not run again until resumed.
        Pausing a job that is not pending or processing changes nothing."""
        return job_out(await backend.client.pause(plain(job_id, "job", status=404)))

    @app.post(
        "/api/jobs/{job_id}/resume",
        status_code=202,
        response_model=JobOut,
        dependencies=writer,
        responses=problem_responses(404, 503),
        tags=["jobs"],
        summary="Resume a paused or quarantined job",
    )
    async def resume_job(job_id: str) -> JobOut:
        """Resume a ``paused`` or ``quarantined`` job (``pending`` again, with its
        latest checkpoint and a fresh restart budget). A job still ``pausing``, or
        in any other status, is returned unchanged."""
        return job_out(await backend.client.resume(plain(job_id, "job", status=404)))

    @app.post(
        "/api/jobs/{job_id}/update",
        status_code=202,
        response_model=JobOut,
        dependencies=writer,
        responses=problem_responses(400, 404, 409, 422, 503),
        tags=["jobs"],
        summary="Replace a job's argument",
    )
    async def update_job(job_id: str, body: UpdateJob) -> JobOut:
        """Replace a job's argument, durably. A running job whose function is
        ``@updatable`` takes it without a restart when its server and every live
        server support it (``update_mode`` ``in_place``; ``restart: true`` asks
        for a restart instead); any other pending or running job is
        restarted with it as a clean hand-over (``pausing`` until its copy is
        confirmed stopped, then ``pending`` under a new generation); a paused or
        quarantined one resumes with it. 409 for a cancelled or completed job,
        422 for a bad argument: nothing is changed."""
        job_id = plain(job_id, "job", status=404)
        return job_out(
            await backend.client.update(job_id, body.argument, in_place=not body.restart)
        )

    # -- servers --------------------------------------------------------------------

    @app.get(
        "/api/servers",
        response_model=list[ServerOut],
        dependencies=reader,
        responses=problem_responses(503),
        tags=["servers"],
        summary="List servers with their running jobs",
    )
    async def list_servers(
        include_gone: Annotated[
            bool, Query(alias="all", description="Also servers that died or left")
        ] = False,
        kind: Annotated[str | None, Query(description="Servers that run this kind")] = None,
        label: Annotated[str | None, Query(description="Servers with this KEY=VALUE label")] = None,
    ) -> list[ServerOut]:
        """Live (alive and draining) servers, or every server ever seen."""
        for value, what in ((kind, "kind"), (label, "label")):
            if value is not None:
                plain(value, what, status=422)
        query = ServerQuery(statuses=None) if include_gone else ServerQuery()
        query = dataclasses.replace(query, kind=kind or None, label=label or None)
        return [server_out(s) for s in await backend.monitor.servers(query)]

    @app.get(
        "/api/servers/{server_id}",
        response_model=ServerOut,
        dependencies=reader,
        responses=problem_responses(404, 503),
        tags=["servers"],
        summary="Show a server",
    )
    async def get_server(server_id: str) -> ServerOut:
        """One server with its running jobs."""
        return server_out(await backend.monitor.server(plain(server_id, "server", status=404)))

    @app.post(
        "/api/servers/{server_id}/drain",
        status_code=202,
        response_model=ServerOut,
        dependencies=writer,
        responses=problem_responses(404, 503),
        tags=["servers"],
        summary="Drain a server",
    )
    async def drain_server(server_id: str) -> ServerOut:
        """Ask a live server to hand all its jobs to the others and exit."""
        await backend.drain(plain(server_id, "server", status=404))
        return server_out(await backend.monitor.server(server_id))

    # -- dashboard support ----------------------------------------------------------

    @app.get(
        "/api/history",
        response_model=HistoryOut,
        dependencies=reader,
        responses=problem_responses(503),
        tags=["dashboard"],
        summary="Running jobs per server over the last minutes",
    )
    async def get_history() -> HistoryOut:
        """The chart's data, sampled by the app every ``interval`` seconds."""
        await history.sample_if_stale()
        return HistoryOut(
            interval=history.interval,
            window=history.window,
            names=dict(history.names),
            samples=[{"t": s.t, "running": s.running} for s in history.samples()],
        )

    @app.get("/api/health", response_model=Health, tags=["dashboard"], summary="Liveness")
    async def health() -> Health:
        """Always answers (no token needed; says nothing about the fleet)."""
        return Health(status="ok", auth="loopback" if policy.open_locally else "token")

    # -- probes (orchestratr_core.health): no token, nothing about the fleet ---------

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> PlainTextResponse:
        """Liveness: answering at all means the event loop runs."""
        return PlainTextResponse("ok\n")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> PlainTextResponse:
        """Readiness: broker and storage reachable (a manager: consuming events)."""
        reason = await backend.ready() if backend.ready is not None else None
        return PlainTextResponse(f"{reason or 'ok'}\n", status_code=503 if reason else 200)

    # -- metrics ----------------------------------------------------------------------

    registry, refresh = _cluster_metrics(backend.monitor)

    @app.get(
        "/metrics",
        include_in_schema=False,
        dependencies=[] if public_metrics else reader,
    )
    async def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        _metrics.install()
        try:
            await refresh()
        except OrchestratrError as exc:
            log.warning("cluster metrics unavailable: %s", exc)
        body = generate_latest(REGISTRY) + generate_latest(registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # -- the page ---------------------------------------------------------------------

    static = importlib.resources.files("orchestratr_core.web") / "static"

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


def _cluster_metrics(monitor: OrchestratorMonitor) -> tuple[Any, Callable[[], Awaitable[None]]]:
    """A registry of gauges describing the fleet, refreshed at each scrape."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    servers = Gauge(
        "orchestratr_cluster_servers", "Servers by status", ["status"], registry=registry
    )
    running = Gauge(
        "orchestratr_cluster_jobs_running",
        "Jobs running per live server",
        ["server_id", "server_name"],
        registry=registry,
    )
    age = Gauge(
        "orchestratr_cluster_heartbeat_age_seconds",
        "Seconds since each live server's last heartbeat",
        ["server_id", "server_name"],
        registry=registry,
    )
    capacity = Gauge(
        "orchestratr_cluster_capacity", "Sum of max_workers of live servers", registry=registry
    )

    async def refresh() -> None:
        live = await monitor.servers()
        servers.clear()
        running.clear()
        age.clear()
        for status in (ServerStatus.ALIVE, ServerStatus.DRAINING):
            servers.labels(status=status.value).set(sum(1 for s in live if s.status is status))
        now = time.time()
        for server in live:
            out = server_out(server)
            running.labels(server_id=server.id, server_name=server.name).set(out.running)
            age.labels(server_id=server.id, server_name=server.name).set(
                max(0.0, now - server.last_seen.timestamp())
            )
        capacity.set(sum(s.max_workers for s in live))

    return registry, refresh


def _version() -> str:
    from orchestratr_core import __version__

    return __version__
