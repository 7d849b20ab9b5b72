"""The plugin system: discovery by name and URL scheme, lazy imports, blocking,
clear errors, and third-party hooks (runner, observers) through pluggy."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from orchestratr_core import JobArgument, StopToken
from orchestratr_core.errors import ConfigurationError, PluginNotFound
from orchestratr_core.plugin import BackendSpec, PluginManager, hookimpl
from orchestratr_core.plugin.manager import mask_url
from orchestratr_core.runner import AsyncJobRunner, JobRunner, ThreadJobRunner
from tests.support.cluster import Cluster, eventually


def test_every_backend_of_the_repository_is_discovered_with_its_distribution() -> None:
    available = PluginManager.available()
    assert available["memory"] == "orchestratr-memory"
    assert available["rabbitmq"] == "orchestratr-rabbitmq"
    for name in ("sqlite", "postgresql", "mysql", "sqlserver"):
        assert available[name] == "orchestratr-sql"
    schemes = PluginManager.schemes()
    assert schemes["amqp"] == "rabbitmq"
    assert schemes["postgres"] == "postgresql"
    assert schemes["mssql"] == "sqlserver"


def test_a_url_resolves_to_its_plugin_and_keeps_the_url() -> None:
    spec = PluginManager().resolve("postgresql://u:secret@db/x")
    assert spec.plugin == "postgresql"
    assert spec.url == "postgresql://u:secret@db/x"
    assert "secret" not in repr(spec)


def test_an_unknown_name_lists_what_is_installed_and_suggests_the_closest() -> None:
    with pytest.raises(PluginNotFound) as info:
        PluginManager().make_transport("rabbitqm")
    message = str(info.value)
    assert "did you mean 'rabbitmq'" in message
    assert "installed: " in message and "memory" in message


def test_an_unknown_scheme_never_echoes_the_url() -> None:
    with pytest.raises(PluginNotFound) as info:
        PluginManager().make_storage("postgersql://admin:hunter2@db/x")
    assert "hunter2" not in str(info.value)
    assert "did you mean 'postgresql'" in str(info.value)


def test_a_storage_plugin_asked_for_a_transport_says_so() -> None:
    with pytest.raises(PluginNotFound, match="provides no transport"):
        PluginManager().make_transport("sqlite")


def test_blank_backend_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        PluginManager().resolve("   ")


def test_selecting_a_plugin_imports_only_that_plugin() -> None:
    code = (
        "import json, sys\n"
        "from orchestratr_core.plugin import get_plugin_manager\n"
        "get_plugin_manager().make_transport('memory://x')\n"
        "get_plugin_manager().make_storage('memory')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('orchestratr_sql', 'orchestratr_rabbitmq', 'aio_pika', 'asyncpg', 'aiomysql', "
        "'aiosqlite', 'aioodbc', 'fastapi'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert json.loads(out) == []


def test_blocked_plugins_cannot_be_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATR_BLOCK_PLUGINS", "memory, sqlite")
    with pytest.raises(PluginNotFound, match="blocked"):
        PluginManager().make_storage("memory")


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("amqp://guest:guest@h:5672/v?x=1") == "amqp://guest:***@h:5672/v?x=1"
    assert mask_url("sqlite:///a.db") == "sqlite:///a.db"
    assert mask_url(None) is None
    assert mask_url("memory") == "memory"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:ab/cdefSECRET@host/db",
        "postgresql://u:p@ssSECRET@host/db",
        "postgresql://u:ab?cdSECRET@host/db",
        "postgresql://u:ab#cdSECRET@host/db",
        "postgresql://u:ab cdSECRET@host/db",
        "postgresql://u:SECRET@host:port/db",
    ],
)
def test_a_url_that_does_not_parse_cleanly_is_masked_whole(url: str) -> None:
    from orchestratr_core.display import redact_urls, url_secrets

    assert mask_url(url) == "postgresql://***"
    if " " not in url:  # free text cannot tell where such a URL ends: url_secrets covers it
        assert "SECRET" not in redact_urls(f"failed: {url!r}, retrying")
    assert url in url_secrets(url)
    assert any("SECRET" in s and "host" not in s for s in url_secrets(url))


def test_default_runners_pick_tasks_for_coroutines_and_threads_for_the_rest() -> None:
    async def a(arg: JobArgument, token: StopToken, hb: Callable[[], None]) -> None: ...

    def b(arg: JobArgument, token: StopToken, hb: Callable[[], None]) -> None: ...

    class C:
        async def __call__(self, arg: JobArgument, token: StopToken, hb: Any) -> None: ...

    pm = PluginManager()
    assert isinstance(pm.make_runner(a), AsyncJobRunner)
    assert isinstance(pm.make_runner(b), ThreadJobRunner)
    assert isinstance(pm.make_runner(C()), AsyncJobRunner)


class _CountingRunner(JobRunner):
    def __init__(self) -> None:
        self.runs = 0

    async def run(
        self, func: Callable[..., Any], arg: JobArgument, token: StopToken, heartbeat: Any
    ) -> None:
        self.runs += 1
        await func(arg, token, heartbeat)


async def test_a_third_party_runner_and_observer_plug_into_a_server(cluster: Cluster) -> None:
    runner = _CountingRunner()
    seen: list[tuple[str, str]] = []

    class Plugin:
        @hookimpl
        def orchestratr_make_runner(self, func: Callable[..., Any]) -> JobRunner:
            return runner

        @hookimpl
        def orchestratr_job_started(
            self, server_id: str, job_id: str, name: str, fence: int, restarts: int
        ) -> None:
            seen.append(("started", name))

        @hookimpl
        def orchestratr_job_stopped(
            self, server_id: str, job_id: str, name: str, fence: int, reason: str, forced: bool
        ) -> None:
            seen.append((reason, name))

    pm = PluginManager()
    pm.register(Plugin(), name="third-party")
    from orchestratr_core import OrchestratedServer
    from tests.support.cluster import FAST_SERVER

    await cluster.start_manager()
    server = OrchestratedServer(
        cluster.ledger.job("x"),
        transport=cluster.transport(),
        name="x",
        max_workers=2,
        options=FAST_SERVER,
        plugins=pm,
    )
    await server.start()
    cluster.servers["x"] = server
    job_id = await cluster.client.create_job("observed")
    await eventually(lambda: ("started", "observed") in seen, what="observer saw the start")
    assert runner.runs == 1
    await cluster.client.mark_on_deleting(job_id)
    await eventually(lambda: ("cancelled", "observed") in seen, what="observer saw the stop")


def test_backend_spec_repr_hides_credentials() -> None:
    spec = BackendSpec(plugin="rabbitmq", url="amqp://u:pw123456@h/")
    assert "pw123456" not in repr(spec)
