"""The HTTP API against a manager and servers on the memory backends."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from orchestratr_core import JobArgument, StopToken
from orchestratr_core.errors import ConfigurationError
from orchestratr_core.job import JobStatus
from orchestratr_core.lifecycle import updatable
from orchestratr_core.runner import UpdatableHeartbeat
from orchestratr_core.web import create_app, start_server
from tests.support.cluster import Cluster, eventually
from tests.support.web import TOKEN, client_for

PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int, detail: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:orchestratr:problem:")
    assert body["title"]
    if detail is not None:
        assert body["detail"] == detail
    return body


# -- jobs ---------------------------------------------------------------------------------


async def test_create_returns_the_job_and_it_starts_on_a_server(
    cluster: Cluster, local_api: httpx.AsyncClient
) -> None:
    server = await cluster.add_server("alpha", 3)
    response = await local_api.post("/api/jobs", json={"name": "feed-1", "argument": "tenant=7"})
    assert response.status_code == 201
    job = response.json()
    assert job["name"] == "feed-1" and job["argument"] == "tenant=7"
    assert response.headers["location"] == f"/api/jobs/{job['id']}"

    async def running() -> dict | None:
        body = (await local_api.get(f"/api/jobs/{job['id']}")).json()
        return body if body["status"] == "processing" else None

    shown = await eventually(running, 5, what="job processing")
    assert shown["server_id"] == server.id
    assert shown["fence"] > 0


async def test_list_pages_by_cursor_in_creation_order_with_filters(
    cluster: Cluster, local_api: httpx.AsyncClient
) -> None:
    ids = [
        (await local_api.post("/api/jobs", json={"name": f"a-{i:02}"})).json()["id"]
        for i in range(7)
    ]
    await local_api.post("/api/jobs", json={"name": "b-0"})

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 3, "name_prefix": "a-", "total": "true"}
        if cursor:
            params["cursor"] = cursor
        page = (await local_api.get("/api/jobs", params=params)).json()
        assert page["total"] == 7
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    assert pages == 3

    pending = (await local_api.get("/api/jobs", params={"status": ["pending"]})).json()
    assert {j["status"] for j in pending["items"]} == {"pending"}
    assert len(pending["items"]) == 8
    assert pending["total"] is None  # only counted when asked

    none = (await local_api.get("/api/jobs", params={"status": ["completed"]})).json()
    assert none["items"] == [] and none["next_cursor"] is None


async def test_cancel_hides_the_job_unless_deleted_ones_are_asked_for(
    cluster: Cluster, local_api: httpx.AsyncClient
) -> None:
    await cluster.add_server("alpha", 3)
    job = (await local_api.post("/api/jobs", json={"name": "doomed"})).json()
    await cluster.wait_running([job["id"]])

    response = await local_api.post(f"/api/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] in ("deleting", "deleted")
    await cluster.wait_status(job["id"], JobStatus.DELETED, 5)
    await eventually(lambda: not cluster.ledger.running(job["id"]), 5, what="copy stopped")

    listed = (await local_api.get("/api/jobs")).json()["items"]
    assert job["id"] not in [j["id"] for j in listed]
    with_deleted = (await local_api.get("/api/jobs", params={"include_deleted": "true"})).json()
    assert [j["status"] for j in with_deleted["items"] if j["id"] == job["id"]] == ["deleted"]

    again = await local_api.post(f"/api/jobs/{job['id']}/cancel")
    assert again.status_code == 202
    assert again.json()["status"] == "deleted"


async def test_unknown_job_is_a_404_problem(local_api: httpx.AsyncClient) -> None:
    assert_problem(
        await local_api.get("/api/jobs/no-such-job"), 404, "no job with id 'no-such-job'"
    )
    assert_problem(await local_api.post("/api/jobs/no-such-job/cancel"), 404)
    assert_problem(await local_api.get("/api/jobs/%00bad"), 404)


async def test_duplicate_name_is_a_409_problem_with_the_clients_message(
    local_api: httpx.AsyncClient,
) -> None:
    assert (await local_api.post("/api/jobs", json={"name": "once"})).status_code == 201
    body = assert_problem(await local_api.post("/api/jobs", json={"name": "once"}), 409)
    assert (
        body["detail"] == "a job named 'once' already exists (cancel it first or pick another name)"
    )


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"name": ""}, "job name must not be empty"),
        ({"name": "   "}, "job name must not be blank"),
        ({"name": " padded"}, "job name must not start or end with white space"),
        ({"name": "x" * 201}, "job name is 201 characters long; the limit is 200"),
        ({"name": "bell\x07"}, "job name contains the control character U+0007 at position 4"),
        ({"name": 42}, "job name must be a string, not int"),
        (
            {"name": "big", "argument": "x" * (64 * 1024 + 1)},
            "job argument is 65537 bytes; the limit is 65536 bytes",
        ),
    ],
)
async def test_invalid_input_is_a_422_problem_with_the_clients_message(
    local_api: httpx.AsyncClient, body: dict, detail: str
) -> None:
    assert_problem(await local_api.post("/api/jobs", json=body), 422, detail)
    listed = (await local_api.get("/api/jobs", params={"include_deleted": "true"})).json()
    assert listed["items"] == []  # nothing stored


async def test_malformed_requests_are_problems_too(local_api: httpx.AsyncClient) -> None:
    bad_json = await local_api.post(
        "/api/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(bad_json, 400)
    body = assert_problem(await local_api.post("/api/jobs", json={}), 422)
    assert body["errors"][0]["loc"] == ["body", "name"]
    assert_problem(await local_api.get("/api/jobs", params={"status": "running"}), 422)
    assert_problem(await local_api.get("/api/jobs", params={"limit": 0}), 422)
    assert_problem(await local_api.get("/api/jobs", params={"limit": 1001}), 422)
    assert_problem(await local_api.get("/api/nowhere"), 404)
    assert_problem(await local_api.delete("/api/jobs"), 405)


# -- servers ---------------------------------------------------------------------------


async def test_servers_are_listed_with_their_running_jobs_and_load(
    cluster: Cluster, local_api: httpx.AsyncClient
) -> None:
    alpha = await cluster.add_server("alpha", 4)
    ids = await cluster.create(2)
    await cluster.wait_running(ids)

    async def loaded() -> list | None:
        servers = (await local_api.get("/api/servers")).json()
        return servers if servers and servers[0]["running"] == 2 else None

    servers = await eventually(loaded, 5, what="server shows its 2 jobs")
    (shown,) = servers
    assert shown["id"] == alpha.id and shown["name"] == "alpha"
    assert shown["status"] == "alive"
    assert shown["max_workers"] == 4 and shown["load"] == 0.5
    assert shown["heartbeat_age"] < 5
    assert sorted(j["id"] for j in shown["jobs"]) == sorted(ids)

    one = (await local_api.get(f"/api/servers/{alpha.id}")).json()
    assert one["id"] == alpha.id
    assert_problem(await local_api.get("/api/servers/nobody"), 404, "no server with id 'nobody'")


async def test_drain_moves_the_jobs_to_the_other_server(
    cluster: Cluster, local_api: httpx.AsyncClient
) -> None:
    alpha = await cluster.add_server("alpha", 5)
    ids = await cluster.create(3)
    await cluster.wait_running(ids)
    beta = await cluster.add_server("beta", 5)

    response = await local_api.post(f"/api/servers/{alpha.id}/drain")
    assert response.status_code == 202
    assert response.json()["status"] == "draining"

    def all_on_beta() -> bool:
        return all([c.server for c in cluster.ledger.running(j)] == ["beta"] for j in ids)

    await eventually(all_on_beta, 10, what="jobs moved to beta")
    await cluster.wait_status(ids[0], JobStatus.PROCESSING)
    assert (await cluster.job(ids[0])).server_id == beta.id
    assert_problem(await local_api.post("/api/servers/nobody/drain"), 404)


# -- access rules ----------------------------------------------------------------------


async def test_loopback_without_token_is_open(cluster: Cluster) -> None:
    app = create_app(cluster.manager, None, host="127.0.0.1")
    async with client_for(app) as api:
        assert (await api.get("/api/servers")).status_code == 200
        assert (await api.post("/api/jobs", json={"name": "local"})).status_code == 201
        assert (await api.get("/api/health")).json() == {"status": "ok", "auth": "loopback"}


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", None])
async def test_non_loopback_without_token_refuses_everything(
    cluster: Cluster, host: str | None
) -> None:
    app = create_app(cluster.manager, None, host=host)
    async with client_for(app) as api:
        body = assert_problem(await api.get("/api/jobs"), 403)
        assert "ORCHESTRATR_API_TOKEN" in body["detail"]
        assert_problem(await api.post("/api/jobs", json={"name": "x"}), 403)
        assert_problem(await api.get("/metrics"), 403)
    assert await cluster.monitor.all_jobs() == []


async def test_a_proxy_in_front_of_loopback_needs_a_token(cluster: Cluster) -> None:
    app = create_app(cluster.manager, None, host="127.0.0.1")
    async with client_for(app) as api:
        response = await api.get("/api/jobs", headers={"X-Forwarded-For": "203.0.113.5"})
        assert_problem(response, 403)


async def test_token_is_required_for_every_call_when_configured(cluster: Cluster) -> None:
    server = await cluster.add_server("alpha", 2)
    job_id = await cluster.client.create_job("kept")
    app = create_app(cluster.manager, TOKEN, host="127.0.0.1")
    calls = [
        ("GET", "/api/jobs", None),
        ("GET", f"/api/jobs/{job_id}", None),
        ("GET", "/api/servers", None),
        ("GET", f"/api/servers/{server.id}", None),
        ("GET", "/api/history", None),
        ("GET", "/metrics", None),
        ("POST", "/api/jobs", {"name": "sneaky"}),
        ("POST", f"/api/jobs/{job_id}/cancel", None),
        ("POST", f"/api/servers/{server.id}/drain", None),
    ]
    async with client_for(app) as anonymous, client_for(app, "wrong-token") as wrong:
        for method, path, body in calls:
            missing = await anonymous.request(method, path, json=body)
            assert_problem(missing, 401)
            assert missing.headers["www-authenticate"].startswith("Bearer")
            bad = assert_problem(await wrong.request(method, path, json=body), 401)
            assert TOKEN not in str(bad) and "wrong-token" not in str(bad)
        basic = await anonymous.get("/api/jobs", headers={"Authorization": f"Basic {TOKEN}"})
        assert_problem(basic, 401)
        # the page itself and the health check carry no data
        assert (await anonymous.get("/")).status_code == 200
        assert (await anonymous.get("/api/health")).json()["auth"] == "token"
    assert (await cluster.job(job_id)).status is not JobStatus.DELETING
    assert [j.name for j in await cluster.monitor.all_jobs()] == ["kept"]
    assert (await cluster.monitor.server(server.id)).status.value == "alive"


async def test_token_grants_reads_and_writes(
    cluster: Cluster, token_api: httpx.AsyncClient
) -> None:
    created = await token_api.post("/api/jobs", json={"name": "with-token"})
    assert created.status_code == 201
    cancelled = await token_api.post(f"/api/jobs/{created.json()['id']}/cancel")
    assert cancelled.status_code == 202
    assert (await token_api.get("/api/jobs")).status_code == 200


async def test_token_from_the_environment(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCHESTRATR_API_TOKEN", "from-env-token")
    app = create_app(cluster.manager, None, host="0.0.0.0")
    async with client_for(app) as anonymous, client_for(app, "from-env-token") as allowed:
        assert_problem(await anonymous.get("/api/jobs"), 401)
        assert (await allowed.get("/api/jobs")).status_code == 200


async def test_the_token_never_reaches_the_log(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    from orchestratr_core.logs import KeyValueFormatter

    caplog.set_level(logging.DEBUG)
    app = create_app(cluster.manager, TOKEN, host="127.0.0.1")
    async with client_for(app, "wrong-" + TOKEN) as api:
        await api.get("/api/jobs")
    logging.getLogger("orchestratr.test").warning("configured token is %s", TOKEN)
    formatted = [KeyValueFormatter().format(r) for r in caplog.records]
    assert formatted and not any(TOKEN in line for line in formatted)


# -- serving in the caller's loop --------------------------------------------------------


async def test_serve_runs_in_the_callers_loop_and_refuses_open_public_binds(
    cluster: Cluster,
) -> None:
    web = await start_server(cluster.manager, "127.0.0.1", 0)
    try:
        assert web.port > 0
        async with httpx.AsyncClient(base_url=web.url) as http:
            assert (await http.get("/api/openapi.json")).json()["info"]["title"] == "OrchestratR"
            assert (await http.post("/api/jobs", json={"name": "served"})).status_code == 201
            page = await http.get("/")
            assert "OrchestratR" in page.text
            assert "default-src 'self'" in page.headers["content-security-policy"]
        # the manager keeps working beside it
        await asyncio.sleep(0.2)
    finally:
        await web.stop()
    with pytest.raises(ConfigurationError, match="without a token"):
        await start_server(cluster.manager, "0.0.0.0", 0)
    web = await start_server(cluster.manager, "127.0.0.1", 0, token=TOKEN)
    try:
        with pytest.raises(ConfigurationError, match="cannot listen"):
            await start_server(cluster.manager, "127.0.0.1", web.port)
        async with httpx.AsyncClient(base_url=web.url) as http:
            assert (await http.get("/api/jobs")).status_code == 401
    finally:
        await web.stop()


async def test_run_web_opens_its_own_backend_serves_and_closes_on_cancel() -> None:
    import socket
    import uuid

    from orchestratr_core.web import run_web
    from orchestratr_memory import MemoryStorage
    from orchestratr_memory.broker import MemoryBroker

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    broker = f"web-run-{uuid.uuid4().hex[:8]}"
    storage = MemoryStorage()
    task = asyncio.create_task(
        run_web(storage, f"memory://{broker}", "127.0.0.1", port, install_signal_handlers=False)
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def answers() -> bool:
                try:
                    return (await http.get("/api/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(answers, 5, what="run_web listening")
            created = await http.post("/api/jobs", json={"name": "via-run-web"})
            assert created.status_code == 201
            listed = (await http.get("/api/jobs")).json()["items"]
            assert [j["name"] for j in listed] == ["via-run-web"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        MemoryBroker.reset(broker)
    with pytest.raises(ConfigurationError, match="without a token"):
        await run_web(storage, f"memory://{broker}", "0.0.0.0", 0, install_signal_handlers=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:9464", ("::1", 9464)),
        (":9000", ("127.0.0.1", 9000)),
        ("0.0.0.0", ("0.0.0.0", 8080)),
        ("::", ("::", 8080)),
    ],
)
def test_listen_addresses_are_parsed(text: str, expected: tuple[str, int]) -> None:
    from orchestratr_core.metrics import parse_listen_address

    assert parse_listen_address(text, 8080) == expected


@pytest.mark.parametrize("text", ["host:port", "host:70000", "a:b:c", ""])
def test_bad_listen_addresses_are_refused(text: str) -> None:
    from orchestratr_core.metrics import parse_listen_address

    with pytest.raises(ConfigurationError, match="listen address"):
        parse_listen_address(text, 8080)


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "evil.example"},  # DNS rebinding onto 127.0.0.1
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
async def test_tokenless_loopback_refuses_what_a_hostile_page_could_send(
    cluster: Cluster, headers: dict[str, str]
) -> None:
    app = create_app(cluster.manager, None, host="127.0.0.1")
    async with client_for(app) as api:
        assert_problem(await api.post("/api/jobs", json={"name": "csrf"}, headers=headers), 403)
        assert_problem(await api.get("/api/jobs", headers=headers), 403)
        same_site = {"Origin": "http://127.0.0.1:8080", "Sec-Fetch-Site": "same-origin"}
        assert (await api.get("/api/jobs", headers=same_site)).status_code == 200
    assert await cluster.monitor.all_jobs() == []


async def test_pause_and_resume_through_the_api_with_the_lifecycle_fields(
    cluster: Cluster, local_api: httpx.AsyncClient
) -> None:
    await cluster.add_server("alpha", 3)
    job = (await local_api.post("/api/jobs", json={"name": "held"})).json()
    assert job["checkpoint_size"] is None and job["last_errors"] == [] and job["failures"] == 0
    await cluster.wait_running([job["id"]])

    paused = await local_api.post(f"/api/jobs/{job['id']}/pause")
    assert paused.status_code == 202
    assert paused.json()["status"] in ("pausing", "paused")
    await cluster.wait_status(job["id"], JobStatus.PAUSED, 5)
    await eventually(lambda: not cluster.ledger.running(job["id"]), 5, what="copy stopped")

    resumed = await local_api.post(f"/api/jobs/{job['id']}/resume")
    assert resumed.status_code == 202
    assert resumed.json()["status"] == "pending"
    assert resumed.json()["generation"] == job["generation"] + 1
    await cluster.wait_running([job["id"]])
    again = await local_api.post(f"/api/jobs/{job['id']}/resume")
    assert again.json()["status"] == "processing"  # not held: unchanged
    missing = await local_api.post("/api/jobs/no-such-job/pause")
    assert missing.status_code == 404


async def test_update_through_the_api_restarts_the_job_with_the_new_argument(
    cluster: Cluster, local_api: httpx.AsyncClient
) -> None:
    await cluster.add_server("alpha", 3)
    job = (await local_api.post("/api/jobs", json={"name": "cfg", "argument": "v1"})).json()
    assert (job["argument_version"], job["update_pending"]) == (0, False)
    await cluster.wait_running([job["id"]])

    updated = await local_api.post(f"/api/jobs/{job['id']}/update", json={"argument": "v2"})
    assert updated.status_code == 202
    body = updated.json()
    assert (body["argument"], body["argument_version"], body["status"]) == ("v2", 1, "pausing")
    assert body["update_pending"] is True
    await eventually(
        lambda: [c.argument for c in cluster.ledger.running(job["id"])] == ["v2"],
        10,
        what="restarted with v2",
    )
    shown = (await local_api.get(f"/api/jobs/{job['id']}")).json()
    assert (shown["argument"], shown["update_pending"]) == ("v2", False)
    assert shown["generation"] > job["generation"]

    # Bad input: a problem, nothing changed.
    for bad, status in (({"argument": 5}, 422), ({}, 422), ({"argument": "x", "y": 1}, 422)):
        assert_problem(await local_api.post(f"/api/jobs/{job['id']}/update", json=bad), status)
    too_big = {"argument": "x" * (64 * 1024 + 1)}
    assert_problem(await local_api.post(f"/api/jobs/{job['id']}/update", json=too_big), 422)
    missing = await local_api.post("/api/jobs/no-such-job/update", json={"argument": "x"})
    assert missing.status_code == 404
    assert (await local_api.get(f"/api/jobs/{job['id']}")).json()["argument_version"] == 1
    assert (await local_api.post(f"/api/jobs/{job['id']}/cancel")).status_code == 202
    late = await local_api.post(f"/api/jobs/{job['id']}/update", json={"argument": "v3"})
    assert_problem(late, 409)
    assert "cannot be updated" in late.json()["detail"]
    assert (await local_api.get(f"/api/jobs/{job['id']}")).json()["argument"] == "v2"


async def test_update_through_the_api_in_place_and_a_restart_on_request(
    cluster: Cluster, local_api: httpx.AsyncClient
) -> None:
    """An ``@updatable`` function takes the update in place (``update_mode``,
    ``argument_applied_version``); ``"restart": true`` restarts it instead."""
    taken: list[str] = []

    async def body(arg: JobArgument, token: StopToken, heartbeat: UpdatableHeartbeat) -> None:
        async for new in heartbeat.updates():
            taken.append(new.argument)

    await cluster.add_server("alpha", 3, job=updatable(cluster.ledger.job("alpha", body=body)))
    job = (await local_api.post("/api/jobs", json={"name": "live", "argument": "v1"})).json()
    await cluster.wait_running([job["id"]])
    await cluster.wait_status(job["id"], JobStatus.PROCESSING)

    updated = await local_api.post(f"/api/jobs/{job['id']}/update", json={"argument": "v2"})
    assert updated.status_code == 202
    body_v2 = updated.json()
    assert (body_v2["status"], body_v2["update_mode"], body_v2["update_pending"]) == (
        "processing",
        "in_place",
        False,
    )

    async def acknowledged() -> bool:
        shown = (await local_api.get(f"/api/jobs/{job['id']}")).json()
        return bool(shown["argument_applied_version"] == 1)

    await eventually(acknowledged, 10, what="acknowledged in place")
    assert taken == ["v2"]
    assert [c.argument for c in cluster.ledger.of(job["id"])] == ["v1"]  # one copy

    restart = {"argument": "v3", "restart": True}
    again = await local_api.post(f"/api/jobs/{job['id']}/update", json=restart)
    assert (again.json()["status"], again.json()["update_pending"]) == ("pausing", True)
    await eventually(
        lambda: [c.argument for c in cluster.ledger.running(job["id"])] == ["v3"],
        15,
        what="restarted with v3",
    )
    assert taken == ["v2"]


async def test_kinds_constraints_labels_and_the_pending_reason_through_the_api(
    cluster: Cluster, local_api: httpx.AsyncClient
) -> None:
    await cluster.add_server("eu", 3, kinds=("feed",), labels={"region": "eu"})
    feed = await local_api.post(
        "/api/jobs", json={"name": "f", "kind": "feed", "require": ["region=eu"]}
    )
    socket = await local_api.post("/api/jobs", json={"name": "s", "kind": "socket"})
    assert feed.status_code == 201 and socket.status_code == 201
    assert feed.json()["kind"] == "feed" and feed.json()["constraints"] == ["region=eu"]

    async def waiting() -> dict | None:
        body = (await local_api.get(f"/api/jobs/{socket.json()['id']}")).json()
        return body if body["pending_reason"] else None

    shown = await eventually(waiting, 5, what="a pending reason")
    assert shown["pending_reason"] == "waiting: no live server runs kind 'socket'"
    page = (await local_api.get("/api/jobs", params={"kind": "feed"})).json()
    assert [j["name"] for j in page["items"]] == ["f"]
    servers = (await local_api.get("/api/servers", params={"label": "region=eu"})).json()
    assert [(s["name"], s["kinds"], s["labels"]) for s in servers] == [
        ("eu", ["feed"], {"region": "eu"})
    ]
    assert (await local_api.get("/api/servers", params={"kind": "socket"})).json() == []
    bad = await local_api.post("/api/jobs", json={"name": "b", "require": ["no-equals"]})
    assert_problem(bad, 422, "constraint 'no-equals' must be KEY=VALUE or KEY!=VALUE")
