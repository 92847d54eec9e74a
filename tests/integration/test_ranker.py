"""RankerClient against a real broker: catch-up, live updates, version rules, refusals."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from confluent_kafka import Producer

from emerg_stream.data.log import InteractionLog
from emerg_stream.data.split import split_log
from emerg_stream.errors import ModelError
from emerg_stream.features import FeatureSpec
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import ItemEvent, ItemParams
from emerg_stream.meta.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from emerg_stream.meta.pipeline import model_config
from emerg_stream.model import build_model
from emerg_stream.serving.ranker import RankerClient
from emerg_stream.stream.topics import TopicSpec, ensure_topics

pytestmark = pytest.mark.integration

ROWS = [(i, f"u{j % 5}", 10 * j, j % 2) for i, n in [("o1", 12), ("n1", 8)] for j in range(n)]
FEATS = {"cat": "n", "tags": ["tn", "common"], "price": 3.0}


@pytest.fixture
def checkpoint(make_log: Callable[..., InteractionLog], tmp_path: Path) -> Checkpoint:
    split = split_log(make_log(ROWS, n=9, k=2))
    spec = FeatureSpec.fit(split.schema, split.old)
    torch.manual_seed(0)
    model = build_model(model_config("emerg", spec)).eval()
    meta = {"old_item_ids": ["o1"], "noise_salt": 0, "warmup": {}, "split": {"k": 2}}
    save_checkpoint(tmp_path / "ck", model, spec.to_dict(), meta)
    return load_checkpoint(tmp_path / "ck")


@pytest.fixture
def topics(kafka_conf: dict[str, str], unique_name: Callable[[str], str]) -> tuple[str, str]:
    params, items = unique_name("params"), unique_name("items")
    ensure_topics(
        kafka_conf,
        [
            TopicSpec("item_params", params, 2, 1, {"cleanup.policy": "compact"}),
            TopicSpec("items", items, 2, 1),
        ],
    )
    return params, items


def record(ck: Checkpoint, item: str, version: int, fill: float, mv: str | None = None) -> bytes:
    f, d = ck.model.config.n_fields, ck.model.config.dim
    rec: ItemParams = {
        "item_id": item,
        "version": version,
        "phase": "cold" if version == 1 else "warm_a",
        "support_size": 0,
        "model_version": mv or ck.model_version,
        "n_fields": f,
        "adjacency": [fill] * (f * f),
        "id_embedding": [fill / 10] * d,
        "source_offsets": [],
        "produced_time": 0,
    }
    return AvroSerde(ItemParams).encode(rec)


def send(conf: dict[str, str], topic: str, key: str, value: bytes | None) -> None:
    p = Producer(conf)
    p.produce(topic, key=key.encode(), value=value)
    p.flush(10)


def test_catch_up_keeps_the_newest_version_then_follows_live(
    checkpoint: Checkpoint, kafka_conf: dict[str, str], topics: tuple[str, str]
) -> None:
    params_topic, items_topic = topics
    producer = Producer(kafka_conf)
    for item, version, fill in [("n1", 1, 0.1), ("n1", 3, 0.3), ("n1", 2, 0.2), ("n2", 1, 0.5)]:
        producer.produce(
            params_topic, key=item.encode(), value=record(checkpoint, item, version, fill)
        )
    event: ItemEvent = {
        "item_id": "n1",
        "categorical": {"cat": "n"},
        "multi": {"tags": ["tn", "common"]},
        "numeric": {"price": 3.0},
        "event_time": 0,
    }
    producer.produce(items_topic, key=b"n1", value=AvroSerde(ItemEvent).encode(event))
    producer.flush(10)

    with RankerClient(checkpoint, kafka_conf, params_topic, items_topic=items_topic) as ranker:
        ranker.catch_up(timeout_s=30)
        assert ranker.version("n1") == 3 and ranker.version("n2") == 1
        assert ranker.stale == 1  # version 2 arrived after 3 and was ignored
        before = ranker.score([{"user": "u1", "city": "1"}], ["n1"])  # features from the topic
        ranker.start()
        send(kafka_conf, params_topic, "n1", record(checkpoint, "n1", 4, 0.9))
        deadline = time.monotonic() + 20
        while ranker.version("n1") != 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ranker.version("n1") == 4
        after = ranker.score([{"user": "u1", "city": "1"}], ["n1"])
        assert not np.allclose(before, after)
        send(kafka_conf, params_topic, "n1", record(checkpoint, "n1", 1, 0.0))  # stale, late
        send(kafka_conf, params_topic, "n2", None)  # tombstone
        deadline = time.monotonic() + 20
        while ranker.version("n2") is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ranker.version("n2") is None and ranker.version("n1") == 4


def test_params_of_another_model_version_are_refused_by_name(
    checkpoint: Checkpoint, kafka_conf: dict[str, str], topics: tuple[str, str]
) -> None:
    params_topic, _ = topics
    send(kafka_conf, params_topic, "n1", record(checkpoint, "n1", 1, 0.1))
    send(kafka_conf, params_topic, "n3", record(checkpoint, "n3", 7, 0.1, mv="feedfacefeedface"))
    with RankerClient(checkpoint, kafka_conf, params_topic) as ranker:
        with pytest.raises(ModelError) as err:
            ranker.catch_up(timeout_s=30)
        assert "feedfacefeedface" in str(err.value)
        assert checkpoint.model_version in str(err.value)
        assert ranker.version("n1") == 1 and ranker.version("n3") is None
        assert ranker.refused == 1
        send(
            kafka_conf, params_topic, "n3", record(checkpoint, "n3", 8, 0.1, mv="feedfacefeedface")
        )
        with pytest.raises(ModelError, match="feedfacefeedface"):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                ranker.poll(timeout_s=0.5)
        assert ranker.version("n3") is None
        # the cold start of an announced-by-argument unknown item still works
        out = ranker.score([{"user": "u1"}], ["n9"], item_features=[FEATS])
        assert out.shape == (1,)
