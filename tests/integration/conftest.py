"""Fixtures of the integration tests: a real Kafka-compatible broker over TCP.

``bootstrap`` is your cluster if ``EMERG_TEST_BOOTSTRAP`` names one (``host:port``);
else, with ``EMERG_TEST_BROKER=kafka`` (``make test-kafka``), Apache Kafka started once per
test session on 127.0.0.1 (:mod:`emerg_stream.stream.apache_kafka`; Java 17+ and Maven);
otherwise an embedded Tansu broker started once per test session. Tests marked ``kafka``
need Apache Kafka's own features (transactions, SASL_SSL users, ACLs, the log cleaner) and
take the ``apache_kafka`` fixture; they are skipped on the other brokers. Every test takes
fresh topic and group names from ``unique_name`` so tests never see each other's records,
whichever broker they run against.

Tansu notes for test authors: set ``session.timeout.ms`` to about 6000 (group joins wait
about half of it; 23 s at librdkafka's default) and ``heartbeat.interval.ms`` to about 500
for fast rebalances (the ``consumer_conf`` fixture has both); give every ``poll`` a timeout.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import worker_world as ww

if TYPE_CHECKING:
    from emerg_stream.stream.apache_kafka import ApacheKafka

#: Consumer settings that keep group joins and rebalances to a few seconds on Tansu.
GROUP_CONF: dict[str, str | int | bool] = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
}


def broker_kind() -> str:
    """``external`` (EMERG_TEST_BOOTSTRAP), ``kafka`` or ``embedded`` (EMERG_TEST_BROKER)."""
    if os.environ.get("EMERG_TEST_BOOTSTRAP"):
        return "external"
    kind = os.environ.get("EMERG_TEST_BROKER", "embedded").strip().lower() or "embedded"
    if kind not in ("embedded", "kafka"):
        raise pytest.UsageError(f"EMERG_TEST_BROKER={kind!r}: use 'embedded' or 'kafka'")
    return kind


def pytest_report_header(config: pytest.Config) -> str:
    """Name the broker of the run (and Kafka's version) in pytest's header."""
    kind = broker_kind()
    if kind == "kafka":
        from emerg_stream.stream.apache_kafka import KAFKA_VERSION

        return f"integration broker: Apache Kafka {KAFKA_VERSION} (KRaft, EMERG_TEST_BROKER=kafka)"
    if kind == "external":
        return f"integration broker: EMERG_TEST_BOOTSTRAP={os.environ['EMERG_TEST_BOOTSTRAP']}"
    return "integration broker: embedded Tansu (EMERG_TEST_BROKER=kafka for Apache Kafka)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``kafka`` tests unless the run's broker is Apache Kafka."""
    if broker_kind() == "kafka":
        return
    skip = pytest.mark.skip(reason="needs Apache Kafka: EMERG_TEST_BROKER=kafka (make test-kafka)")
    for item in items:
        if "kafka" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def apache_kafka() -> Iterator[ApacheKafka]:
    """The session's Apache Kafka (only with ``EMERG_TEST_BROKER=kafka``; else skip)."""
    if broker_kind() != "kafka":
        pytest.skip("needs Apache Kafka: EMERG_TEST_BROKER=kafka (make test-kafka)")
    from emerg_stream.stream.apache_kafka import ApacheKafka

    with ApacheKafka() as kafka:
        yield kafka


@pytest.fixture(scope="session")
def bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    """``bootstrap.servers`` of the broker the integration tests talk to."""
    kind = broker_kind()
    if kind == "external":
        yield os.environ["EMERG_TEST_BOOTSTRAP"]
        return
    if kind == "kafka":
        kafka: ApacheKafka = request.getfixturevalue("apache_kafka")
        yield kafka.bootstrap
        return
    from emerg_stream.stream.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.bootstrap


@pytest.fixture
def kafka_conf(bootstrap: str) -> dict[str, str]:
    """Minimal librdkafka settings for the test broker (copy before adding keys)."""
    return {"bootstrap.servers": bootstrap}


@pytest.fixture
def consumer_conf(kafka_conf: dict[str, str]) -> dict[str, str | int | bool]:
    """``kafka_conf`` plus :data:`GROUP_CONF`; add ``group.id`` (from ``unique_name``)."""
    return {**kafka_conf, **GROUP_CONF}


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Factory of unique topic / group names: ``unique_name("items")`` -> ``t-items-<hex>``."""
    test = request.node.name.split("[")[0].removeprefix("test_")[:24]

    def make(kind: str = "topic") -> str:
        return f"t-{test}-{kind}-{uuid.uuid4().hex[:10]}"

    return make


# -- the worker tests' synthetic world (tests/worker_world.py); a module may override --


@pytest.fixture(scope="module")
def world() -> ww.World:
    """24 new and 4 old items with their clicks."""
    return ww.make_world(n_new=24, n_old=4)


@pytest.fixture(scope="module")
def checkpoint(world: ww.World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained checkpoint of ``world``."""
    return ww.build_checkpoint(world, tmp_path_factory.mktemp("ck") / "tiny")


@pytest.fixture(scope="module")
def offline(world: ww.World, checkpoint: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    """The params the worker must publish for ``world``, computed offline."""
    return ww.offline_phis(world, checkpoint)
