"""The web API's models (what it reads and answers), the checks that keep odd
input away from the storage, and the problem documents of its OpenAPI document."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from orchestratr_core.job import MAX_NAME_LENGTH, JobRecord, JobStatus, ServerRecord, ServerStatus
from orchestratr_core.placement import DEFAULT_KIND, parse_labels
from orchestratr_core.web.problems import ApiProblem, Problem

__all__ = [
    "MAX_ID_LENGTH",
    "CreateJob",
    "Health",
    "HistoryOut",
    "JobOut",
    "JobPageOut",
    "ServerJobOut",
    "ServerOut",
    "job_out",
    "plain",
    "problem_responses",
    "server_out",
]

MAX_ID_LENGTH = 200
"""Longest job or server id the API looks up."""


# -- API models ---------------------------------------------------------------------------


class CreateJob(BaseModel):
    """A request to create a job."""

    model_config = ConfigDict(extra="forbid")

    # Typed loosely on purpose: the core's validation answers, with the very
    # message the Python client raises ("job name must be a string, not int").
    name: Annotated[Any, WithJsonSchema({"type": "string"})] = Field(
        description=f"Unique among jobs that are not deleted; 1 to {MAX_NAME_LENGTH} "
        "characters, not blank, no surrounding white space, no control characters",
        examples=["feed-follower-42"],
    )
    argument: Annotated[Any, WithJsonSchema({"type": "string"})] = Field(
        default="", description="Passed to the job function (up to 64 KiB of UTF-8)"
    )
    kind: Annotated[Any, WithJsonSchema({"type": "string"})] = Field(
        default=DEFAULT_KIND,
        description="The job's kind: only a server that runs it takes the job",
        examples=["feed"],
    )
    require: Annotated[Any, WithJsonSchema({"type": "array", "items": {"type": "string"}})] = Field(
        default=None,
        description="Hard constraints on the server's labels: KEY=VALUE or KEY!=VALUE",
        examples=[["region=eu"]],
    )
    spread: Annotated[Any, WithJsonSchema({"type": "string"})] = Field(
        default=None, description="Spread group: its jobs avoid sharing a server"
    )
    max_restarts: Annotated[Any, WithJsonSchema({"type": "integer", "minimum": 0})] = Field(
        default=None,
        description="Restart budget: quarantine the job after more than this many failures "
        "(exceptions and owner deaths) within restart_window (null: the default, 20)",
        examples=[5],
    )
    restart_window: Annotated[Any, WithJsonSchema({"type": "number", "exclusiveMinimum": 0})] = (
        Field(
            default=None,
            description="Seconds of the restart budget's window (null: the default, 600)",
            examples=[300],
        )
    )


class UpdateJob(BaseModel):
    """A request to replace a job's argument."""

    model_config = ConfigDict(extra="forbid")

    # Typed loosely on purpose, as CreateJob: the core's validation answers.
    argument: Annotated[Any, WithJsonSchema({"type": "string"})] = Field(
        description="The new argument (up to 64 KiB of UTF-8); a running job takes it "
        "in place if its function is @updatable, else it restarts with it"
    )
    restart: bool = Field(
        default=False,
        description="Restart a running job with it even if its function could take it in place",
    )


class FailureOut(BaseModel):
    """One failure of a job: its function raised, or its server died holding it."""

    at: datetime
    error: str


class JobOut(BaseModel):
    """A job."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    argument: str
    status: JobStatus
    server_id: str | None = Field(description="The server running it, if any")
    fence: int = Field(description="Fencing token of the current ownership; only ever grows")
    generation: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    last_heartbeat: datetime | None = Field(
        description="When the job function last called heartbeat(), as stored (kept fresh "
        "for jobs with a watchdog)"
    )
    liveness: datetime | None = Field(
        default=None,
        description="When the job was last known alive: its server's last heartbeat while "
        "it runs on a live server, else `last_heartbeat`",
    )
    restarts: int = Field(description="How often the job function failed and was restarted")
    last_error: str | None
    reason: str | None = Field(description="Why the job last changed status, when not obvious")
    checkpoint_size: int | None = Field(
        default=None, description="Bytes of the latest stored checkpoint (none: null)"
    )
    checkpoint_at: datetime | None = Field(default=None, description="When it was stored")
    checkpoint_fence: int | None = Field(
        default=None, description="Fencing token of the owner that wrote it"
    )
    max_restarts: int | None = Field(default=None, description="Restart budget (null: default)")
    restart_window: float | None = Field(
        default=None, description="Restart budget's window in seconds (null: default)"
    )
    failures: int = Field(
        default=0,
        description="Failures counted against the budget, ever, plus one per resume "
        "(the failure record's version)",
    )
    last_errors: list[FailureOut] = Field(
        default_factory=list, description="The latest failures, oldest first"
    )
    quarantine_reason: str | None = Field(
        default=None, description="Why the job is quarantined (when it is)"
    )
    kind: str = Field(default=DEFAULT_KIND, description="The job's kind")
    constraints: list[str] = Field(
        default_factory=list, description="Hard constraints on its server's labels"
    )
    spread: str | None = Field(default=None, description="Its spread group, if any")
    pending_reason: str | None = Field(
        default=None,
        description="While pending: why no server runs it (e.g. no live server "
        "runs its kind with its labels)",
    )
    argument_version: int = Field(default=0, description="How many times the argument was updated")
    argument_updated_at: datetime | None = Field(
        default=None, description="When the argument was last updated"
    )
    update_pending: bool = Field(
        default=False,
        description="An update waits for the running copy to stop; then the job "
        "restarts with the new argument",
    )
    update_mode: Literal["in_place", "restart"] | None = Field(
        default=None,
        description="How the latest update reaches the job's current generation: "
        "`in_place` (its running copy takes it without a restart; function marked "
        "@updatable) or `restart`; null if never updated",
    )
    argument_applied_version: int = Field(
        default=0,
        description="The latest argument version the running copy acknowledged "
        "taking in place (0: none)",
    )


class JobPageOut(BaseModel):
    """One page of jobs, in creation order."""

    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")
    total: int | None = Field(description="Jobs matching the filters (when `total=true`)")


class ServerJobOut(BaseModel):
    """A job running on a server."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    status: JobStatus
    fence: int
    restarts: int
    last_heartbeat: datetime | None
    liveness: datetime | None = Field(
        default=None, description="Its server's last heartbeat while the server is live"
    )


