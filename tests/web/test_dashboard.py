"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright.

Chromium comes from ``tests/web/install-browser.sh`` (Debian packages
``chromium`` and ``chromium-driver``); Playwright's own browser download cannot
work here, so it always launches ``/usr/bin/chromium``. Screenshots go to a
temporary folder, or to ``$ORCHESTRATR_SCREENSHOTS`` when set: ``make docs-images``
sets it to ``docs/images/`` to update the documentation's ``dashboard*.png``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from orchestratr_core.web import WebServer, start_server
from tests.support.cluster import Cluster, eventually
from tests.support.web import CHROMIUM, FLAGS, TOKEN

SCREENSHOTS_ENV = "ORCHESTRATR_SCREENSHOTS"


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """A fresh Chromium with a new, empty profile directory."""
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(10_000)
        try:
            yield context
        finally:
            await context.close()


async def open_page(browser: BrowserContext, url: str) -> tuple[Page, list[str]]:
    """A page at ``url`` and the list its script errors are collected in."""
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(url)
    return page, errors


async def serve(cluster: Cluster, token: str | None = None) -> WebServer:
    return await start_server(cluster.manager, "127.0.0.1", 0, token=token, history_interval=0.5)


def job_row(page: Page, name: str):  # type: ignore[no-untyped-def]
    return page.locator(f'#jobs tbody tr[data-job-name="{name}"]')


