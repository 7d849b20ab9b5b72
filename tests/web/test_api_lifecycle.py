"""The lifecycle fields of a quarantined job with a checkpoint through the HTTP
API: what an operator reads in an incident (the dashboard's browser test shows
the same fields on the page)."""

from __future__ import annotations

import httpx

from orchestratr_core import JobArgument, JobStatus, StopToken
from orchestratr_core.lifecycle import checkpointed
from orchestratr_core.runner import Heartbeat
from tests.support.cluster import Cluster, eventually


async def test_a_quarantined_job_shows_its_reason_errors_checkpoint_and_restarts(
    cluster: Cluster, local_api: httpx.AsyncClient
) -> None:
    @checkpointed
    async def crashing(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
        heartbeat(checkpoint="offset=42")
        await token.sleep(0.6)  # a heartbeat carries the checkpoint
        raise RuntimeError("cannot reach the feed")

    await cluster.add_server("alpha", 2, job=crashing)
    created = await local_api.post(
        "/api/jobs", json={"name": "crash", "max_restarts": 1, "restart_window": 60}
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    await cluster.wait_status(job_id, JobStatus.QUARANTINED, 15)

    async def released() -> dict[str, object] | None:
        body = (await local_api.get(f"/api/jobs/{job_id}")).json()
        return body if body["server_id"] is None else None

    job = await eventually(released, 10, what="the quarantine confirmed")
    assert job["status"] == "quarantined"
    assert str(job["quarantine_reason"]).startswith("restart budget spent: 2 failures")
    assert "RuntimeError: cannot reach the feed" in str(job["last_error"])
    errors = job["last_errors"]
    assert isinstance(errors, list) and len(errors) == 2
    assert all("cannot reach the feed" in e["error"] for e in errors)
    assert job["failures"] == 2
    assert job["restarts"] >= 1
    assert job["checkpoint_size"] == len("offset=42")
    assert job["checkpoint_at"] is not None
    assert "offset=42" not in str(job)  # its size, not its content
    resumed = await local_api.post(f"/api/jobs/{job_id}/resume")
    assert resumed.status_code == 202
    assert resumed.json()["status"] == "pending"
    assert resumed.json()["quarantine_reason"] is None
    assert resumed.json()["last_errors"] == []


async def test_a_restart_budget_that_cannot_work_is_refused_and_nothing_is_created(
    cluster: Cluster, local_api: httpx.AsyncClient
) -> None:
    for body in (
        {"name": "b1", "max_restarts": -1},
        {"name": "b2", "max_restarts": "5"},
        {"name": "b3", "restart_window": 0},
    ):
        refused = await local_api.post("/api/jobs", json=body)
        assert 400 <= refused.status_code < 500, refused.text
        field = "max_restarts" if "max_restarts" in body else "restart_window"
        assert field in refused.json()["detail"], refused.json()
    listed = (await local_api.get("/api/jobs")).json()
    assert listed["items"] == []
