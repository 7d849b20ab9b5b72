"""Forged messages against a fleet on the real broker: least privilege by role
(RabbitMQ permissions exactly as ``docs/deployment.md`` gives them) and signed
messages (``orchestratr_core.signing``). Issue 11, section 2.

The three forgeries reproduced on the unprotected fleet: a ``release`` broadcast with
``hold_for: Infinity`` (every server released all jobs and took none), a job message
with a huge generation for a running job (took it over with the attacker's argument),
and a job message with an unknown id (ran the job function with attacker input)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiormq
import pytest

from orchestratr_core import OrchestratedServer, ServerManager
from orchestratr_core.job import JobStatus
from orchestratr_core.signing import Signer, SigningKey
from orchestratr_memory import MemoryStorage
from orchestratr_rabbitmq import RabbitMQTransport
from orchestratr_rabbitmq.topology import ROLES, permissions
from tests.support.cluster import FAST_MANAGER, FAST_SERVER, Ledger, eventually
from tests.support.rabbitmq import BROKER_URL, broker_address, rabbitmqctl

DOCS = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"


@dataclass
class Users:
    """One broker user per role, with exactly the documented permissions."""

    urls: dict[str, str]
    names: dict[str, str]


@pytest.fixture
def users(namespace: str) -> Iterator[Users]:
    """Broker users for manager, server and web on ``namespace``; deleted afterwards."""
    run = uuid.uuid4().hex[:8]
    urls: dict[str, str] = {}
    names: dict[str, str] = {}
    try:
        for role in ROLES:
            name = f"orchestratr-test-{run}-{role}"
            password = secrets.token_hex(12)
            rabbitmqctl("add_user", name, password)
            names[role] = name
            granted = permissions(role, namespace)
            rabbitmqctl(
                "set_permissions", "-p", "/", name, granted.configure, granted.write, granted.read
            )
            urls[role] = f"amqp://{name}:{password}@{':'.join(map(str, broker_address()))}/"
        yield Users(urls, names)
    finally:
        for name in names.values():
            with contextlib.suppress(Exception):
                rabbitmqctl("delete_user", name)


def test_the_documented_permissions_are_the_ones_tested() -> None:
    """docs/deployment.md gives, for the default namespace, the very lines the tests
    grant (for their own namespace) with :func:`permissions`."""
    text = DOCS.read_text("utf-8")
    for role in ROLES:
        line = permissions(role).command(f"orchestratr-{role}")
        assert line in text, f"docs/deployment.md lacks the {role} line:\n{line}"


def _job_message(job_id: str, generation: int, argument: str = "attacker") -> bytes:
    return json.dumps(
        {
            "v": 1,
            "type": "job",
            "job_id": job_id,
            "name": f"forged-{job_id}",
            "argument": argument,
            "generation": generation,
            "created_at": time.time(),
        }
    ).encode()


# The broadcast of the report, Infinity as Python's json writes it.
RELEASE_ALL = json.dumps(
    {"v": 1, "type": "release", "count": 1000, "hold": 0, "hold_for": float("inf")}
).encode()


class Fleet:
    """A manager and one server in this process, each on its own broker user."""

    def __init__(self, namespace: str, ledger: Ledger) -> None:
        self.namespace = namespace
        self.ledger = ledger
        self.storage = MemoryStorage()
        self.manager: ServerManager | None = None
        self.servers: list[OrchestratedServer] = []
        self.transports: list[RabbitMQTransport] = []

    def transport(self, url: str, signer: Signer | None = None) -> RabbitMQTransport:
        transport = RabbitMQTransport(url, namespace=self.namespace, signer=signer)
        self.transports.append(transport)
        return transport

    async def start_manager(self, url: str, signer: Signer | None = None) -> ServerManager:
        self.manager = ServerManager(
            storage=self.storage, transport=self.transport(url, signer), options=FAST_MANAGER
        )
        await self.manager.start()
        return self.manager

    async def add_server(
        self, url: str, name: str, signer: Signer | None = None
    ) -> OrchestratedServer:
        server = OrchestratedServer(
            self.ledger.job(name),
            transport=self.transport(url, signer),
            name=name,
            max_workers=10,
            options=FAST_SERVER,
        )
        await server.start()
        self.servers.append(server)
        return server

    async def create(self, names: list[str]) -> list[str]:
        assert self.manager is not None
        return [await self.manager.client.create_job(n, "genuine") for n in names]

    async def wait_running(self, job_ids: list[str]) -> None:
        await eventually(
            lambda: all(len(self.ledger.running(j)) == 1 for j in job_ids),
            20,
            what="every job running once",
        )

    async def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.kill()
        if self.manager is not None:
            with contextlib.suppress(Exception):
                await self.manager.stop()
        for transport in self.transports:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(transport.close(), 15)


@pytest.fixture
async def fleet(namespace: str) -> AsyncIterator[Fleet]:
    made = Fleet(namespace, Ledger())
    try:
        yield made
    finally:
        await made.close()


async def _refused(url: str, exchange: str, routing_key: str, body: bytes) -> None:
    """Publishing ``body`` as the user of ``url`` is refused by the broker."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.basic_publish(
                body, exchange=exchange, routing_key=routing_key, mandatory=True
            )
    finally:
        await connection.close()