class ServerOut(BaseModel):
    """A server with the jobs it runs."""

    id: str
    name: str
    status: ServerStatus
    max_workers: int = Field(description="Capacity: most jobs it runs at once")
    running: int = Field(description="Jobs it runs now")
    load: float = Field(description="running / max_workers")
    started_at: datetime
    last_seen: datetime = Field(description="Its last heartbeat")
    heartbeat_age: float = Field(description="Seconds since its last heartbeat")
    host: str
    pid: int
    jobs: list[ServerJobOut]
    kinds: list[str] = Field(default_factory=lambda: [DEFAULT_KIND], description="Kinds it runs")
    labels: dict[str, str] = Field(default_factory=dict, description="Its labels")


class HistoryOut(BaseModel):
    """Running jobs per server over the last minutes."""

    interval: float
    window: float
    names: dict[str, str] = Field(description="server id -> server name")
    samples: list[dict[str, Any]] = Field(
        description="oldest first: {t: epoch seconds, running: {server id: jobs}}"
    )


class Health(BaseModel):
    """Liveness of the API process."""

    status: str
    auth: str = Field(description="'token' or 'loopback' (open to this host only)")


def server_out(server: ServerRecord) -> ServerOut:
    running = sum(1 for j in server.running if j.status is JobStatus.PROCESSING)
    age = max(0.0, (datetime.now(UTC) - server.last_seen).total_seconds())
    return ServerOut(
        id=server.id,
        name=server.name,
        status=server.status,
        max_workers=server.max_workers,
        running=running,
        load=running / server.max_workers if server.max_workers else 0.0,
        started_at=server.started_at,
        last_seen=server.last_seen,
        heartbeat_age=round(age, 3),
        host=server.host,
        pid=server.pid,
        jobs=[ServerJobOut.model_validate(j) for j in server.running],
        kinds=list(server.kinds),
        labels=parse_labels(server.labels),
    )


def job_out(job: JobRecord) -> JobOut:
    """The API's view of a job: its record as :meth:`JobRecord.to_dict` shows it."""
    return JobOut.model_validate(job.to_dict())


# -- input checks that keep odd bytes away from the storage ---------------------------


def plain(value: str, what: str, *, status: int) -> str:
    """``value`` if it is short and free of control characters, else a problem."""
    bad = len(value) > MAX_ID_LENGTH or any(
        unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in value
    )
    if bad:
        if status == 404:
            raise ApiProblem(
                404, "Not found", f"no {what} with id {value[:80]!r}", kind="not-found"
            )
        raise ApiProblem(
            422,
            "Invalid request",
            f"{what} must be at most {MAX_ID_LENGTH} characters without control characters",
            kind="invalid-job-input",
        )
    return value


# -- problem documents in the OpenAPI document ------------------------------------------


_PROBLEM_CONTENT = {
    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
}
_DESCRIBED = {
    400: "Malformed request",
    401: "Missing or invalid bearer token",
    403: "No token configured and not bound to loopback (or behind a proxy)",
    404: "No such job or server",
    409: "A job of this name exists",
    413: "Request body larger than the limit",
    422: "Rejected by validation",
    503: "Storage or broker unavailable",
}


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for problem documents with these status codes."""
    return {
        code: {"model": Problem, "description": _DESCRIBED[code], "content": _PROBLEM_CONTENT}
        for code in sorted({401, 403, 413, 422, 503, *codes})
    }
