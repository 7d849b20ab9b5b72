"""Prometheus metrics: the observer plugin, /metrics on the app, the standalone endpoint."""

from __future__ import annotations

import httpx

from orchestratr_core import metrics
from orchestratr_core.plugin.manager import get_plugin_manager
from orchestratr_core.web import create_app
from tests.support.cluster import Cluster, eventually
from tests.support.web import TOKEN, client_for, exposition, value


async def test_metrics_count_starts_stops_failures_and_handovers(cluster: Cluster) -> None:
    metrics.install()
    app = create_app(cluster.manager, TOKEN, host="127.0.0.1")
    async with client_for(app, TOKEN) as api:

        async def scrape() -> str:
            response = await api.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            return response.text

        before = await scrape()
        alpha = await cluster.add_server("alpha", 5)
        ids = await cluster.create(3, prefix="m")
        await cluster.wait_running(ids)
        started = await scrape()
        assert (
            value(started, "orchestratr_job_starts_total")
            - value(before, "orchestratr_job_starts_total")
            >= 3
        )
        assert value(started, "orchestratr_jobs_running") >= 3
        assert value(started, "orchestratr_server_joins_total") > value(
            before, "orchestratr_server_joins_total"
        )
        # the app's view of the fleet
        assert value(started, "orchestratr_cluster_servers", 'status="alive"') == 1
        assert (
            value(
                started,
                "orchestratr_cluster_jobs_running",
                f'server_id="{alpha.id}",server_name="alpha"',
            )
            == 3
        )

        await cluster.client.mark_on_deleting(ids[0])
        await eventually(lambda: not cluster.ledger.running(ids[0]), 5, what="cancelled")
        await cluster.add_server("beta", 5)
        await alpha.stop()  # graceful: its jobs are released to beta
        await cluster.wait_running(ids[1:])

        async def alpha_left() -> str | None:
            # Its goodbye follows the hand-over: beta's starts may be applied first.
            text = await scrape()
            return (
                text if value(text, "orchestratr_cluster_servers", 'status="alive"') == 1 else None
            )

        after = await eventually(alpha_left, 2.0, what="alpha shown as left")

    def delta(name: str, labels: str = "") -> float:
        return value(after, name, labels) - value(before, name, labels)

    assert delta("orchestratr_job_stops_total", 'reason="cancelled"') >= 1
    assert delta("orchestratr_job_stops_total", 'reason="released"') >= 2
    assert delta("orchestratr_job_handovers_total", 'reason="released"') >= 2
    assert delta("orchestratr_server_leaves_total", 'reason="stopped"') >= 1
    assert value(after, "orchestratr_cluster_servers", 'status="alive"') == 1


async def test_failures_and_restarts_are_counted(cluster: Cluster) -> None:
    metrics.install()
    calls = 0

    async def flaky(arg, token, heartbeat) -> None:  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("boom")
        await token.wait()

    app = create_app(cluster.manager, None, host="127.0.0.1")
    async with client_for(app) as api:
        before = (await api.get("/metrics")).text
        await cluster.add_server("flaky", 2, job=flaky)
        await cluster.client.create_job("flaky-job")
        await eventually(lambda: calls >= 3, 5, what="two restarts")
        after = (await api.get("/metrics")).text
    assert (
        value(after, "orchestratr_job_failures_total")
        - value(before, "orchestratr_job_failures_total")
        >= 2
    )
    assert (
        value(after, "orchestratr_job_restarts_total")
        - value(before, "orchestratr_job_restarts_total")
        >= 2
    )


async def test_transports_can_record_reconnects_and_heartbeat_lag() -> None:
    server = metrics.start_metrics_server("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient() as http:
            before = (await http.get(server.url)).text
            metrics.record_reconnect("rabbitmq")
            metrics.record_heartbeat_lag(0.3)
            after = (await http.get(server.url)).text
    finally:
        server.close()
    name = "orchestratr_broker_reconnects_total"
    assert (
        value(after, name, 'transport="rabbitmq"')
        == value(before, name, 'transport="rabbitmq"') + 1
    )
    assert (
        value(after, "orchestratr_heartbeat_lag_seconds_count")
        == value(before, "orchestratr_heartbeat_lag_seconds_count") + 1
    )
    assert get_plugin_manager().pluggy.is_registered(metrics.observer)


def test_installing_twice_registers_the_observer_once() -> None:
    first = metrics.install()
    second = metrics.install()
    assert first is second is metrics.observer
    names = [n for n, p in get_plugin_manager().pluggy.list_name_plugin() if p is metrics.observer]
    assert names == [metrics.PLUGIN_NAME]


async def test_the_manager_records_how_late_each_heartbeat_is_applied(cluster: Cluster) -> None:
    metrics.install()
    before = value(exposition(), "orchestratr_heartbeat_lag_seconds_count")
    await cluster.start_manager()
    await cluster.add_server("lagged", 2)
    await eventually(
        lambda: value(exposition(), "orchestratr_heartbeat_lag_seconds_count") >= before + 3,
        what="three heartbeats observed",
    )
