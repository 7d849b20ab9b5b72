"""One convention, one place: every storage writes the same job reasons for the same
event, the ``sqlite`` plugin's default file is the CLI's, and a backend contributes
its own CLI commands through the ``orchestratr_cli_commands`` hook (``db`` comes from
orchestratr-sql and goes away when that command module is blocked)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from orchestratr_core.backend_urls import DEFAULT_SQLITE_FILE, sqlite_url
from orchestratr_core.errors import PluginNotFound
from orchestratr_core.job import JobStatus, NewJob, new_id, utcnow
from orchestratr_core.plugin import CommandParents, PluginManager
from orchestratr_core.protocol import RunningJob, ServerHeartbeat
from orchestratr_core.storage import (
    REASON_CANCEL_REQUESTED,
    REASON_NOT_REPORTED,
    REASON_SERVER_DEAD,
    REASON_SERVER_LEFT,
    Storage,
)
from orchestratr_sql import SqlStorage

COMMAND = [sys.executable, "-m", "orchestratr_core.cli"]


@pytest.fixture(params=["memory", "sqlite"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    name = request.param
    url = "memory" if name == "memory" else sqlite_url(tmp_path / "reasons.sqlite3")
    built = PluginManager().make_storage(url)
    await built.open()
    yield built
    await built.close()


def _beat(server_id: str, jobs: tuple[RunningJob, ...], at_offset: float) -> ServerHeartbeat:
    now = utcnow().timestamp() + at_offset
    return ServerHeartbeat(
        server_id=server_id,
        name=server_id,
        max_workers=4,
        started_at=now - 60,
        sent_at=now,
        host="h",
        pid=1,
        draining=False,
        jobs=jobs,
    )


async def _running(storage: Storage, server_id: str) -> str:
    """A job that ``server_id`` reported running (fence 7)."""
    now = utcnow()
    job = NewJob(id=new_id(), name=f"job-{new_id()[-10:]}", argument="", created_at=now)
    await storage.create_job(job, "holder", now + timedelta(seconds=30))
    await storage.apply_heartbeat(_beat(server_id, (RunningJob(job.id, 7),), 0), now)
    record = await storage.get_job(job.id)
    assert record is not None and record.status is JobStatus.PROCESSING
    return job.id


async def test_every_storage_gives_the_same_reason_for_the_same_event(storage: Storage) -> None:
    now = utcnow()
    cancelled = await _running(storage, "s-cancel")
    job, _ = await storage.request_cancel(cancelled, now, "holder", now + timedelta(seconds=30))
    assert job.reason == REASON_CANCEL_REQUESTED

    dropped = await _running(storage, "s-drop")
    await storage.apply_heartbeat(_beat("s-drop", (), 1), now + timedelta(seconds=1))
    record = await storage.get_job(dropped)
    assert record is not None and record.reason == REASON_NOT_REPORTED

    left = await _running(storage, "s-left")
    assert await storage.server_left("s-left", now + timedelta(seconds=1))
    record = await storage.get_job(left)
    assert record is not None and record.reason == REASON_SERVER_LEFT

    dead = await _running(storage, "s-dead")
    later = now + timedelta(seconds=60)
    assert "s-dead" in {s.id for s in await storage.expire_servers(later, later)}
    record = await storage.get_job(dead)
    assert record is not None and record.reason == REASON_SERVER_DEAD


def test_the_sqlite_plugin_without_a_url_uses_the_cli_default_file() -> None:
    storage = PluginManager().make_storage("sqlite")
    assert isinstance(storage, SqlStorage)
    assert storage.url.database == DEFAULT_SQLITE_FILE


def _run(*args: str, code: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATR_")}
    command = [sys.executable, "-c", code, *args] if code else [*COMMAND, *args]
    return subprocess.run(
        command,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_db_is_the_sql_distributions_command_and_goes_when_it_is_blocked(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path / "db.sqlite3")
    shown = _run("db", "upgrade", "--storage", url)
    assert shown.returncode == 0, shown.stderr
    blocked = _run("db", "upgrade", "--storage", url, ORCHESTRATR_BLOCK_PLUGINS="sql")
    assert blocked.returncode == 2
    assert "invalid choice: 'db'" in blocked.stderr
    assert "db " not in _run("--help", ORCHESTRATR_BLOCK_PLUGINS="sql").stdout


_GREETER = """
import argparse, json, sys
from orchestratr_core.cli import main
from orchestratr_core.cli.api import print_json
from orchestratr_core.errors import ConfigurationError
from orchestratr_core.plugin import get_plugin_manager, hookimpl

async def greet(args: argparse.Namespace) -> int:
    if args.who == "nobody":
        raise ConfigurationError("nobody to greet")
    print_json({"hello": args.who, "json": args.json})
    return 3

class Greeter:
    @hookimpl
    def orchestratr_cli_commands(self, commands, parents):
        parser = commands.add_parser("greet", parents=[parents.common, parents.as_json])
        parser.add_argument("who")
        parser.set_defaults(handler=greet)

get_plugin_manager().register(Greeter(), name="greeter")
sys.exit(main(sys.argv[1:]))
"""


def test_a_plugin_adds_a_command_that_runs_like_the_cores_own() -> None:
    proc = _run("greet", "world", "--json", code=_GREETER)
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout) == {"hello": "world", "json": True}
    failed = _run("greet", "nobody", code=_GREETER)
    assert failed.returncode == 2
    assert failed.stderr.strip() == "orchestratr: error: nobody to greet"


def test_a_command_module_is_not_a_backend() -> None:
    pm = PluginManager()
    pm.add_commands(*_parser_parts())
    with pytest.raises(PluginNotFound, match="unknown plugin 'sql'"):
        pm.make_storage("sql")


def _parser_parts() -> tuple[Any, CommandParents]:
    from orchestratr_core.cli.parser import command_parents

    parser = argparse.ArgumentParser()
    return parser.add_subparsers(), command_parents()
