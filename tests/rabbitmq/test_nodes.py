"""Several nodes in one URL: the transport connects to the first that answers and,
after losing its connection, to the next one. Here the "nodes" are TCP proxies in
front of the broker under test, so that one can be closed like a node that died;
the real three-node cluster runs in ``tests/chaos/test_cluster.py``."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from orchestratr_core.errors import BackendUnavailable, ConfigurationError
from orchestratr_core.protocol import JobMessage
from orchestratr_core.testing.proxy import SilentProxy
from orchestratr_core.transport import Delivery
from orchestratr_rabbitmq import RabbitMQTransport
from orchestratr_rabbitmq.settings import Settings
from tests.support.rabbitmq import broker_address

pytestmark = pytest.mark.rabbitmq

MakeTransport = Callable[..., RabbitMQTransport]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def nodes() -> AsyncIterator[list[SilentProxy]]:
    proxies = [SilentProxy(*broker_address()) for _ in range(2)]
    for proxy in proxies:
        await proxy.start()
    yield proxies
    for proxy in proxies:
        await proxy.stop()


def _url(*ports: int, password: str = "guest") -> str:
    return f"amqp://guest:{password}@" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/"


def test_the_url_names_several_nodes_and_each_gets_its_own_connection_url() -> None:
    settings = Settings.build(
        "amqp://u:s3cret@h1:5682,h2,[::1]:5684/vh?heartbeat=5&namespace=blue", {}
    )
    assert settings.nodes == ("h1:5682", "h2:5672", "::1:5684")
    assert settings.namespace == "blue"
    assert settings.connection_url(1) == "amqp://u:s3cret@h2/vh?heartbeat=5"
    assert settings.connection_url(2) == "amqp://u:s3cret@[::1]:5684/vh?heartbeat=5"
    assert "s3cret" not in repr(settings)
    assert "h1:5682,h2,[::1]:5684" in repr(settings)
    assert Settings.build("amqps://u:p@a,b/", {}).nodes == ("a:5671", "b:5671")


@pytest.mark.parametrize(
    "url", ["amqp://u:s3cret@h1:5682,h2:56x2/", "amqp://u:s3cret@h1,,h2/", "amqp://u:s3cret@h1,/"]
)
def test_a_bad_node_in_the_list_is_refused_without_showing_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.build(url, {})
    assert "s3cret" not in str(caught.value)


async def test_the_first_node_that_answers_is_used_and_named_without_the_password(
    make_transport: MakeTransport,
    nodes: list[SilentProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = _free_port()
    transport = make_transport(_url(dead, nodes[1].port, password="guest"))
    with caplog.at_level(logging.INFO, "orchestratr"):
        await transport.connect()
    assert transport.node == f"127.0.0.1:{nodes[1].port}"
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert f"127.0.0.1:{dead} cannot be reached" in said
    assert ":guest@" not in said


async def test_no_node_answering_is_a_clear_transient_error(make_transport: MakeTransport) -> None:
    transport = make_transport(_url(_free_port(), _free_port()), connect_attempts=1)
    with pytest.raises(BackendUnavailable, match="cannot be reached"):
        await transport.connect()


async def test_losing_a_node_moves_the_session_to_the_next_and_the_job_comes_back(
    make_transport: MakeTransport, nodes: list[SilentProxy]
) -> None:
    manager = make_transport()
    server = make_transport(_url(nodes[0].port, nodes[1].port), reconnect_delay=0.05)
    await manager.connect()
    await server.connect()
    assert server.node == f"127.0.0.1:{nodes[0].port}"
    inbox: asyncio.Queue[Delivery] = asyncio.Queue()
    await server.consume_jobs(1, inbox.put)
    job = JobMessage(job_id="j", name="n", argument="", generation=1, created_at=0.0)
    await manager.publish_job(job)
    held = await asyncio.wait_for(inbox.get(), 10)

    await nodes[0].stop()  # the node dies: its connections close, it refuses new ones
    await asyncio.wait_for(held.lost.wait(), 5)
    again = await asyncio.wait_for(inbox.get(), 15)
    assert again.message == job
    assert again.delivery_count == held.delivery_count + 1
    assert server.node == f"127.0.0.1:{nodes[1].port}"
    await again.ack()