async def _publish(
    exchange: str, routing_key: str, body: bytes, headers: dict[str, object] | None = None
) -> None:
    """Publish as guest (who may do anything on the vhost), confirmed and routed."""
    connection = await aiormq.connect(BROKER_URL)
    try:
        channel = await connection.channel()
        await channel.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            mandatory=True,
            properties=aiormq.spec.Basic.Properties(headers=headers, user_id="guest"),
        )
    finally:
        await connection.close()


async def _assert_untouched(fleet: Fleet, job_ids: list[str], unknown: str) -> None:
    """The genuine jobs run as their one first copy, nothing ran the unknown id,
    and the server still takes new jobs (no endless hold)."""
    await asyncio.sleep(2.0)  # several heartbeats and commands would have happened
    for job_id in job_ids:
        copies = fleet.ledger.of(job_id)
        assert len(copies) == 1 and copies[0].end is None, (job_id, copies)
        assert fleet.manager is not None
        record = await fleet.manager.admin.job(job_id)
        assert record.status is JobStatus.PROCESSING
        assert record.argument == "genuine"
    assert fleet.ledger.of(unknown) == []
    later = await fleet.create([f"later-{uuid.uuid4().hex[:6]}"])
    await fleet.wait_running(later)


async def test_a_fleet_runs_with_least_privilege_and_a_servers_user_cannot_control_it(
    users: Users, fleet: Fleet, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    manager = await fleet.start_manager(users.urls["manager"])
    await fleet.add_server(users.urls["server"], "s1")
    job_ids = await fleet.create(["a", "b", "c"])
    await fleet.wait_running(job_ids)

    # Cancelling writes the set (manager) and reaches the server (broadcast).
    await manager.client.mark_on_deleting(job_ids[2])
    await eventually(lambda: fleet.ledger.running(job_ids[2]) == [], 20, what="cancel")
    job_ids = job_ids[:2]

    # A second server reads the stored set read-only and works.
    await fleet.add_server(users.urls["server"], "s2")
    # The web role: creates and cancels with its own user, no configure rights.
    web_transport = fleet.transport(users.urls["web"])
    await web_transport.connect()
    web = ServerManager(storage=fleet.storage, transport=web_transport)
    from_web = await web.client.create_job("from-web", "genuine")
    await fleet.wait_running([from_web])
    await web.client.mark_on_deleting(from_web)
    await eventually(lambda: fleet.ledger.running(from_web) == [], 20, what="web cancel")

    # The server's user may not publish a job, a takeover, a release or a set, by
    # any exchange: the broker refuses (ACCESS_REFUSED) before anything is queued.
    server_url, ns = users.urls["server"], namespace
    unknown = uuid.uuid4().hex
    takeover = _job_message(job_ids[0], 2**40)
    for exchange, key in ((f"{ns}.jobs.in", f"{ns}.jobs"), ("", f"{ns}.jobs")):
        await _refused(server_url, exchange, key, _job_message(unknown, 1))
        await _refused(server_url, exchange, key, takeover)
    for exchange, key in ((f"{ns}.broadcast", ""), (f"{ns}.commands", fleet.servers[0].id)):
        await _refused(server_url, exchange, key, RELEASE_ALL)
    await _refused(server_url, f"{ns}.cancellations.in", f"{ns}.cancellations", b"{}")
    await _refused(server_url, "", f"{ns}.events", b"{}")  # events only via events.in
    # Another broker user may publish events (guest may do anything), but not in the
    # name of s1: its events came from the server user (the broker validates user_id).
    record = await manager.admin.job(job_ids[0])
    completed = {
        "v": 1,
        "type": "stopped",
        "server_id": record.server_id,
        "job_id": job_ids[0],
        "fence": record.fence,
        "reason": "completed",
        "at": time.time(),
    }
    caplog.clear()
    await _publish(f"{ns}.events.in", f"{ns}.events", json.dumps(completed).encode())
    await _assert_untouched(fleet, job_ids, unknown)
    assert "whose events come from broker user" in caplog.text
    assert f"from broker user {users.names['server']!r}" in caplog.text


async def test_a_server_cannot_start_before_a_manager_declared_the_namespace(
    users: Users, namespace: str
) -> None:
    """Least privilege: a server's user may not declare the namespace; it says so."""
    from orchestratr_core.errors import PermanentBackendError

    transport = RabbitMQTransport(users.urls["server"], namespace=namespace, connect_attempts=1)
    with pytest.raises(PermanentBackendError, match="start a manager"):
        await transport.connect()
    await transport.close()


def _key() -> SigningKey:
    return SigningKey(secrets.token_hex(32))


async def test_with_a_key_forged_and_replayed_messages_change_nothing(
    fleet: Fleet, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Everyone is guest (no broker permissions separate the roles), but the fleet
    has a key: unsigned, wrongly signed and replayed messages are dead-lettered.
    The manager and the server are mid-rotation (the manager already signs with the
    new key, the server still with the old): both are accepted."""
    old, new = _key(), _key()
    await fleet.start_manager(BROKER_URL, Signer(new, old))
    server = await fleet.add_server(BROKER_URL, "s1", Signer(old, new))
    job_ids = await fleet.create(["a", "b"])
    await fleet.wait_running(job_ids)

    ns = namespace
    unknown = uuid.uuid4().hex
    stranger = Signer(_key())
    now = int(time.time())
    forged: list[tuple[str, str, bytes, dict[str, object] | None]] = [
        (f"{ns}.broadcast", "", RELEASE_ALL, None),
        (f"{ns}.commands", server.id, RELEASE_ALL, None),
        (f"{ns}.jobs.in", f"{ns}.jobs", _job_message(job_ids[0], 2**40), None),
        ("", f"{ns}.jobs", _job_message(unknown, 1), None),
        # Signed, but with a key the fleet does not have.
        (
            f"{ns}.broadcast",
            "",
            RELEASE_ALL,
            {
                "x-orchestratr-signed-at": now,
                "x-orchestratr-signature": stranger.sign(
                    RELEASE_ALL, (f"{ns}.broadcast", "", "guest", str(now))
                ),
            },
        ),
    ]
    # Validly signed with the fleet's key (as a leaked old message would be), but
    # for another routing (a command to one server replayed as a broadcast) and as
    # a command signed long ago (a replay).
    fleet_signer = Signer(new)
    stale = now - 3600
    forged.append(
        (
            f"{ns}.broadcast",
            "",
            RELEASE_ALL,
            {
                "x-orchestratr-signed-at": now,
                "x-orchestratr-signature": fleet_signer.sign(
                    RELEASE_ALL, (f"{ns}.commands", server.id, "guest", str(now))
                ),
            },
        )
    )
    forged.append(
        (
            f"{ns}.broadcast",
            "",
            RELEASE_ALL,
            {
                "x-orchestratr-signed-at": stale,
                "x-orchestratr-signature": fleet_signer.sign(
                    RELEASE_ALL, (f"{ns}.broadcast", "", "guest", str(stale))
                ),
            },
        )
    )
    caplog.clear()
    for exchange, key, body, headers in forged:
        await _publish(exchange, key, body, headers)
    await _assert_untouched(fleet, job_ids, unknown)
    refused = [r for r in caplog.records if "dead-lettering" in r.getMessage()]
    assert len(refused) == len(forged), [r.getMessage() for r in refused]
    texts = " ".join(r.getMessage() for r in refused)
    assert "unsigned" in texts and "unknown key" in texts and "wrong authenticator" in texts
    assert "beyond signature_max_age" in texts and "broker user 'guest'" in texts
    for secret_holder in (old, new):
        assert secret_holder._secret.decode() not in caplog.text


def _spawn(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``orchestratr ARGS`` with its output in ``log``."""
    from tests.support.cli import COMMAND, clean_env

    with log.open("wb") as out:
        return subprocess.Popen(
            [*COMMAND, "--log-level", "info", *args],
            cwd=cwd,
            env=clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _show(db: str, job_id: str, cwd: Path) -> dict[str, object]:
    from tests.support.cli import run

    proc = run("jobs", "show", job_id, "--storage", db, "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    shown: dict[str, object] = json.loads(proc.stdout)
    return shown


async def test_real_processes_with_a_key_file_run_jobs_and_refuse_forgeries(
    namespace: str, tmp_path: Path
) -> None:
    """``orchestratr manager`` and ``orchestratr server`` with ``--signing-key-file``:
    the job runs; an unsigned release broadcast and job message do nothing."""
    from orchestratr_core.cli import sqlite_url
    from tests.support.cli import run

    secret = secrets.token_hex(32)
    key_file = tmp_path / "fleet.key"
    key_file.write_text(secret + "\n")
    key_file.chmod(0o600)
    db = sqlite_url(tmp_path / "fleet.sqlite3")
    url = f"{BROKER_URL}?namespace={namespace}"
    logs = {name: tmp_path / f"{name}.log" for name in ("manager", "server")}
    args = {
        "manager": ["manager", "--storage", db, "--sweep-interval", "0.2"],
        "server": ["server", "--job", "orchestratr_core.examples:ticker"],
    }
    procs = []
    try:
        for name in ("manager", "server"):
            command = [*args[name], "--transport", url, "--signing-key-file", str(key_file)]
            procs.append(_spawn(command, tmp_path, logs[name]))
            if name == "manager":
                await eventually(
                    lambda: "connected to RabbitMQ" in logs["manager"].read_text(),
                    30,
                    what="manager",
                )
        created = run("jobs", "create", "tick-1", "0.2", "--storage", db, "--json", cwd=tmp_path)
        assert created.returncode == 0, created.stderr
        job_id = str(json.loads(created.stdout)["id"])
        await eventually(
            lambda: _show(db, job_id, tmp_path)["status"] == "processing", 30, what="job running"
        )
        fence = _show(db, job_id, tmp_path)["fence"]
        unknown = uuid.uuid4().hex
        await _publish(f"{namespace}.broadcast", "", RELEASE_ALL)
        await _publish(f"{namespace}.jobs.in", f"{namespace}.jobs", _job_message(unknown, 1))
        await _publish(f"{namespace}.jobs.in", f"{namespace}.jobs", _job_message(job_id, 2**40))
        await asyncio.sleep(3)
        shown = _show(db, job_id, tmp_path)
        assert shown["status"] == "processing" and shown["fence"] == fence, shown
        server_log = logs["server"].read_text()
        assert server_log.count("tick-1: started") == 1, server_log
        assert "forged-" not in server_log
        assert server_log.count("dead-lettering") == 3, server_log
        assert "signed with key" in server_log and "signed with key" in logs["manager"].read_text()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for log_file in logs.values():
        assert secret not in log_file.read_text()


def test_the_key_file_can_be_given_in_the_url_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``?signing_key_file=`` (how the benchmarks and ``--transport`` URLs pass it),
    the ``signer`` option, else the environment; never shown in a repr."""
    from orchestratr_core.errors import ConfigurationError
    from orchestratr_rabbitmq.settings import Settings

    secret = secrets.token_hex(32)
    key_file = tmp_path / "fleet.key"
    key_file.write_text(secret)
    key_file.chmod(0o600)
    monkeypatch.delenv("ORCHESTRATR_SIGNING_KEY_FILE", raising=False)
    monkeypatch.delenv("ORCHESTRATR_SIGNING_KEY", raising=False)
    from_url = Settings.build(f"{BROKER_URL}?signing_key_file={key_file}", {})
    assert from_url.signer is not None
    assert from_url.signer.current.key_id == SigningKey(secret).key_id
    assert secret not in repr(from_url) and from_url.signer.current.key_id in repr(from_url)
    assert "signing_key_file" not in from_url.connection_url()
    assert Settings.build(BROKER_URL, {}).signer is None
    monkeypatch.setenv("ORCHESTRATR_SIGNING_KEY", secret)
    from_env = Settings.build(BROKER_URL, {})
    assert from_env.signer is not None and from_env.signer.previous is None
    with pytest.raises(ConfigurationError, match="signer must be"):
        Settings.build(BROKER_URL, {"signer": "not a signer"})
    with pytest.raises(ConfigurationError, match="signature_max_age"):
        Settings.build(BROKER_URL, {"signature_max_age": "0"})


async def test_a_server_user_cannot_consume_events_and_is_told_why(
    users: Users, fleet: Fleet, namespace: str
) -> None:
    """A role that subscribes to what it may not read fails at once, naming the docs."""
    from orchestratr_core.errors import PermanentBackendError

    await fleet.start_manager(users.urls["manager"])
    transport = fleet.transport(users.urls["server"])
    await transport.connect()

    async def ignore(_: object) -> None:
        return None

    with pytest.raises(PermanentBackendError, match="Broker permissions by role"):
        await transport.consume_events(ignore)
