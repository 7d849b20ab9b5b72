"""Options, URLs, plugin discovery and per-version arguments (no broker needed)."""

from __future__ import annotations

import pytest

from orchestratr_core.errors import ConfigurationError
from orchestratr_core.plugin.manager import PluginManager
from orchestratr_rabbitmq import BrokerVersion, RabbitMQTransport, Settings, Topology
from orchestratr_rabbitmq.topology import CONSUMER_TIMEOUT_MS


def test_the_default_fence_is_one_and_a_half_heartbeats_and_pings_thrice_per_fence() -> None:
    settings = Settings.build("amqp://u:p@h/", {})
    assert settings.heartbeat == 3
    assert settings.fence_timeout == 4.5
    assert settings.ping_interval == 1.5
    assert settings.fence_timeout < 2 * settings.heartbeat  # we always fence first
    assert "heartbeat=3" in settings.connection_url()
    assert Settings.build("amqp://u:p@h/", {"heartbeat": 10}).fence_timeout == 15.0


def test_a_fence_timeout_the_broker_could_overtake_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="two heartbeats"):
        Settings.build("amqp://h/", {"heartbeat": 5, "fence_timeout": 10})


def test_unknown_options_bad_namespaces_and_bad_schemes_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown RabbitMQ transport option"):
        Settings.build(None, {"prefetch": 3})
    with pytest.raises(ConfigurationError, match="namespace"):
        Settings.build(None, {"namespace": "bad name!"})
    with pytest.raises(ConfigurationError, match="queue_type"):
        Settings.build(None, {"queue_type": "stream"})
    with pytest.raises(ConfigurationError, match="amqp://"):
        Settings.build("http://secret:pw@h/", {})


def test_the_prefetch_step_is_a_whole_number_of_at_least_one_also_from_the_url() -> None:
    assert Settings.build("amqp://h/?prefetch_step=200", {}).prefetch_step == 200
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ConfigurationError, match="prefetch_step"):
            Settings.build("amqp://h/", {"prefetch_step": bad})
    with pytest.raises(ConfigurationError, match="prefetch_step must be a number"):
        Settings.build("amqp://h/?prefetch_step=lots", {})


def test_the_url_comes_from_the_environment_and_the_password_never_shows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORCHESTRATR_RABBITMQ_URL", "amqps://app@broker.example:5671/prod")
    monkeypatch.setenv("ORCHESTRATR_RABBITMQ_PASSWORD", "s3cr3t/+")
    settings = Settings.build(None, {})
    assert settings.url.startswith("amqps://app:s3cr3t%2F%2B@broker.example:5671/prod")
    assert settings.vhost == "prod"
    assert settings.host == "broker.example:5671"
    transport = RabbitMQTransport()
    assert "s3cr3t" not in repr(transport)
    assert "s3cr3t" not in repr(settings)


def test_the_plugin_is_found_by_name_and_by_amqp_and_amqps_schemes() -> None:
    manager = PluginManager()
    assert manager.schemes()["amqp"] == "rabbitmq"
    assert manager.schemes()["amqps"] == "rabbitmq"
    transport = manager.make_transport("amqp://guest:hunter2@127.0.0.1:5672/")
    assert isinstance(transport, RabbitMQTransport)
    assert "hunter2" not in repr(transport)
    by_name = manager.make_transport("rabbitmq")
    assert isinstance(by_name, RabbitMQTransport)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3.10.8", (3, 10, 8)), ("4.0.5", (4, 0, 5)), ("4.3.0-beta.1", (4, 3, 0)), ("", (0, 0, 0))],
)
def test_broker_versions_are_parsed(text: str, expected: tuple[int, int, int]) -> None:
    assert BrokerVersion.parse(text) == BrokerVersion(*expected)
    assert BrokerVersion.from_server_properties({"version": text.encode()}) == BrokerVersion(
        *expected
    )


def test_on_3_10_jobs_never_expire_and_nothing_version_specific_is_declared() -> None:
    t = Topology("ns", "quorum", BrokerVersion(3, 10, 8))
    assert t.jobs_arguments() == {"x-queue-type": "quorum", "x-dead-letter-exchange": "ns.dlx"}
    assert t.jobs_consumer_arguments() == {}
    assert t.consumer_timeout_ms() is None
    assert not t.consumer_timeout_configurable


def test_on_3_12_to_4_2_the_consumer_timeout_is_a_queue_argument() -> None:
    t = Topology("ns", "quorum", BrokerVersion(3, 12, 0))
    assert t.jobs_arguments()["x-consumer-timeout"] == CONSUMER_TIMEOUT_MS
    assert "x-delivery-limit" not in t.jobs_arguments()
    classic = Topology("ns", "classic", BrokerVersion(4, 2, 1))
    assert classic.jobs_arguments()["x-consumer-timeout"] == CONSUMER_TIMEOUT_MS
    assert "x-delivery-limit" not in classic.jobs_arguments()


def test_from_4_0_quorum_queues_have_no_delivery_limit() -> None:
    for version in (BrokerVersion(4, 0, 5), BrokerVersion(4, 3, 0)):
        t = Topology("ns", "quorum", version)
        assert t.jobs_arguments()["x-delivery-limit"] == -1
        assert t.events_arguments()["x-delivery-limit"] == -1
        assert t.cancellations_arguments()["x-delivery-limit"] == -1


def test_from_4_3_the_timeout_is_a_consumer_argument_on_quorum_queues_only() -> None:
    quorum = Topology("ns", "quorum", BrokerVersion(4, 3, 0))
    assert "x-consumer-timeout" not in quorum.jobs_arguments()
    assert quorum.jobs_consumer_arguments() == {"x-consumer-timeout": CONSUMER_TIMEOUT_MS}
    classic = Topology("ns", "classic", BrokerVersion(4, 3, 0))
    assert "x-consumer-timeout" not in classic.jobs_arguments()
    assert classic.jobs_consumer_arguments() == {}
    assert classic.consumer_timeout_ms() is None


def test_every_name_is_under_the_namespace() -> None:
    t = Topology("blue", "quorum", BrokerVersion(3, 10))
    for name in [*t.names(), *t.exchanges(), t.command_queue("s1")]:
        assert name.startswith("blue.")
    assert t.command_queue("s1") != t.command_queue("s1")


def test_options_can_ride_in_the_url_query_and_keyword_options_win() -> None:
    settings = Settings.build(
        "amqps://u:p@h/vh?namespace=blue&heartbeat=6&cafile=/ca.pem&queue_type=classic",
        {"queue_type": "quorum"},
    )
    assert settings.namespace == "blue"
    assert settings.heartbeat == 6
    assert settings.fence_timeout == 9.0  # 1.5 x the heartbeat given in the URL
    assert settings.queue_type == "quorum"
    url = settings.connection_url()
    assert "namespace" not in url
    assert "cafile=/ca.pem" in url
    assert "heartbeat=6" in url
    with pytest.raises(ConfigurationError, match="heartbeat"):
        Settings.build("amqp://h/?heartbeat=soon", {})
