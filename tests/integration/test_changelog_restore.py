"""Restore from a changelog on the real broker: what a worker gets back on assign.

One changelog topic with three partitions: an empty one; one whose last states come
after its last mark (an incomplete checkpoint) and with a tombstone; one written in
multi-record batches (Tansu then lists a short end) in both ItemState versions. The
restore returns each partition's items as of its last mark, still raw, and a second
restore with the same consumer returns the same.
"""

from __future__ import annotations

import io
import json

import fastavro
import numpy as np
import pytest
from confluent_kafka import Consumer, Producer

from emerg_stream.io.avro import frame
from emerg_stream.io.schemas import load_manifest, load_schema
from emerg_stream.state import ItemTask, RecentIds
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.stream.changelog import restore_partitions
from emerg_stream.stream.checkpointing import MARK_KEY, PartitionMark
from emerg_stream.stream.metrics import OutcomeCounts
from emerg_stream.stream.reader import reader_conf
from emerg_stream.stream.topics import TopicSpec, ensure_topics

pytestmark = pytest.mark.integration

CODEC = ItemStateCodec(dedupe_window=50)


def state(item_id: str, version: int) -> bytes:
    task = ItemTask(
        item_id,
        categorical={"genre": "drama"},
        version=version,
        next_threshold=10,
        recent=RecentIds(50, [f"{item_id}:e{j}" for j in range(3)]),
        adjacency=np.full(4, version, dtype=np.float32),
        id_embedding=np.zeros(2, dtype=np.float32),
    )
    return CODEC.encode(task)


def state_v1(item_id: str, version: int) -> bytes:
    rec = dict(CODEC.serde.decode(state(item_id, version)))
    del rec["recent_event_hashes"]
    rec["recent_event_ids"] = [f"{item_id}:e{j}" for j in range(3)]
    schema = json.loads(json.dumps(load_schema("ItemState", 1)).replace("timestamp-millis", "x"))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema, named_schemas={}), rec)
    return frame(load_manifest().records["ItemState"].versions[1].schema_id, buf.getvalue())


def mark(p: int) -> bytes:
    return PartitionMark(p, "m1", {"items": 1}, [], 0, OutcomeCounts(), 0).encode()


def test_restore_keeps_what_the_last_mark_completed_raw_until_read(kafka_conf, unique_name):
    topic = unique_name("changelog")
    ensure_topics(kafka_conf, [TopicSpec("changelog", topic, 3, 1, {"cleanup.policy": "compact"})])
    prod = Producer({**kafka_conf, "linger.ms": 50})  # several records per batch
    # partition 1: a, b, c, mark; then b's tombstone, mark; then a v3 after the last mark
    for key, value in [
        (b"a", state("a", 1)),
        (b"b", state("b", 1)),
        (b"c", state("c", 1)),
        (MARK_KEY, mark(1)),
        (b"b", None),
        (b"c", state("c", 2)),
        (MARK_KEY, mark(1)),
        (b"a", state("a", 3)),
    ]:
        prod.produce(topic, value, key, 1)
    # partition 2: 300 items in batches, old and current format, then a mark
    for i in range(300):
        value = state_v1(f"x{i}", 1) if i % 2 else state(f"x{i}", 1)
        prod.produce(topic, value, f"x{i}".encode(), 2)
    prod.produce(topic, mark(2), MARK_KEY, 2)
    assert prod.flush(30) == 0

    consumer = Consumer(reader_conf(kafka_conf))
    try:
        for _ in range(2):  # the worker reuses its restore consumer
            out = restore_partitions(consumer, topic, [0, 1, 2], CODEC, timeout_s=60)
            assert out[0].mark is None and len(out[0].items) == 0 and out[0].records == 0
            one = out[1]
            assert one.mark is not None and one.records == 8 and one.discarded == 1
            assert sorted(one.items) == ["a", "c"] and one.items.n_raw == 2
            assert one.items["a"].version == 1 and one.items["c"].version == 2
            assert one.items["c"].adjacency is not None
            assert one.items["c"].adjacency.tolist() == [2.0] * 4
            two = out[2]
            assert len(two.items) == 300 and two.items.n_raw == 300 and two.records == 301
            for item_id in ("x0", "x1"):  # current and version-1 values
                task = two.items[item_id]
                assert task.item_id == item_id and f"{item_id}:e2" in task.recent
            assert two.items.n_raw == 298
    finally:
        consumer.close()


def test_a_value_under_another_items_key_stops_the_restore(kafka_conf, unique_name):
    from emerg_stream.errors import SchemaError

    topic = unique_name("changelog")
    ensure_topics(kafka_conf, [TopicSpec("changelog", topic, 1, 1, {"cleanup.policy": "compact"})])
    prod = Producer(kafka_conf)
    prod.produce(topic, state("a", 1), b"b", 0)
    prod.produce(topic, mark(0), MARK_KEY, 0)
    assert prod.flush(30) == 0
    consumer = Consumer(reader_conf(kafka_conf))
    try:
        with pytest.raises(SchemaError, match="another item"):
            restore_partitions(consumer, topic, [0], CODEC, timeout_s=60)
    finally:
        consumer.close()
