"""The web API against hostile input: huge and streamed bodies, other local
origins, odd tokens, failures inside a handler, a transport no server reaches.

Bodies go through a raw socket to a real HTTP server (an in-process one, or
``orchestratr web`` in a subprocess whose peak memory is read from /proc), so
that nothing in between buffers or rewrites them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from orchestratr_core.errors import ConfigurationError
from orchestratr_core.job import JobStatus
from orchestratr_core.web import WebBackend, create_app, start_server
from tests.support.cluster import Cluster, eventually
from tests.support.web import TOKEN, client_for

MiB = 1024 * 1024
BIN = Path(sys.executable).with_name("orchestratr")


@dataclass
class Answer:
    status: int
    head: str
    sent: int


async def stream_post(
    port: int,
    path: str,
    total: int,
    *,
    token: str | None = None,
    chunked: bool = True,
    chunk: int = 64 * 1024,
) -> Answer:
    """POST ``total`` bytes to ``path``, chunk by chunk, stopping as soon as an
    answer arrives; returns it with the number of body bytes sent until then."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n"
    writer.write(head.encode("ascii"))
    data = b"x" * chunk
    piece = f"{len(data):x}\r\n".encode("ascii") + data + b"\r\n" if chunked else data
    sent = 0
    answer = b""
    try:
        while sent < total and not answer:
            writer.write(piece)
            await writer.drain()
            sent += len(data)
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(65536), 0.001)
        if not answer:
            if chunked:
                writer.write(b"0\r\n\r\n")  # the last chunk: the whole body was sent
            answer = await asyncio.wait_for(reader.read(65536), 30)
    except ConnectionError:
        answer = answer or await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
    text = answer.decode("latin-1")
    status_line = text.split("\r\n", 1)[0]
    return Answer(int(status_line.split()[1]), text.split("\r\n\r\n", 1)[0], sent)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def peak_rss(pid: int) -> int:
    """VmHWM of a process: the most resident memory it ever had, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# -- request bodies ------------------------------------------------------------------------


@pytest.fixture
def web_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``orchestratr web`` in its own process, with a token, on the memory backends."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATR_")}
    env["ORCHESTRATR_API_TOKEN"] = TOKEN
    proc = subprocess.Popen(
        [str(BIN), "web", "--storage", "memory", "--transport", f"memory://big-{uuid.uuid4().hex}",
         "--http", f"127.0.0.1:{port}"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        yield proc, port
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


async def test_large_bodies_are_refused_without_being_read(
    web_process: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = web_process
    huge = 200 * MiB
    before = peak_rss(proc.pid)
    post = functools.partial(stream_post, port, "/api/jobs")
    answers = {
        "anonymous, chunked": await post(huge),
        "anonymous, with length": await post(huge, chunked=False),
        "wrong token, chunked": await post(huge, token="wrong-" + TOKEN),
        "token, chunked": await post(huge, token=TOKEN),
        "token, with length": await post(huge, token=TOKEN, chunked=False),
        "token, 2 MiB chunked": await post(2 * MiB, token=TOKEN),
    }
    grown = peak_rss(proc.pid) - before
    statuses = {what: answer.status for what, answer in answers.items()}
    assert statuses == {
        "anonymous, chunked": 401,
        "anonymous, with length": 401,
        "wrong token, chunked": 401,
        "token, chunked": 413,
        "token, with length": 413,
        "token, 2 MiB chunked": 413,
    }
    for what, answer in answers.items():
        # Socket buffers take a few MiB before the answer comes; the server reads no more.
        assert answer.sent < 24 * MiB, (what, answer.sent)
        assert "x-content-type-options: nosniff" in answer.head.lower(), what
    assert grown < 32 * MiB, f"peak memory grew by {grown / MiB:.0f} MiB"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        created = await http.post(
            "/api/jobs", json={"name": "after"}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert created.status_code == 201, created.text


async def test_the_body_limit_is_configurable_and_answers_with_a_problem(
    cluster: Cluster,
) -> None:
    web = await start_server(cluster.manager, "127.0.0.1", 0, max_body_bytes=4096)
    try:
        async with httpx.AsyncClient(base_url=web.url) as http:
            big = await http.post("/api/jobs", json={"name": "big", "argument": "y" * 5000})
            assert big.status_code == 413
            assert big.headers["content-type"].startswith("application/problem+json")
            assert big.json()["detail"] == "the request body is larger than 4096 bytes"
            small = await http.post("/api/jobs", json={"name": "small", "argument": "y" * 3000})
            assert small.status_code == 201
        streamed = await stream_post(web.port, "/api/jobs", 64 * 1024, chunk=1024)
        assert streamed.status == 413 and streamed.sent < 64 * 1024
    finally:
        await web.stop()
    assert [j.name for j in await cluster.monitor.all_jobs()] == ["small"]
    with pytest.raises(ConfigurationError, match="body limit"):
        create_app(cluster.manager, None, host="127.0.0.1", max_body_bytes=0)


async def test_a_500_answer_carries_the_security_headers(cluster: Cluster) -> None:
    async def broken_drain(server_id: str) -> None:
        raise RuntimeError(f"drain of {server_id} broke")

    backend = WebBackend(client=cluster.client, monitor=cluster.monitor, drain=broken_drain)
    web = await start_server(backend, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=web.url) as http:
            failed = await http.post("/api/servers/some-server/drain")
            ok = await http.get("/api/jobs")
    finally:
        await web.stop()
    assert failed.status_code == 500
    assert failed.json()["detail"] == "the server could not answer; see its log"
    for name in ("x-content-type-options", "referrer-policy", "x-frame-options", "cache-control"):
        assert failed.headers.get(name) == ok.headers[name], name


# -- origins -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://127.0.0.1:9999"},  # a page on another local port
        {"Origin": "http://localhost"},  # another name for this host: another origin
        {"Origin": "https://127.0.0.1"},  # another scheme
        {"Sec-Fetch-Site": "same-site"},  # what a browser says for another local port
        {"Origin": "http://127.0.0.1", "Sec-Fetch-Site": "same-site"},
    ],
)
async def test_tokenless_changes_only_from_the_apps_own_origin(
    cluster: Cluster, headers: dict[str, str]
) -> None:
    await cluster.add_server("alpha", 2)
    (job_id,) = await cluster.create(1)
    await cluster.wait_running([job_id])
    app = create_app(cluster.manager, None, host="127.0.0.1")
    async with client_for(app) as api:
        refused = await api.post(f"/api/jobs/{job_id}/cancel", headers=headers)
        assert refused.status_code == 403, refused.text
        assert refused.json()["type"] == "urn:orchestratr:problem:cross-origin"
        assert (await api.post("/api/jobs", json={"name": "x"}, headers=headers)).status_code == 403
        # reading stays open to local pages (a browser keeps the answer from them anyway)
        assert (await api.get("/api/jobs", headers=headers)).status_code == 200
        own = {"Origin": "http://127.0.0.1", "Sec-Fetch-Site": "same-origin"}
        assert (await api.post("/api/jobs", json={"name": "mine"}, headers=own)).status_code == 201
    assert (await cluster.job(job_id)).status is JobStatus.PROCESSING
    assert sorted(j.name for j in await cluster.monitor.all_jobs()) == ["job-0", "mine"]


async def test_a_page_on_another_local_port_cannot_cancel_a_job(cluster: Cluster) -> None:
    """A real browser: a page served from another port of this host posts to the API."""
    from playwright.async_api import async_playwright

    from tests.support.web import CHROMIUM, FLAGS

    await cluster.add_server("alpha", 2)
    (job_id,) = await cluster.create(1)
    await cluster.wait_running([job_id])
    web = await start_server(cluster.manager, "127.0.0.1", 0)
    hits: list[str] = []

    async def hostile_site(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append((await reader.readline()).decode("latin-1"))
        page = (
            "<!doctype html><title>innocent</title><script>"
            f"fetch('{web.url}/api/jobs/{job_id}/cancel', {{method: 'POST', mode: 'no-cors'}})"
            ".then(() => document.title = 'sent', () => document.title = 'sent');"
            "</script>"
        ).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
            + f"Content-Length: {len(page)}\r\n\r\n".encode()
            + page
        )
        await writer.drain()
        writer.close()

    site = await asyncio.start_server(hostile_site, "127.0.0.1", 0)
    site_port = site.sockets[0].getsockname()[1]
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=FLAGS
            )
            try:
                page = await browser.new_page()
                await page.goto(f"http://127.0.0.1:{site_port}/")
                await page.wait_for_function("document.title === 'sent'", timeout=10_000)
                assert hits, "the hostile page was not served"
                await asyncio.sleep(0.5)  # the cancel would be applied by now
                assert (await cluster.job(job_id)).status is JobStatus.PROCESSING
                assert cluster.ledger.running(job_id)
                # The control: the same request from the app's own page does cancel.
                await page.goto(web.url + "/")
                status = await page.evaluate(
                    f"fetch('/api/jobs/{job_id}/cancel', {{method: 'POST'}}).then(r => r.status)"
                )
                assert status == 202
            finally:
                await browser.close()
        await cluster.wait_status(job_id, JobStatus.DELETED, 5)
    finally:
        site.close()
        await site.wait_closed()
        await web.stop()


# -- tokens --------------------------------------------------------------------------------


async def test_a_short_token_is_accepted_with_a_warning(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orchestratr.web")
    create_app(cluster.manager, TOKEN, host="127.0.0.1")  # 22 characters: no warning
    assert not [r for r in caplog.records if "characters long" in r.getMessage()]
    app = create_app(cluster.manager, "short-tok", host="127.0.0.1")
    (warning,) = [r for r in caplog.records if "characters long" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "9 characters" in warning.getMessage() and "at least 16" in warning.getMessage()
    assert "short-tok" not in warning.getMessage()
    async with client_for(app, "short-tok") as api:
        assert (await api.get("/api/jobs")).status_code == 200


@pytest.mark.parametrize(
    "token", ["pässwörd-long-enough-1", "token-with-\u20ac-sign-long", "a\tb" * 8]
)
async def test_a_token_that_is_not_printable_ascii_is_refused_at_configuration(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    with pytest.raises(ConfigurationError, match="printable ASCII") as raised:
        create_app(cluster.manager, token, host="127.0.0.1")
    assert token not in str(raised.value)
    with pytest.raises(ConfigurationError, match="printable ASCII"):
        await start_server(cluster.manager, "127.0.0.1", 0, token=token)
    monkeypatch.setenv("ORCHESTRATR_API_TOKEN", token)
    with pytest.raises(ConfigurationError, match="printable ASCII"):
        create_app(cluster.manager, None, host="0.0.0.0")


async def test_a_token_sent_in_another_encoding_is_refused_not_misread(cluster: Cluster) -> None:
    app = create_app(cluster.manager, TOKEN, host="127.0.0.1")
    async with client_for(app) as api:
        for raw in (f"Bearer {TOKEN}\u00e9".encode(), f"Bearer {TOKEN}\u00e9".encode("latin-1")):
            answer = await api.get("/api/jobs", headers={"Authorization": raw})  # type: ignore[dict-item]
            assert answer.status_code == 401
        good = await api.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}".encode()})  # type: ignore[dict-item]
        assert good.status_code == 200


# -- what `orchestratr web` relays ---------------------------------------------------------


async def test_web_refuses_a_memory_transport_beside_a_shared_storage(tmp_path: Path) -> None:
    from orchestratr_core.cli import sqlite_url
    from orchestratr_core.web import run_web

    storage = sqlite_url(tmp_path / "shared.sqlite3")
    with pytest.raises(ConfigurationError, match="no server listens to"):
        await run_web(storage, "memory://nobody", "127.0.0.1", 0, install_signal_handlers=False)
    with pytest.raises(ConfigurationError, match="no server listens to"):
        await WebBackend.open(storage, "memory://nobody")


@pytest.fixture
async def memory_backend() -> AsyncIterator[WebBackend]:
    backend = await WebBackend.open("memory", f"memory://alone-{uuid.uuid4().hex}")
    try:
        yield backend
    finally:
        await backend.close()


async def test_web_on_memory_storage_and_transport_still_works(memory_backend: WebBackend) -> None:
    app = create_app(memory_backend, None, host="127.0.0.1")
    async with client_for(app) as api:
        assert (await api.post("/api/jobs", json={"name": "alone"})).status_code == 201

    async def listed() -> bool:
        return [j.name for j in (await memory_backend.monitor.jobs()).items] == ["alone"]

    await eventually(listed, 5, what="job listed")
