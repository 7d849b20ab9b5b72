"""``/healthz`` and ``/readyz`` of real ``orchestratr server`` and ``orchestratr
manager`` processes, cut off from the broker (and the manager from its database)
by a silent proxy: readiness turns false within the fence timeout and true again
after the partition heals; liveness stays true throughout (the process is fine,
its network is not)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import asyncpg
import pytest

from orchestratr_core.testing.proxy import SilentProxy
from tests.support.sql import PG_DATABASE, PG_SERVER

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgresql]

ROOT = Path(__file__).resolve().parents[2]
FENCE = 4.5
HEARTBEAT = 3
MARGIN = 2.0
"""Seconds beyond the promise for a loaded 2-core machine (a probe's own round trip)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


async def _wait_status(url: str, status: int, within: float) -> tuple[float, str]:
    """Poll ``url`` until it answers ``status``: (seconds it took, the body)."""
    t0 = time.monotonic()
    while True:
        code, body = await asyncio.to_thread(_get, url)
        if code == status:
            return time.monotonic() - t0, body
        if time.monotonic() - t0 > within:
            raise AssertionError(f"{url} answered {code} {body!r}, not {status}, for {within} s")
        await asyncio.sleep(0.1)


class _Process:
    def __init__(self, args: list[str], log: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "orchestratr_core.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    async def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.popen.wait, 30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return await asyncio.to_thread(self.popen.wait, 10)


def _transport(port: int, namespace: str) -> str:
    return (
        f"amqp://guest:guest@127.0.0.1:{port}/?namespace={namespace}"
        f"&heartbeat={HEARTBEAT}&fence_timeout={FENCE}"
    )


async def test_a_server_is_not_ready_while_cut_off_from_the_broker_and_ready_again_after(
    tmp_path: Path, namespace: str, proxy: SilentProxy
) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = _Process(
        [
            "server",
            "--job",
            "orchestratr_core.examples:ticker",
            "--transport",
            _transport(proxy.port, namespace),
            "--metrics",
            f"127.0.0.1:{port}",
        ],
        tmp_path / "server.log",
    )
    try:
        await _wait_status(f"{base}/readyz", 200, within=30)
        assert (await asyncio.to_thread(_get, f"{base}/healthz"))[0] == 200
        assert "orchestratr" in (await asyncio.to_thread(_get, f"{base}/metrics"))[1]
        proxy.pause()
        took, why = await _wait_status(f"{base}/readyz", 503, within=FENCE + MARGIN)
        print(f"server readiness false {took:.2f} s after the cut ({why.strip()})")
        assert "broker" in why
        assert (await asyncio.to_thread(_get, f"{base}/healthz"))[0] == 200
        proxy.resume()
        back, _ = await _wait_status(f"{base}/readyz", 200, within=30)
        print(f"server ready again {back:.2f} s after the heal")
    finally:
        assert await server.stop() == 0, server.log.read_text()[-2000:]


async def test_a_manager_is_not_ready_while_cut_off_from_broker_or_database(
    tmp_path: Path, namespace: str, proxy: SilentProxy
) -> None:
    schema = f"orx_health_{uuid.uuid4().hex[:8]}"
    pg_port = int(PG_SERVER.rsplit(":", 1)[1])
    db_proxy = SilentProxy(upstream_port=pg_port)
    await db_proxy.start()
    user = PG_SERVER.split("://", 1)[1].rsplit("@", 1)[0]
    storage = f"postgresql://{user}@127.0.0.1:{db_proxy.port}/{PG_DATABASE}?schema={schema}"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    manager = _Process(
        [
            "manager",
            "--storage",
            storage,
            "--transport",
            _transport(proxy.port, namespace),
            "--server-timeout",
            "3",
            "--http",
            f"127.0.0.1:{port}",
        ],
        tmp_path / "manager.log",
    )
    try:
        await _wait_status(f"{base}/readyz", 200, within=30)
        assert (await asyncio.to_thread(_get, f"{base}/healthz"))[0] == 200
        proxy.pause()
        took, why = await _wait_status(f"{base}/readyz", 503, within=FENCE + MARGIN)
        print(f"manager readiness false {took:.2f} s after the broker cut ({why.strip()})")
        assert "broker" in why
        proxy.resume()
        await _wait_status(f"{base}/readyz", 200, within=30)
        db_proxy.pause()
        # storage_probe_after: a third of --server-timeout
        took, why = await _wait_status(f"{base}/readyz", 503, within=1.0 + MARGIN)
        print(f"manager readiness false {took:.2f} s after the database cut ({why.strip()})")
        assert "storage" in why
        assert (await asyncio.to_thread(_get, f"{base}/healthz"))[0] == 200
        db_proxy.resume()
        await _wait_status(f"{base}/readyz", 200, within=30)
    finally:
        await manager.stop()
        await db_proxy.stop()
        conn = await asyncpg.connect(f"{PG_SERVER}/{PG_DATABASE}")
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