def server_row(page: Page, name: str):  # type: ignore[no-untyped-def]
    return page.locator(f'#servers tbody tr[data-server-name="{name}"]')


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: never into the repository unless asked for."""
    chosen = os.environ.get(SCREENSHOTS_ENV)
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def screenshot(page: Page, path: Path) -> None:
    image = await page.screenshot(path=str(path), full_page=True)
    assert image.startswith(b"\x89PNG")


async def test_dashboard_shows_servers_jobs_and_cancels_a_job(
    cluster: Cluster, browser: BrowserContext, screenshots: Path
) -> None:
    await cluster.add_server("alpha", 6)
    await cluster.add_server("beta", 4)
    web = await serve(cluster)
    try:
        page, errors = await open_page(browser, web.url + "/")
        await expect(page.get_by_test_id("live")).to_have_text("live")
        # jobs arrive in waves, so that the chart has something to show
        ids: list[str] = []
        for wave in (2, 3, 3):
            await asyncio.sleep(1.5)
            ids += [
                await cluster.client.create_job(f"feed-{len(ids) + i}", "") for i in range(wave)
            ]
        await cluster.wait_running(ids)
        await expect(server_row(page, "alpha")).to_have_attribute("data-status", "alive")
        await expect(server_row(page, "beta")).to_have_attribute("data-status", "alive")
        await expect(page.locator("#jobs tbody tr[data-job-id]")).to_have_count(8)
        await expect(page.locator('#jobs tbody tr[data-status="processing"]')).to_have_count(8)
        await expect(page.locator("#server-summary")).to_contain_text("2 live · 8 / 10")

        await asyncio.sleep(2.0)
        await screenshot(page, screenshots / "dashboard.png")

        await job_row(page, "feed-3").get_by_test_id("cancel").click()
        await expect(job_row(page, "feed-3")).to_have_count(0, timeout=5_000)
        await expect(page.locator("#jobs tbody tr[data-job-id]")).to_have_count(7)
        assert not cluster.ledger.running(ids[3])

        # deleted jobs come back with the "deleted" status filter
        await page.locator('#status-filter input[value="deleted"]').check()
        await expect(job_row(page, "feed-3")).to_have_attribute("data-status", "deleted")
        await expect(page.locator("#page-label")).to_have_attribute("data-total", "8")
        assert errors == []
    finally:
        await web.stop()


async def test_killed_servers_jobs_are_seen_moving_within_seconds(
    cluster: Cluster, browser: BrowserContext, screenshots: Path
) -> None:
    alpha = await cluster.add_server("alpha", 6)
    ids = await cluster.create(4, prefix="tenant")
    await cluster.wait_running(ids)
    beta = await cluster.add_server("beta", 6)
    web = await serve(cluster)
    try:
        page, errors = await open_page(browser, web.url + "/")
        rows = page.locator("#jobs tbody tr[data-job-id]")
        await expect(rows).to_have_count(4)
        on_alpha = page.locator(f'#jobs tbody tr[data-server-id="{alpha.id}"]')
        await expect(on_alpha).to_have_count(4)
        await asyncio.sleep(1.5)

        await alpha.kill()  # as kill -9 would: no hand-over, no goodbye
        on_beta = page.locator(f'#jobs tbody tr[data-server-id="{beta.id}"]')
        await expect(on_beta).to_have_count(4, timeout=5_000)
        await expect(page.locator('#jobs tbody tr[data-status="processing"]')).to_have_count(4)
        # and the manager declares alpha dead: it leaves the list of live servers
        await expect(server_row(page, "alpha")).to_have_count(0, timeout=5_000)
        await page.locator("#servers-all").check()
        await expect(server_row(page, "alpha")).to_have_attribute("data-status", "dead")
        await asyncio.sleep(1.0)
        await screenshot(page, screenshots / "dashboard-failover.png")
        assert errors == []
    finally:
        await web.stop()


async def test_token_is_entered_in_the_page_and_unlocks_create_detail_and_drain(
    cluster: Cluster, browser: BrowserContext, screenshots: Path
) -> None:
    alpha = await cluster.add_server("alpha", 5)
    await cluster.add_server("beta", 5)
    web = await serve(cluster, token=TOKEN)
    try:
        page, errors = await open_page(browser, web.url + "/")
        page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await expect(page.get_by_test_id("live")).to_have_text("token needed")
        await expect(page.get_by_test_id("banner")).to_contain_text("API token")

        await page.get_by_test_id("token").fill(TOKEN)
        await page.get_by_role("button", name="Use").click()
        await expect(page.get_by_test_id("live")).to_have_text("live")
        assert await page.evaluate("sessionStorage.getItem('orchestratr.token')") == TOKEN
        assert TOKEN not in await page.content()

        # create through the form; a bad name shows the API's own message
        await page.get_by_test_id("create-name").fill(" bad")
        await page.get_by_test_id("create").click()
        await expect(page.get_by_test_id("banner")).to_contain_text(
            "job name must not start or end with white space"
        )
        await page.get_by_test_id("create-name").fill("report-builder")
        await page.get_by_test_id("create-arg").fill('{"tenant": 7}')
        await page.get_by_test_id("create").click()
        await expect(job_row(page, "report-builder")).to_have_attribute("data-status", "processing")

        await job_row(page, "report-builder").click()
        detail = page.get_by_test_id("detail")
        await expect(detail).to_be_visible()
        await expect(detail.locator("#detail-argument")).to_have_text('{"tenant": 7}')
        await expect(detail.locator('dd[data-field="status"]')).to_have_text("processing")
        await asyncio.sleep(1.0)
        await screenshot(page, screenshots / "dashboard-detail.png")
        await page.locator("#detail-close").click()

        # drain the server that runs it: the job moves to the other one
        (job,) = [j for j in await cluster.monitor.all_jobs() if j.name == "report-builder"]
        running_on = job.server_id
        name = "alpha" if running_on == alpha.id else "beta"
        other = "beta" if name == "alpha" else "alpha"
        await server_row(page, name).get_by_test_id("drain").click()
        await expect(job_row(page, "report-builder")).to_have_attribute(
            "data-server-id", cluster.servers[other].id, timeout=5_000
        )
        assert errors == []
    finally:
        await web.stop()


async def test_dashboard_pauses_and_resumes_a_job_and_shows_a_quarantine_with_its_errors(
    cluster: Cluster, browser: BrowserContext
) -> None:
    from orchestratr_core import JobArgument, JobStatus, StopToken
    from orchestratr_core.runner import Heartbeat

    async def crashing(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
        if arg.name.startswith("crash"):
            raise RuntimeError("cannot reach the feed")
        await cluster.ledger.job("alpha")(arg, token, heartbeat)

    await cluster.add_server("alpha", 4, job=crashing)
    web = await serve(cluster)
    try:
        page, errors = await open_page(browser, web.url + "/")
        held = await cluster.client.create_job("held-1", "")
        crash = await cluster.client.create_job("crash-1", "", max_restarts=1)
        await cluster.wait_running([held])
        await job_row(page, "held-1").click()
        await page.get_by_test_id("detail-pause").click()
        await expect(job_row(page, "held-1")).to_have_attribute("data-status", "paused")
        assert cluster.ledger.running(held) == []
        await expect(page.get_by_test_id("detail-resume")).to_be_enabled()
        await page.get_by_test_id("detail-resume").click()
        await expect(job_row(page, "held-1")).to_have_attribute("data-status", "processing")
        # Update its argument from the job page: it restarts with it.
        await page.get_by_test_id("update-arg").fill("rate=5")
        await page.get_by_test_id("detail-update").click()
        await expect(page.get_by_test_id("detail-argument")).to_have_text("rate=5")
        await expect(
            page.locator('#detail-fields dd[data-field="argument updates"]')
        ).to_contain_text("1, ")
        await eventually(
            lambda: [c.argument for c in cluster.ledger.running(held)] == ["rate=5"],
            10,
            what="restarted with the new argument",
        )
        await expect(job_row(page, "held-1")).to_have_attribute("data-status", "processing")

        await cluster.wait_status(crash, JobStatus.QUARANTINED)
        await job_row(page, "crash-1").click()
        await expect(
            page.locator('#detail-fields dd[data-field="quarantine reason"]')
        ).to_contain_text("restart budget spent")
        await expect(page.get_by_test_id("detail-errors").locator("li")).to_have_count(2)
        await expect(page.get_by_test_id("detail-errors")).to_contain_text("cannot reach the feed")
        await expect(page.get_by_test_id("detail-resume")).to_be_enabled()
        await expect(page.get_by_test_id("detail-pause")).to_be_disabled()
        assert errors == []
    finally:
        await web.stop()


async def test_dashboard_shows_kinds_labels_constraints_the_kind_filter_and_a_pending_reason(
    cluster: Cluster, browser: BrowserContext
) -> None:
    await cluster.add_server("feeds", 4, kinds=("feed",))
    await cluster.add_server("eu", 4, kinds=("feed",), labels={"region": "eu", "nic": "40g"})
    feed = await cluster.client.create_job("feed-1", "", kind="feed")
    eu = await cluster.client.create_job("eu-1", "", kind="feed", require=["region=eu"])
    sock = await cluster.client.create_job("sock-1", "", kind="socket")
    await cluster.wait_running([feed, eu])
    reason = "waiting: no live server runs kind 'socket'"
    web = await serve(cluster)
    try:
        page, errors = await open_page(browser, web.url + "/")
        placement = 'td[data-field="placement"]'
        await expect(server_row(page, "eu").locator(placement)).to_have_text(
            "feed · nic=40g · region=eu"
        )
        await expect(server_row(page, "feeds").locator(placement)).to_have_text("feed")
        await expect(job_row(page, "eu-1").locator(placement)).to_have_text("feed [region=eu]")
        await expect(job_row(page, "feed-1").locator(placement)).to_have_text("feed")
        await expect(job_row(page, "sock-1")).to_have_attribute("data-status", "pending")
        shown = '[data-field="pending-reason"]'
        await expect(job_row(page, "sock-1").locator(shown)).to_have_text(reason)
        await expect(job_row(page, "eu-1").locator(shown)).to_have_count(0)

        await page.get_by_test_id("kind-filter").fill("socket")
        await expect(page.locator("#jobs tbody tr[data-job-id]")).to_have_count(1)
        await expect(job_row(page, "sock-1")).to_have_count(1)
        await page.get_by_test_id("kind-filter").fill("feed")
        await expect(page.locator("#jobs tbody tr[data-job-id]")).to_have_count(2)
        await expect(job_row(page, "sock-1")).to_have_count(0)
        await page.get_by_test_id("kind-filter").fill("")
        await expect(page.locator("#jobs tbody tr[data-job-id]")).to_have_count(3)

        await job_row(page, "sock-1").click()
        fields = page.get_by_test_id("detail").locator("#detail-fields")
        await expect(fields.locator('dd[data-field="pending reason"]')).to_have_text(reason)
        await expect(fields.locator('dd[data-field="kind"]')).to_have_text("socket")
        await page.locator("#detail-close").click()
        await job_row(page, "eu-1").click()
        await expect(fields.locator('dd[data-field="constraints"]')).to_have_text("region=eu")
        await expect(fields.locator('dd[data-field="pending reason"]')).to_have_text("—")
        assert cluster.ledger.of(sock) == []
        assert errors == []
    finally:
        await web.stop()
