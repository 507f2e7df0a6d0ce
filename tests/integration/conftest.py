"""Fixtures for tests against real MQTT brokers on 127.0.0.1.

- ``mosquitto_broker`` and ``amqtt_broker``: one :class:`EmbeddedBroker` of
  each kind for the whole session. A missing mosquitto binary FAILS the tests
  that need it (never skips): run ``scripts/setup.sh --dev``.
- ``broker_url``: parametrized over both kinds.
- ``mqtt_client``: makes connected :class:`MqttTransport` objects with unique
  client ids and closes them after the test.
- ``prefix``: a unique topic prefix, since tests share the session brokers.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from coordinator.broker import EmbeddedBroker, find_mosquitto
from edge_client.mqtt import BrokerUrl, MqttTransport

BROKER_KINDS = ("mosquitto", "amqtt")


@pytest.fixture(scope="session")
def mosquitto_broker() -> Iterator[EmbeddedBroker]:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed; run scripts/setup.sh --dev to install it for the integration tests")
    with EmbeddedBroker(kind="mosquitto") as broker:
        yield broker


@pytest.fixture(scope="session")
def amqtt_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(kind="amqtt") as broker:
        yield broker


@pytest.fixture(params=BROKER_KINDS)
def broker_url(request) -> str:
    """The URL of the session's mosquitto, then of its amqtt broker."""
    return request.getfixturevalue(f"{request.param}_broker").url


@pytest.fixture
def prefix() -> str:
    return f"test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def mqtt_client() -> Iterator[Callable[..., MqttTransport]]:
    """``mqtt_client(url, name="c", connect=True, **kwargs)`` -> a transport closed at teardown."""
    made: list[MqttTransport] = []

    def make(url: str | BrokerUrl, name: str = "c", *, connect: bool = True, **kwargs) -> MqttTransport:
        transport = MqttTransport(url, f"{name}-{uuid.uuid4().hex[:8]}", **kwargs)
        made.append(transport)
        if connect:
            transport.connect(timeout=5)
        return transport

    yield make
    for transport in made:
        transport.close()
