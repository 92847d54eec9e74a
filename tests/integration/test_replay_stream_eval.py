"""Stream evaluation against a real broker, with params published the way the worker does.

A stand-in publisher writes the offline protocol's φ after each phase as ItemParams
versions 1..4 (phases cold, warm_a, warm_b, warm_c): the stream table must then equal
the offline one exactly (for every registered method: DeepFM and MetaE publish only
their ID embeddings), and the fallback, refusal and prequential paths are checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from confluent_kafka import Producer

from emerg_stream.data.log import InteractionLog
from emerg_stream.data.split import split_log
from emerg_stream.errors import DataError, ModelError
from emerg_stream.features import FeatureSpec
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import ItemParams, Prediction
from emerg_stream.meta.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from emerg_stream.meta.evaluate import PHASES, run_phases
from emerg_stream.meta.pipeline import model_config, prepare
from emerg_stream.meta.warmup import WarmupConfig
from emerg_stream.methods import METHOD_NAMES
from emerg_stream.model import build_model
from emerg_stream.serving.phi import phi_to_arrays
from emerg_stream.serving.stream_eval import comparison_table, evaluate_stream
from emerg_stream.stream.topics import TopicSpec, ensure_topics

pytestmark = pytest.mark.integration


def rows() -> list[tuple[str, str, int, int]]:
    rng = np.random.default_rng(1)
    out = []
    for item, n in [("o1", 14), ("o2", 12), ("n1", 9), ("n2", 8), ("n3", 9), ("n4", 7)]:
        out += [
            (item, f"u{rng.integers(8)}", int(rng.integers(500)), int(rng.integers(2)))
            for _ in range(n)
        ]
    return out


@pytest.fixture
def setup(
    request: pytest.FixtureRequest, make_log: Callable[..., InteractionLog], tmp_path: Path
) -> tuple[InteractionLog, Checkpoint, dict[str, dict[str, torch.Tensor]]]:
    """A checkpoint (EmerG, or the method of an indirect parametrization) and its φ."""
    method = getattr(request, "param", "emerg")
    ilog = make_log(rows(), n=9, k=2, name="tiny")
    split = split_log(ilog)
    spec = FeatureSpec.fit(split.schema, split.old)
    torch.manual_seed(0)
    model = build_model(model_config(method, spec)).eval()
    meta = {
        "dataset": "tiny",
        "noise_salt": 5,
        "warmup": {"steps": 4, "lr": 0.5, "optimizer": "sgd", "betas": [0.9, 0.999], "eps": 1e-8},
        "split": {"n": 9, "k": 2},
        "old_item_ids": ["o1", "o2"],
    }
    save_checkpoint(tmp_path / "ck", model, spec.to_dict(), meta)
    ck = load_checkpoint(tmp_path / "ck")
    data = prepare(split, spec)
    _, phis = run_phases(
        ck.model, data.new, WarmupConfig(steps=4, lr=0.5), salt=5, device=torch.device("cpu")
    )
    by_item = {
        item: {p: {k: v[j] for k, v in phis[p].items()} for p in PHASES}
        for j, item in enumerate(data.new.items.ids)
    }
    return ilog, ck, by_item


def publish(
    conf: dict[str, str],
    topic: str,
    ck: Checkpoint,
    item: str,
    version: int,
    phase: str,
    phi: dict[str, torch.Tensor],
    mv: str | None = None,
) -> None:
    arrays = phi_to_arrays(ck.method, {k: v[None] for k, v in phi.items()})
    rec: ItemParams = {
        "item_id": item,
        "version": version,
        "phase": phase,
        "support_size": 2 * version,
        "model_version": mv or ck.model_version,
        "method": ck.method.name,
        "n_fields": math.isqrt(arrays.adjacency.shape[1]),
        "adjacency": arrays.adjacency[0].tolist(),
        "id_embedding": arrays.id_embedding[0].tolist(),
        "source_offsets": [],
        "produced_time": 0,
    }
    p = Producer(conf)
    p.produce(topic, key=item.encode(), value=AvroSerde(ItemParams).encode(rec))
    p.flush(10)


@pytest.fixture
def params_topic(kafka_conf: dict[str, str], unique_name: Callable[[str], str]) -> str:
    topic = unique_name("params")
    ensure_topics(
        kafka_conf, [TopicSpec("item_params", topic, 3, 1, {"cleanup.policy": "compact"})]
    )
    return topic


@pytest.mark.parametrize("setup", METHOD_NAMES, indirect=True)
def test_stream_table_equals_offline_when_the_stream_published_the_offline_phis(
    setup: tuple[InteractionLog, Checkpoint, dict[str, dict[str, dict[str, torch.Tensor]]]],
    kafka_conf: dict[str, str],
    params_topic: str,
) -> None:
    ilog, ck, by_item = setup
    for item, phases in by_item.items():
        for v, phase in enumerate(PHASES, start=1):
            publish(kafka_conf, params_topic, ck, item, v, phase, phases[phase])
    # a later 'common' version must not change the per-phase table
    item0 = next(iter(by_item))
    publish(kafka_conf, params_topic, ck, item0, 9, "common", by_item[item0]["cold"])
    ev = evaluate_stream(ck, ilog, kafka_conf, params_topic, offline=True, timeout_s=30)
    assert ev.n_items == len(by_item) and not ev.missing_items
    for phase in PHASES:
        assert ev.offline is not None
        assert ev.stream[phase]["auc"] == pytest.approx(ev.offline[phase]["auc"], abs=1e-9)
        assert ev.stream[phase]["f1"] == pytest.approx(ev.offline[phase]["f1"], abs=1e-9)
        assert ev.coverage[phase]["published"] == len(by_item)
    table = comparison_table(ev)
    assert "| stream |" in table and "| offline |" in table and "+0.000" in table


def test_items_that_stopped_early_use_their_latest_earlier_phase(
    setup: tuple[InteractionLog, Checkpoint, dict[str, dict[str, dict[str, torch.Tensor]]]],
    kafka_conf: dict[str, str],
    params_topic: str,
) -> None:
    ilog, ck, by_item = setup
    items = list(by_item)
    for item in items:
        last = 2 if item == items[0] else 4  # the first item stops after warm_a
        for v, phase in enumerate(PHASES[:last], start=1):
            publish(kafka_conf, params_topic, ck, item, v, phase, by_item[item][phase])
    ev = evaluate_stream(ck, ilog, kafka_conf, params_topic, timeout_s=30)
    assert ev.coverage["warm_a"] == {"published": len(items), "earlier": 0, "fallback": 0}
    assert ev.coverage["warm_c"] == {"published": len(items) - 1, "earlier": 1, "fallback": 0}


def test_missing_items_fail_unless_allowed_and_other_model_versions_are_refused(
    setup: tuple[InteractionLog, Checkpoint, dict[str, dict[str, dict[str, torch.Tensor]]]],
    kafka_conf: dict[str, str],
    params_topic: str,
) -> None:
    ilog, ck, by_item = setup
    first = next(iter(by_item))
    publish(kafka_conf, params_topic, ck, first, 1, "cold", by_item[first]["cold"])
    with pytest.raises(DataError, match="have no params"):
        evaluate_stream(ck, ilog, kafka_conf, params_topic, timeout_s=30)
    ev = evaluate_stream(ck, ilog, kafka_conf, params_topic, allow_missing=True, timeout_s=30)
    assert len(ev.missing_items) == len(by_item) - 1
    assert ev.coverage["cold"]["fallback"] == len(by_item) - 1
    publish(kafka_conf, params_topic, ck, first, 2, "warm_a", by_item[first]["warm_a"], mv="0" * 16)
    with pytest.raises(ModelError, match="0000000000000000"):
        evaluate_stream(ck, ilog, kafka_conf, params_topic, allow_missing=True, timeout_s=30)


def test_prequential_auc_deduplicates_event_ids(
    setup: tuple[InteractionLog, Checkpoint, dict[str, dict[str, dict[str, torch.Tensor]]]],
    kafka_conf: dict[str, str],
    params_topic: str,
    unique_name: Callable[[str], str],
) -> None:
    from emerg_stream.serving.stream_eval import prequential_metrics

    topic = unique_name("pred")
    ensure_topics(kafka_conf, [TopicSpec("predictions", topic, 2, 1)])
    serde = AvroSerde(Prediction)
    p = Producer(kafka_conf)
    preds = [
        ("e1", 0.9, 1, "cold"),
        ("e2", 0.2, 0, "cold"),
        ("e3", 0.4, 1, "warm_a"),
        ("e4", 0.6, 0, "warm_a"),
        ("e5", 0.7, 1, "old"),
        ("e1", 0.1, 1, "cold"),
    ]
    for eid, score, label, phase in preds:
        rec: Prediction = {
            "event_id": eid,
            "item_id": "n1",
            "user_id": "u",
            "score": score,
            "label": label,
            "params_version": 1,
            "phase": phase,
            "event_time": 0,
        }
        p.produce(topic, key=b"n1", value=serde.encode(rec))
    p.flush(10)
    m = prequential_metrics(kafka_conf, topic, timeout_s=30)
    assert m["all"]["n"] == 5  # the duplicate e1 is dropped, the first score kept
    assert m["new"]["n"] == 4
    assert m["cold"]["auc"] == 1.0 and m["warm_a"]["auc"] == 0.0
    assert m["all"]["auc"] == pytest.approx(5 / 6)
