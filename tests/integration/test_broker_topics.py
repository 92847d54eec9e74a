"""Topic creation from infra/topics.yaml and the co-partitioning check, on a real broker."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from emerg_stream.config import TopicSettings
from emerg_stream.errors import ConfigError
from emerg_stream.stream.topics import (
    check_copartitioned,
    ensure_topics,
    load_topic_specs,
    topic_configs,
    topic_partitions,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "infra" / "topics.yaml"
QUIET = logging.getLogger("tests.librdkafka")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


def names_for(unique_name: Callable[[str], str]) -> TopicSettings:
    return TopicSettings(
        items=unique_name("items"),
        interactions=unique_name("interactions"),
        item_params=unique_name("params"),
        predictions=unique_name("predictions"),
        dead_letter=unique_name("dlq"),
        changelog=unique_name("changelog"),
    )


@pytest.mark.timeout(60)
def test_create_is_idempotent_and_sets_the_spec(
    kafka_conf: dict[str, str], unique_name: Callable[[str], str]
) -> None:
    names = names_for(unique_name)
    first = ensure_topics(kafka_conf, SPEC, names, timeout_s=10)
    assert set(first.values()) == {"created"}
    second = ensure_topics(kafka_conf, SPEC, names, timeout_s=10)
    assert set(second.values()) == {"exists"}

    admin = AdminClient({**kafka_conf, "logger": QUIET})
    specs = load_topic_specs(SPEC, names)
    counts = topic_partitions(admin, [s.name for s in specs], timeout_s=10)
    assert counts == {s.name: s.partitions for s in specs}
    assert counts[names.dead_letter] == 1
    assert counts[names.items] == counts[names.interactions] == 4

    # Tansu reports the configs set at creation and omits defaults; a full Kafka reports
    # every config, so only the values we set are compared.
    configs = topic_configs(admin, list(names.names().values()), timeout_s=10)
    assert configs[names.item_params]["cleanup.policy"] == "compact"
    assert configs[names.changelog]["cleanup.policy"] == "compact"
    for plain in (names.items, names.interactions, names.predictions, names.dead_letter):
        assert configs[plain].get("cleanup.policy", "delete") == "delete"


@pytest.mark.timeout(60)
def test_copartition_check_accepts_equal_and_refuses_mismatched_counts(
    kafka_conf: dict[str, str], unique_name: Callable[[str], str]
) -> None:
    admin = AdminClient({**kafka_conf, "logger": QUIET})
    items, inter, inter3 = unique_name("items"), unique_name("inter"), unique_name("inter3")
    futures = admin.create_topics(
        [NewTopic(items, 4, 1), NewTopic(inter, 4, 1), NewTopic(inter3, 3, 1)],
        operation_timeout=10,
    )
    for fut in futures.values():
        fut.result(timeout=10)

    assert check_copartitioned(admin, items, inter, timeout_s=10) == 4

    with pytest.raises(ConfigError) as info:
        check_copartitioned(admin, items, inter3, timeout_s=10)
    message = str(info.value)
    assert "4 partitions" in message
    assert "has 3" in message
    assert f"--topic {inter3} --partitions 4" in message
    assert "emerg-stream topics create" in message

    with pytest.raises(ConfigError, match="do not exist"):
        check_copartitioned(admin, items, unique_name("missing"), timeout_s=10)


def test_specs_refuse_mismatched_items_and_interactions() -> None:
    bad = {"topics": {"items": {"partitions": 4}, "interactions": {"partitions": 2}}}
    with pytest.raises(ConfigError, match="co-partitioned"):
        load_topic_specs(bad)
    # the settings override keeps them equal
    specs = load_topic_specs(bad, TopicSettings(partitions=8))
    assert {s.role: s.partitions for s in specs}["interactions"] == 8
    assert {s.role: s.partitions for s in specs}["dead_letter"] == 1
