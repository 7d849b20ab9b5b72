"""The ``orchestratr`` command, run as a real subprocess, as a person or a script would."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestratr_core.cli import sqlite_url
from tests.support.cli import COMMAND, assert_one_line_error, clean_env, run

SECRET = "hunter2-s3cret"


@pytest.fixture
def db(tmp_path: Path) -> str:
    return sqlite_url(tmp_path / "cli.sqlite3")


# -- usage errors -----------------------------------------------------------------------


def test_no_command_is_a_usage_error_in_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run(cwd=tmp_path), 2, "COMMAND")


def test_unknown_command_is_a_usage_error_in_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run("frobnicate", cwd=tmp_path), 2, "frobnicate")


def test_help_lists_every_command(tmp_path: Path) -> None:
    proc = run("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("demo", "server", "manager", "jobs", "servers", "plugins", "db"):
        assert command in proc.stdout


def test_module_invocation_works_like_the_script(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestratr_core.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("orchestratr ")


@pytest.mark.parametrize("workers", ["0", "-3", "many", "3000000000", "2147483648"])
def test_server_rejects_max_workers_below_one(tmp_path: Path, workers: str) -> None:
    """Above 2^31-1 too: ``--max-workers 3000000000`` overflowed the int32 column of
    the server's heartbeat and halted the manager (issue 11)."""
    proc = run(
        "server",
        "--job",
        "orchestratr_core.examples:ticker",
        "--max-workers",
        workers,
        "--transport",
        "memory://x",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, 2, "--max-workers")
    if workers.isdigit() and int(workers) > 1:
        assert "1..2147483647" in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["server", "--job", "orchestratr_core.examples:ticker", "--heartbeat-interval", "0"],
         "heartbeat_interval must be > 0"),
        (["server", "--job", "orchestratr_core.examples:ticker", "--stop-grace", "-1"],
         "--stop-grace"),
        (["manager", "--server-timeout", "0"], "server_timeout"),
        (["manager", "--sweep-interval", "30"], "leader_lease must be longer than sweep_interval"),
    ],
)  # fmt: skip
def test_timings_that_cannot_work_are_refused(tmp_path: Path, args: list[str], needle: str) -> None:
    backends = ["--transport", "memory://timings"]
    if args[0] == "manager":
        backends += ["--storage", "memory"]
    assert_one_line_error(run(*args, *backends, cwd=tmp_path), 2, needle)


def test_server_job_without_colon_says_the_expected_form(tmp_path: Path) -> None:
    proc = run(
        "server", "--job", "orchestratr_core.examples", "--transport", "memory", cwd=tmp_path
    )
    assert_one_line_error(proc, 2, "MODULE:FUNCTION")


def test_server_job_module_that_does_not_exist_is_named(tmp_path: Path) -> None:
    proc = run("server", "--job", "no_such_module_xyz:job", "--transport", "memory", cwd=tmp_path)
    assert_one_line_error(proc, 2, "cannot import job module 'no_such_module_xyz'")


def test_server_job_attribute_that_does_not_exist_is_named(tmp_path: Path) -> None:
    proc = run(
        "server", "--job", "orchestratr_core.examples:nope", "--transport", "memory", cwd=tmp_path
    )
    assert_one_line_error(proc, 2, "has no attribute 'nope'")


def test_server_job_module_that_raises_on_import_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken_jobs.py").write_text("raise RuntimeError('boom at import')\n")
    proc = run("server", "--job", "broken_jobs:job", "--transport", "memory", cwd=tmp_path)
    assert_one_line_error(proc, 2, "RuntimeError: boom at import")


def test_server_job_module_is_found_in_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "my_jobs.py").write_text("async def job(arg, token, heartbeat):\n    await token\n")
    proc = run("server", "--job", "my_jobs:job", cwd=tmp_path)
    # The job loaded; what is missing next is the transport.
    assert_one_line_error(proc, 2, "no transport given", "ORCHESTRATR_TRANSPORT")


def test_manager_without_transport_says_how_to_give_one(tmp_path: Path) -> None:
    assert_one_line_error(run("manager", cwd=tmp_path), 2, "--transport", "ORCHESTRATR_TRANSPORT")


