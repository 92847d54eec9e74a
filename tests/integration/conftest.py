"""Fixtures of the integration tests: a real Kafka-compatible broker over TCP.

``bootstrap`` is your cluster if ``EMERG_TEST_BOOTSTRAP`` names one (``host:port``),
otherwise an embedded Tansu broker started once per test session on 127.0.0.1. Every test
takes fresh topic and group names from ``unique_name`` so tests never see each other's
records, whichever broker they run against.

Tansu notes for test authors: set ``session.timeout.ms`` to about 6000 (group joins wait
about half of it; 23 s at librdkafka's default) and ``heartbeat.interval.ms`` to about 500
for fast rebalances (the ``consumer_conf`` fixture has both); give every ``poll`` a timeout.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import worker_world as ww

#: Consumer settings that keep group joins and rebalances to a few seconds on Tansu.
GROUP_CONF: dict[str, str | int | bool] = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
}


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[str]:
    """``bootstrap.servers`` of the broker the integration tests talk to."""
    external = os.environ.get("EMERG_TEST_BOOTSTRAP")
    if external:
        yield external
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
