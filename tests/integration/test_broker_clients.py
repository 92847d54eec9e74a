"""Clients against the broker: Avro-framed records through 4 partitions, group rebalances."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from emerg_stream.io.avro import AvroSerde, peek_schema_id
from emerg_stream.io.records import Interaction

pytestmark = pytest.mark.integration

QUIET = logging.getLogger("tests.librdkafka")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


def create_topic(kafka_conf: dict[str, str], name: str, partitions: int) -> None:
    admin = AdminClient({**kafka_conf, "logger": QUIET})
    admin.create_topics([NewTopic(name, partitions, 1)], operation_timeout=10)[name].result(10)


def interaction(i: int) -> Interaction:
    return {
        "event_id": f"e{i}",
        "item_id": f"item-{i % 10}",
        "user_id": f"u{i % 7}",
        "categorical": {"gender": "MF"[i % 2]},
        "multi": {"tags": [f"t{i % 3}"]},
        "numeric": {"age": float(20 + i % 30)},
        "label": i % 2,
        "event_time": 1_700_000_000_000 + i,
    }


@pytest.mark.timeout(60)
def test_avro_records_round_trip_through_four_partitions(
    kafka_conf: dict[str, str],
    consumer_conf: dict[str, str | int | bool],
    unique_name: Callable[[str], str],
) -> None:
    topic = unique_name("interactions")
    create_topic(kafka_conf, topic, 4)
    serde = AvroSerde(Interaction, topic=topic)
    sent = [interaction(i) for i in range(200)]

    producer = Producer({**kafka_conf, "enable.idempotence": True, "logger": QUIET})
    failures: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            failures.append(err)

    for rec in sent:
        producer.produce(
            topic, key=rec["item_id"], value=serde.encode(rec), on_delivery=on_delivery
        )
    assert producer.flush(10) == 0
    assert not failures

    consumer = Consumer({**consumer_conf, "group.id": unique_name("group"), "logger": QUIET})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(4)])
    received: list[Interaction] = []
    partition_of_key: dict[bytes, set[int]] = {}
    deadline = time.monotonic() + 20
    try:
        while len(received) < len(sent) and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=100, timeout=0.5):
                assert msg.error() is None, msg.error()
                value = msg.value()
                assert value is not None
                assert peek_schema_id(value) == serde.schema_id
                received.append(serde.decode(value))
                partition_of_key.setdefault(msg.key() or b"", set()).add(msg.partition())
    finally:
        consumer.close()

    assert sorted(r["event_id"] for r in received) == sorted(r["event_id"] for r in sent)
    assert {r["event_id"]: r for r in received} == {r["event_id"]: r for r in sent}
    # keyed by item id: one partition per item, and the items spread over the partitions
    assert all(len(parts) == 1 for parts in partition_of_key.values())
    assert len({p for parts in partition_of_key.values() for p in parts}) > 1


def _assignment(c: Consumer) -> set[int]:
    return {tp.partition for tp in c.assignment()}


@pytest.mark.timeout(60)
def test_two_group_members_split_four_partitions_and_rebalance_when_one_leaves(
    kafka_conf: dict[str, str],
    consumer_conf: dict[str, str | int | bool],
    unique_name: Callable[[str], str],
) -> None:
    topic, group = unique_name("items"), unique_name("group")
    create_topic(kafka_conf, topic, 4)
    conf = {**consumer_conf, "group.id": group, "logger": QUIET}
    first = Consumer(conf)
    second: Consumer | None = Consumer(conf)
    revoked: list[set[int]] = []
    first.subscribe(
        [topic], on_revoke=lambda c, parts: revoked.append({p.partition for p in parts})
    )
    second.subscribe([topic])
    try:
        started = time.monotonic()
        deadline = started + 30
        while time.monotonic() < deadline:
            first.poll(0.1)
            second.poll(0.1)
            a, b = _assignment(first), _assignment(second)
            if a and b and a | b == {0, 1, 2, 3}:
                break
        join_s = time.monotonic() - started
        a, b = _assignment(first), _assignment(second)
        assert a and b, f"no split within 30 s: {a} / {b}"
        assert a | b == {0, 1, 2, 3}
        assert not a & b

        revokes_before = len(revoked)
        left = time.monotonic()
        second.close()  # leaves the group: the survivor must take every partition
        second = None
        while time.monotonic() < left + 30 and _assignment(first) != {0, 1, 2, 3}:
            first.poll(0.1)
        rebalance_s = time.monotonic() - left
        assert _assignment(first) == {0, 1, 2, 3}
        assert len(revoked) > revokes_before, "the survivor saw no rebalance"
    finally:
        first.close()
        if second is not None:
            second.close()
    print(f"group: 2 members split 4 partitions in {join_s:.2f} s; rebalance {rebalance_s:.2f} s")
    assert join_s < 15 and rebalance_s < 15  # with session.timeout.ms=6000 (23 s at default)