def test_unknown_storage_plugin_suggests_the_closest_name(tmp_path: Path) -> None:
    proc = run("jobs", "list", "--storage", "memroy", cwd=tmp_path)
    assert_one_line_error(proc, 2, "unknown plugin 'memroy'", "did you mean 'memory'")


def test_listing_without_any_storage_explains_where_it_looked(tmp_path: Path) -> None:
    proc = run("jobs", "list", cwd=tmp_path)
    assert_one_line_error(proc, 2, "orchestratr.sqlite3", "ORCHESTRATR_STORAGE")
    assert not (tmp_path / "orchestratr.sqlite3").exists()


# -- credentials ---------------------------------------------------------------------------


def test_password_of_an_unknown_scheme_is_never_echoed(tmp_path: Path) -> None:
    url = f"fooql://orch:{SECRET}@db/x"
    assert_one_line_error(
        run("jobs", "list", "--storage", url, cwd=tmp_path), 2, "unknown URL scheme 'fooql'"
    )
    # Debug logging shows the traceback, still without the password.
    proc = run("--log-level", "debug", "jobs", "list", "--storage", url, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


def test_password_in_a_misplaced_argument_is_never_echoed(tmp_path: Path) -> None:
    proc = run("--storage", f"postgresql://orch:{SECRET}@db/x", "jobs", "list", cwd=tmp_path)
    assert_one_line_error(proc, 2, "postgresql://orch:***@db/x")
    assert SECRET not in proc.stdout + proc.stderr


def test_password_of_an_unreachable_database_is_never_echoed(tmp_path: Path) -> None:
    url = f"postgresql://orch:{SECRET}@127.0.0.1:9/nowhere"
    proc = run("--log-level", "debug", "jobs", "list", "--storage", url, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr.splitlines()[-1]
    assert proc.stderr.strip().splitlines()[-1].startswith("orchestratr: error:")


def test_password_in_the_environment_is_never_echoed(tmp_path: Path) -> None:
    env = clean_env(
        ORCHESTRATR_STORAGE=f"postgresql://orch:{SECRET}@127.0.0.1:5432/nowhere",
        ORCHESTRATR_TRANSPORT="memory://cli-env",
    )
    proc = run("--log-level", "debug", "manager", cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("orchestratr: error:")
    assert SECRET not in proc.stdout + proc.stderr


# -- plugins ------------------------------------------------------------------------------


def test_plugins_lists_the_memory_backend_with_its_distribution(tmp_path: Path) -> None:
    proc = run("plugins", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split()[:2] == ["PLUGIN", "DISTRIBUTION"]
    memory = next(r for r in rows if r.split()[0] == "memory")
    assert "orchestratr" in memory
    assert "memory://" in memory


def test_plugins_json_names_distribution_and_schemes(tmp_path: Path) -> None:
    proc = run("plugins", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert plugins["memory"]["schemes"] == ["memory"]
    assert plugins["memory"]["distribution"].replace("_", "-") == "orchestratr-memory"
    assert plugins["memory"]["blocked"] is False


def test_plugins_shows_a_blocked_plugin(tmp_path: Path) -> None:
    env = clean_env(ORCHESTRATR_BLOCK_PLUGINS="memory")
    proc = run("plugins", "--json", cwd=tmp_path, env=env)
    assert {p["name"]: p["blocked"] for p in json.loads(proc.stdout)}["memory"] is True


# -- jobs against a SQLite file, without a transport (outbox only) ----------------------------


def test_jobs_create_list_show_cancel_round_trip(tmp_path: Path, db: str) -> None:
    created = run(
        "jobs", "create", "feed-1", '{"tenant": 7}', "--storage", db, "--json", cwd=tmp_path
    )
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]

    listed = json.loads(run("jobs", "list", "--storage", db, "--json", cwd=tmp_path).stdout)
    assert [j["id"] for j in listed["items"]] == [job_id]
    assert listed["total"] == 1
    assert listed["next_cursor"] is None

    shown = json.loads(run("jobs", "show", job_id, "--storage", db, "--json", cwd=tmp_path).stdout)
    assert shown["name"] == "feed-1"
    assert shown["argument"] == '{"tenant": 7}'
    assert shown["status"] == "pending"
    assert shown["server_id"] is None

    cancelled = run("jobs", "cancel", job_id, "--storage", db, "--json", cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["status"] == "deleting"

    again = run("jobs", "show", job_id, "--storage", db, "--json", cwd=tmp_path)
    assert json.loads(again.stdout)["status"] == "deleting"


def test_jobs_create_prints_only_the_id_on_stdout(tmp_path: Path, db: str) -> None:
    proc = run("jobs", "create", "poller", "--storage", db, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) == 1
    assert "manager" in proc.stderr


def test_jobs_list_is_an_aligned_table_with_filters(tmp_path: Path, db: str) -> None:
    for name in ("alpha-1", "alpha-2", "beta-1"):
        assert run("jobs", "create", name, "--storage", db, cwd=tmp_path).returncode == 0
    proc = run("jobs", "list", "--name-prefix", "alpha", "--storage", db, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[0]
    assert header.split() == [
        "ID",
        "NAME",
        "STATUS",
        "SERVER",
        "FENCE",
        "RESTARTS",
        "UPDATED",
        "KIND",
    ]
    rows = lines[1:3]
    assert [r.split()[1] for r in rows] == ["alpha-1", "alpha-2"]
    status_column = header.index("STATUS")
    assert all(r[status_column:].startswith("pending") for r in rows)
    assert "2 of 2 jobs shown" in proc.stdout


def test_jobs_list_pages_with_a_cursor(tmp_path: Path, db: str) -> None:
    for i in range(3):
        assert run("jobs", "create", f"job-{i}", "--storage", db, cwd=tmp_path).returncode == 0
    first = json.loads(
        run("jobs", "list", "--limit", "2", "--storage", db, "--json", cwd=tmp_path).stdout
    )
    assert [j["name"] for j in first["items"]] == ["job-0", "job-1"]
    assert first["total"] == 3
    second = json.loads(
        run(
            "jobs", "list", "--limit", "2", "--after", first["next_cursor"],
            "--storage", db, "--json", cwd=tmp_path,
        ).stdout
    )  # fmt: skip
    assert [j["name"] for j in second["items"]] == ["job-2"]


def test_jobs_list_status_filter_accepts_several_and_rejects_unknown(
    tmp_path: Path, db: str
) -> None:
    job_id = run("jobs", "create", "a", "--storage", db, cwd=tmp_path).stdout.strip()
    run("jobs", "create", "b", "--storage", db, cwd=tmp_path)
    run("jobs", "cancel", job_id, "--storage", db, cwd=tmp_path)
    proc = run(
        "jobs", "list", "--status", "deleting,processing", "--storage", db, "--json", cwd=tmp_path
    )
    assert [j["name"] for j in json.loads(proc.stdout)["items"]] == ["a"]
    proc = run("jobs", "list", "--status", "PENDING", "--storage", db, "--json", cwd=tmp_path)
    assert [j["name"] for j in json.loads(proc.stdout)["items"]] == ["b"]
    assert_one_line_error(
        run("jobs", "list", "--status", "runing", "--storage", db, cwd=tmp_path),
        2,
        "unknown job status 'runing'",
    )


def test_storage_comes_from_the_environment(tmp_path: Path, db: str) -> None:
    env = clean_env(ORCHESTRATR_STORAGE=db)
    assert run("jobs", "create", "from-env", cwd=tmp_path, env=env).returncode == 0
    listed = json.loads(run("jobs", "list", "--json", cwd=tmp_path, env=env).stdout)
    assert [j["name"] for j in listed["items"]] == ["from-env"]


def test_create_without_storage_uses_the_sqlite_file_in_the_working_directory(
    tmp_path: Path,
) -> None:
    assert run("jobs", "create", "local", cwd=tmp_path).returncode == 0
    assert (tmp_path / "orchestratr.sqlite3").exists()
    listed = json.loads(run("jobs", "list", "--json", cwd=tmp_path).stdout)
    assert [j["name"] for j in listed["items"]] == ["local"]


def test_duplicate_name_is_refused_in_one_line(tmp_path: Path, db: str) -> None:
    assert run("jobs", "create", "once", "--storage", db, cwd=tmp_path).returncode == 0
    proc = run("jobs", "create", "once", "--storage", db, cwd=tmp_path)
    assert_one_line_error(proc, 1, "already exists")


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("   ", "blank"),
        ("", "empty"),
        ("x" * 201, "limit is 200"),
        ("tab\there", "control character"),
    ],
)
def test_bad_job_names_are_refused_with_the_reason(
    tmp_path: Path, db: str, name: str, needle: str
) -> None:
    proc = run("jobs", "create", name, "--storage", db, cwd=tmp_path)
    assert_one_line_error(proc, 2, needle)
    listed = json.loads(run("jobs", "list", "--storage", db, "--json", cwd=tmp_path).stdout)
    assert listed["items"] == []


def test_oversized_argument_is_refused(tmp_path: Path, db: str) -> None:
    proc = run("jobs", "create", "big", "x" * (64 * 1024 + 1), "--storage", db, cwd=tmp_path)
    assert_one_line_error(proc, 2, "limit is 65536 bytes")


def test_unknown_job_id_is_a_one_line_runtime_error(tmp_path: Path, db: str) -> None:
    missing = "01900000-0000-7000-8000-000000000000"
    assert_one_line_error(
        run("jobs", "show", missing, "--storage", db, cwd=tmp_path), 1, "no job with id"
    )
    assert_one_line_error(
        run("jobs", "cancel", missing, "--storage", db, cwd=tmp_path), 1, "no job with id"
    )


def test_jobs_show_is_readable(tmp_path: Path, db: str) -> None:
    job_id = run("jobs", "create", "readable", "7", "--storage", db, cwd=tmp_path).stdout.strip()
    proc = run("jobs", "show", job_id, "--storage", db, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fields = dict(line.split(None, 1) for line in proc.stdout.splitlines() if " " in line)
    assert fields["name"].strip() == "readable"
    assert fields["status"].strip() == "pending"


def test_servers_list_with_no_servers_says_so(tmp_path: Path, db: str) -> None:
    run("jobs", "create", "x", "--storage", db, cwd=tmp_path)
    proc = run("servers", "list", "--storage", db, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no live servers" in proc.stdout
    assert (
        json.loads(run("servers", "list", "--all", "--json", "--storage", db, cwd=tmp_path).stdout)
        == []
    )


def test_draining_an_unknown_server_is_a_one_line_error(tmp_path: Path, db: str) -> None:
    run("jobs", "create", "x", "--storage", db, cwd=tmp_path)
    proc = run("servers", "drain", "nope", "--storage", db, "--transport", "memory", cwd=tmp_path)
    assert_one_line_error(proc, 1, "no server with id 'nope'")


def test_db_status_and_upgrade_on_a_sqlite_file(tmp_path: Path, db: str) -> None:
    upgrade = run("db", "upgrade", "--storage", db, cwd=tmp_path)
    assert upgrade.returncode == 0, upgrade.stderr
    status = run("db", "status", "--storage", db, "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)


def test_db_commands_refuse_a_storage_that_is_not_sql(tmp_path: Path) -> None:
    assert_one_line_error(run("db", "status", "--storage", "memory", cwd=tmp_path), 2, "SQL")


# -- long-running commands ------------------------------------------------------------------


def _wait_for_line(proc: subprocess.Popen[str], needle: str, limit: float) -> list[str]:
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} not seen in: {seen}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_server_stops_cleanly_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [*COMMAND, "--log-format", "json", "server", "--name", "cli-test",
         "--job", "orchestratr_core.examples:ticker", "--transport", "memory://cli"],
        cwd=tmp_path, env=clean_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen = _wait_for_line(proc, "server started", 30)
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    records = [json.loads(line) for line in [*seen, *rest.splitlines()] if line.strip()]
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    assert any("server stopped" in r["message"] for r in records)


def test_manager_without_storage_uses_and_names_the_sqlite_file_here(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*COMMAND, "manager", "--transport", "memory://cli-manager"],
        cwd=tmp_path, env=clean_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_line(proc, "manager started", 30)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"SQLite file {tmp_path / 'orchestratr.sqlite3'}" in out
    assert (tmp_path / "orchestratr.sqlite3").exists()
    assert "manager stopped" in err


@pytest.mark.parametrize("role", ["server", "manager"])
def test_a_signal_stops_a_process_that_is_still_waiting_for_its_broker(
    tmp_path: Path, role: str
) -> None:
    unreachable = "amqp://guest:guest@127.0.0.1:9/"  # nothing listens on port 9
    args = (
        ["server", "--job", "orchestratr_core.examples:ticker", "--transport", unreachable]
        if role == "server"
        else ["manager", "--storage", "memory", "--transport", unreachable]
    )
    proc = subprocess.Popen(
        [*COMMAND, *args], cwd=tmp_path, env=clean_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_line(proc, "retrying", 30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 1), err
    assert "Traceback" not in err
    assert "guest:guest" not in err


# -- hostile text: URLs that do not parse, control characters in stored text ----------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:ab/cdefSECRET@host/db",  # '/' in the password: it runs into the path
        "postgresql://u:p@ssSECRET@127.0.0.1:5432/nowhere",  # an unencoded '@' in the password
        "postgresql://u:ab?cdSECRET@127.0.0.1:5432/nowhere",  # '?' in the password
    ],
)
def test_a_url_that_does_not_parse_cleanly_is_wholly_secret(tmp_path: Path, url: str) -> None:
    proc = run("--log-level", "debug", "jobs", "list", "--storage", url, cwd=tmp_path, timeout=120)
    assert proc.returncode in (1, 2), proc.stderr
    assert "SECRET" not in proc.stdout + proc.stderr
    assert "postgresql://***" in proc.stderr.splitlines()[-1]
    env = clean_env(ORCHESTRATR_STORAGE=url, ORCHESTRATR_TRANSPORT="memory://cli-unclean")
    proc = run("--log-level", "debug", "manager", cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode in (1, 2), proc.stderr
    assert "SECRET" not in proc.stdout + proc.stderr


ESC_RED = "\x1b[31m"
CLEAR_SCREEN = "\x1b[2J"
SET_TITLE = "\x1b]0;pwned\x07"


def _store_hostile_text(db: str) -> str:
    """A job and a server whose stored text carries terminal escape sequences, as
    a job function's error, an old row or a hostile heartbeat can leave them."""
    from orchestratr_core.client import OrchestratorClient
    from orchestratr_core.job import JobEvent, utcnow
    from orchestratr_core.plugin.manager import make_storage
    from orchestratr_core.protocol import ServerHeartbeat

    async def fill() -> str:
        storage = make_storage(db)
        await storage.open()
        try:
            job_id = await OrchestratorClient(storage).create_job("evil", f"{CLEAR_SCREEN}arg")
            now = utcnow()
            heartbeat = ServerHeartbeat(
                server_id="srv-evil", name=f"{SET_TITLE}srv", max_workers=2,
                started_at=now.timestamp(), sent_at=now.timestamp(),
                host=f"{ESC_RED}host", pid=4242,
            )  # fmt: skip
            await storage.apply_heartbeat(heartbeat, now)
            await storage.transition(job_id, JobEvent.START, server_id="srv-evil", fence=7, now=now)
            await storage.transition(
                job_id, JobEvent.FAIL, server_id="srv-evil", fence=7, now=now,
                error=f"ValueError: {ESC_RED}boom\nsecond line", restarts=1,
            )  # fmt: skip
            return job_id
        finally:
            await storage.close()

    job_id = asyncio.run(fill())
    # Names are validated on creation; a row written by other means may still hold one.
    path = db.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE jobs SET name = ? WHERE id = ?", (f"{ESC_RED}evil", job_id))
    return job_id


def test_tables_escape_control_characters_of_stored_text(tmp_path: Path, db: str) -> None:
    job_id = _store_hostile_text(db)
    listing = run("jobs", "list", "--storage", db, cwd=tmp_path)
    shown = run("jobs", "show", job_id, "--storage", db, cwd=tmp_path)
    servers = run("servers", "list", "--storage", db, cwd=tmp_path)
    for proc in (listing, shown, servers):
        assert proc.returncode == 0, proc.stderr
        assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout, proc.stdout
    assert "\\x1b[31mevil" in listing.stdout
    assert "\\x1b[2Jarg" in shown.stdout
    assert "ValueError: \\x1b[31mboom\\nsecond line" in shown.stdout
    assert (
        len(shown.stdout.splitlines()) == 17
    )  # one line per field (kind, constraints, spread too): no raw newline
    assert "\\x1b]0;pwned\\x07srv" in servers.stdout and "\\x1b[31mhost" in servers.stdout

    # JSON stays exact: the very strings that are stored.
    job = json.loads(run("jobs", "show", job_id, "--json", "--storage", db, cwd=tmp_path).stdout)
    assert job["name"] == f"{ESC_RED}evil"
    assert job["argument"] == f"{CLEAR_SCREEN}arg"
    assert job["last_error"] == f"ValueError: {ESC_RED}boom\nsecond line"
    (server,) = json.loads(run("servers", "list", "--json", "--storage", db, cwd=tmp_path).stdout)
    assert (server["name"], server["host"]) == (f"{SET_TITLE}srv", f"{ESC_RED}host")


def test_web_refuses_a_memory_transport_beside_a_shared_storage(tmp_path: Path, db: str) -> None:
    run("jobs", "create", "x", "--storage", db, cwd=tmp_path)
    proc = run("web", "--storage", db, "--transport", "memory://", "--http", "127.0.0.1:0",
               cwd=tmp_path)  # fmt: skip
    assert_one_line_error(proc, 2, "memory transport", "no server listens to")


@pytest.mark.parametrize("command", ["web", "manager"])
def test_a_token_that_is_not_printable_ascii_is_refused_before_starting(
    tmp_path: Path, command: str
) -> None:
    token = "s\u00e9same-ouvre-toi-1234"
    proc = run(command, "--storage", "memory", "--transport", "memory://tok", "--http",
               "127.0.0.1:0", "--api-token", token, cwd=tmp_path)  # fmt: skip
    assert_one_line_error(proc, 2, "printable ASCII")
    assert token not in proc.stdout + proc.stderr


def test_jobs_pause_resume_by_id_and_selection_with_the_lifecycle_fields(
    tmp_path: Path, db: str
) -> None:
    """Without a transport: the pause is committed with its outbox row (a running
    manager tells the servers); a queued job is paused until a server confirms."""
    created = run(
        "jobs", "create", "tenant-x-1", "--max-restarts", "3", "--restart-window", "90",
        "--storage", db, "--json", cwd=tmp_path,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]
    for name in ("tenant-x-2", "tenant-y-1"):
        assert run("jobs", "create", name, "--storage", db, cwd=tmp_path).returncode == 0

    shown = json.loads(run("jobs", "show", job_id, "--storage", db, "--json", cwd=tmp_path).stdout)
    for field in ("status", "checkpoint_size", "checkpoint_at", "restarts", "last_error",
                  "quarantine_reason", "last_errors", "failures"):  # fmt: skip
        assert field in shown, field
    assert (shown["max_restarts"], shown["restart_window"]) == (3, 90.0)

    paused = run("jobs", "pause", job_id, "--storage", db, "--json", cwd=tmp_path)
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout)["status"] == "pausing"
    # Still pausing (no server confirmed): resume says so and changes nothing.
    early = run("jobs", "resume", job_id, "--storage", db, cwd=tmp_path)
    assert early.returncode == 1
    assert "still pausing" in early.stdout

    selection = run("jobs", "pause", "--name-prefix", "tenant-x", "--storage", db, cwd=tmp_path)
    assert selection.returncode == 0, selection.stderr
    assert "paused 1 job(s)" in selection.stdout  # tenant-x-1 was pausing already
    kinds = run("jobs", "pause", "--kind", "socket", "--storage", db, "--json", cwd=tmp_path)
    assert json.loads(kinds.stdout) == []
    listed = json.loads(run("jobs", "list", "--storage", db, "--json", cwd=tmp_path).stdout)
    assert sorted((j["name"], j["status"]) for j in listed["items"]) == [
        ("tenant-x-1", "pausing"),
        ("tenant-x-2", "pausing"),
        ("tenant-y-1", "pending"),
    ]
    both = run("jobs", "pause", job_id, "--name-prefix", "x", "--storage", db, cwd=tmp_path)
    assert_one_line_error(both, 2, "give a job id, or select jobs")
    bad = run("jobs", "create", "z", "--max-restarts", "-1", "--storage", db, cwd=tmp_path)
    assert bad.returncode == 2


def test_jobs_kinds_constraints_and_spread_on_the_command_line(tmp_path: Path, db: str) -> None:
    created = run(
        "jobs", "create", "eu-socket", "7", "--kind", "socket", "--require", "region=eu",
        "--require", "nic!=1g", "--spread", "tenant-7", "--storage", db, "--json", cwd=tmp_path,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    assert (body["kind"], body["constraints"], body["spread"]) == (
        "socket",
        ["nic!=1g", "region=eu"],
        "tenant-7",
    )
    plain = run("jobs", "create", "plain", "--storage", db, "--json", cwd=tmp_path)
    assert json.loads(plain.stdout)["kind"] == "default"
    listed = run("jobs", "list", "--kind", "socket", "--storage", db, "--json", cwd=tmp_path)
    assert [j["name"] for j in json.loads(listed.stdout)["items"]] == ["eu-socket"]
    shown = run("jobs", "show", body["id"], "--storage", db, "--json", cwd=tmp_path)
    job = json.loads(shown.stdout)
    assert job["kind"] == "socket" and job["constraints"] == ["nic!=1g", "region=eu"]
    assert "pending_reason" in job  # set by a running manager's leader
    text = run("jobs", "show", body["id"], "--storage", db, cwd=tmp_path).stdout
    assert "kind" in text and "region=eu" in text and "pending reason" in text
    table = run("jobs", "list", "--storage", db, cwd=tmp_path).stdout
    assert "socket" in table


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--kind", "bad kind"], "job kind"),
        (["--require", "region"], "KEY=VALUE"),
        (["--require", "a=1", "--require", "a=2"], "never both hold"),
        (["--require", "a=1|2", "--require", "a!=1|2"], "never both hold"),
        (["--require", "a=1|"], "constraint value"),
        (["--spread", "no spaces"], "spread group"),
    ],
)
def test_jobs_create_refuses_bad_placement_in_one_line(
    tmp_path: Path, db: str, args: list[str], needle: str
) -> None:
    proc = run("jobs", "create", "x", *args, "--storage", db, cwd=tmp_path)
    assert_one_line_error(proc, 2, needle)


def test_server_job_kinds_and_labels_are_checked_before_it_connects(tmp_path: Path) -> None:
    base = ["server", "--transport", "memory://cli-kinds", "--job"]
    twice = run(*base, "a=orchestratr_core.examples:ticker", "--job",
                "a=orchestratr_core.examples:ticker", cwd=tmp_path)  # fmt: skip
    assert_one_line_error(twice, 2, "names kind 'a' twice")
    label = run(*base, "orchestratr_core.examples:ticker", "--label", "nolabel", cwd=tmp_path)
    assert_one_line_error(label, 2, "KEY=VALUE")
    limit = run(*base, "a=orchestratr_core.examples:ticker", "--max-workers-per-kind", "b=2",
                cwd=tmp_path)  # fmt: skip
    assert_one_line_error(limit, 2, "does not run")


def test_jobs_update_replaces_the_argument_and_show_tells_the_update_state(
    tmp_path: Path, db: str
) -> None:
    """``jobs update ID ARGUMENT`` (the argument as ``jobs create`` takes it):
    without a transport the update is committed with its outbox row; a queued job
    waits ``pausing`` for a server to drop its old message, then restarts."""
    created = run("jobs", "create", "cfg", "v1", "--storage", db, "--json", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]

    updated = run("jobs", "update", job_id, '{"rate": 5}', "--storage", db, "--json", cwd=tmp_path)
    assert updated.returncode == 0, updated.stderr
    body = json.loads(updated.stdout)
    assert (body["argument"], body["argument_version"], body["update_pending"]) == (
        '{"rate": 5}',
        1,
        True,
    )
    assert body["status"] == "pausing"
    assert body["argument_updated_at"] is not None

    text = run("jobs", "update", job_id, "v3", "--storage", db, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "argument updated (update 2)" in text.stdout
    assert "restarts with it" in text.stdout
    shown = json.loads(run("jobs", "show", job_id, "--storage", db, "--json", cwd=tmp_path).stdout)
    assert (shown["argument"], shown["argument_version"], shown["update_pending"]) == (
        "v3",
        2,
        True,
    )
    human = run("jobs", "show", job_id, "--storage", db, cwd=tmp_path).stdout
    assert "argument updates" in human and "restart with it pending" in human

    # Bad input: one line, exit 2, nothing changed.
    too_big = run("jobs", "update", job_id, "x" * (64 * 1024 + 1), "--storage", db, cwd=tmp_path)
    assert_one_line_error(too_big, 2, "the limit is")
    missing = run("jobs", "update", job_id, "--storage", db, cwd=tmp_path)
    assert missing.returncode == 2
    unknown = run("jobs", "update", "no-such-job", "x", "--storage", db, cwd=tmp_path)
    assert_one_line_error(unknown, 1, "no job with id")
    # A cancelled job: a clear error, exit 1, nothing changed.
    assert run("jobs", "cancel", job_id, "--storage", db, cwd=tmp_path).returncode == 0
    late = run("jobs", "update", job_id, "v4", "--storage", db, cwd=tmp_path)
    assert_one_line_error(late, 1, "cannot be updated")
    final = json.loads(run("jobs", "show", job_id, "--storage", db, "--json", cwd=tmp_path).stdout)
    assert (final["argument"], final["argument_version"]) == ("v3", 2)


def test_jobs_update_of_a_job_whose_server_takes_it_in_place(tmp_path: Path, db: str) -> None:
    """A running job whose server announced its kind updatable (and no live server
    of an older version): ``jobs update`` keeps it running and says so;
    ``--restart`` asks for the restart instead; ``jobs show`` tells which."""
    created = run("jobs", "create", "live", "v1", "--storage", db, "--json", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]
    asyncio.run(_run_on_an_updatable_server(db, job_id))

    updated = run("jobs", "update", job_id, "v2", "--storage", db, cwd=tmp_path)
    assert updated.returncode == 0, updated.stderr
    assert "takes it without a restart" in updated.stdout
    shown = json.loads(run("jobs", "show", job_id, "--storage", db, "--json", cwd=tmp_path).stdout)
    assert (shown["status"], shown["update_mode"], shown["argument_applied_version"]) == (
        "processing",
        "in_place",
        0,
    )
    human = run("jobs", "show", job_id, "--storage", db, cwd=tmp_path).stdout
    assert "in place, not yet acknowledged" in human

    restarted = run(
        "jobs", "update", job_id, "v3", "--restart", "--storage", db, "--json", cwd=tmp_path
    )
    assert restarted.returncode == 0, restarted.stderr
    body = json.loads(restarted.stdout)
    assert (body["status"], body["update_pending"], body["argument_version"]) == (
        "pausing",
        True,
        2,
    )


async def _run_on_an_updatable_server(db: str, job_id: str) -> None:
    """Start ``job_id`` on a server that takes updates of the default kind in place
    (its heartbeat, applied to the storage as a manager would)."""
    from orchestratr_core import protocol as p
    from orchestratr_core.job import make_fence, utcnow
    from orchestratr_sql.factory import storage_from_url

    storage = storage_from_url(db)
    await storage.open()
    try:
        now = utcnow()
        beat = p.ServerHeartbeat(
            server_id="srv-1",
            name="srv-1",
            max_workers=2,
            started_at=now.timestamp() - 60,
            sent_at=now.timestamp(),
            jobs=(p.RunningJob(job_id, make_fence(1, 1)),),
            updatable=("default",),
            drops=True,
        )
        assert await storage.apply_heartbeat(beat, now) == []
    finally:
        await storage.close()
