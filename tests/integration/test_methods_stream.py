"""Every registered method runs in the stream as EmerG does (real embedded broker).

Per method (the tiny world of ``tests/worker_world.py``, an untrained checkpoint of that
method): the worker, stopped halfway and restarted from its changelog, publishes exactly
the offline protocol's φ (version by version, the same tolerance as EmerG's end-to-end
test), marked with the method and carrying only the method's φ slots; the ranker client
reading the params topic scores as the model does with the offline φ (1e-6); a
checkpoint of an unregistered method stops the worker's handler in one line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import worker_world as ww
from confluent_kafka import Producer
from topic_names import fresh_topics

from emerg_stream.config import KafkaSettings, TopicSettings, WorkerSettings
from emerg_stream.features import encode_records, to_torch
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import Interaction, ItemEvent, ItemParams
from emerg_stream.meta.checkpoint import load_checkpoint
from emerg_stream.methods import METHOD_NAMES, get_method
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.serving.ranker import RankerClient, flat_features
from emerg_stream.stream.reader import read_to_end
from emerg_stream.stream.worker import Worker

pytestmark = pytest.mark.integration

ITEM, INTER, PARAMS = AvroSerde(ItemEvent), AvroSerde(Interaction), AvroSerde(ItemParams)
PHASES = ["cold", "warm_a", "warm_b", "warm_c", "common", "common", "common"]


@pytest.fixture(scope="module", params=METHOD_NAMES)
def method_case(
    request: pytest.FixtureRequest, world: ww.World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, dict[str, list[dict[str, np.ndarray]]]]]:
    method = str(request.param)
    path = ww.build_checkpoint(world, tmp_path_factory.mktemp(method) / "ck", method=method)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is several times faster on 2 cores
    yield method, path, ww.offline_phis(world, path)
    torch.set_num_threads(threads)


def _topics(kafka_conf: dict[str, str], unique_name: Callable[[str], str]) -> TopicSettings:
    return fresh_topics(kafka_conf, unique_name, 2)


def _produce(kafka_conf: dict[str, str], records: list[tuple[str, str, bytes]]) -> None:
    p = Producer({**kafka_conf, "enable.idempotence": True, "linger.ms": 5})
    for topic, key, value in records:
        p.produce(topic, value, key.encode())
    assert p.flush(30) == 0


def _run_until(worker: Worker, n_interactions: int, timeout_s: float = 90.0) -> None:
    thread = threading.Thread(target=worker.run)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while worker.counts.total("interactions") < n_interactions:
            assert thread.is_alive(), "the worker stopped"
            assert time.monotonic() < deadline, "timed out waiting for the worker"
            time.sleep(0.05)
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive(), "worker did not stop"


def run_in_two_halves(
    world: ww.World,
    kafka_conf: dict[str, str],
    bootstrap: str,
    unique_name: Callable[[str], str],
    make_worker: Callable[[WorkerSettings], Worker],
) -> tuple[TopicSettings, Worker]:
    """The world's items and first half of its clicks through one worker, the second half
    through a fresh one that restores from the changelog; returns the topics and it."""
    topics = _topics(kafka_conf, unique_name)
    half = len(world.interactions) // 2
    first, rest = world.interactions[:half], world.interactions[half:]
    _produce(kafka_conf, [(topics.items, r["item_id"], ITEM.encode(r)) for r in world.items])
    _produce(kafka_conf, [(topics.interactions, r["item_id"], INTER.encode(r)) for r in first])
    settings = WorkerSettings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        topics=topics,
        group_id=unique_name("group"),
        heartbeat_interval_ms=500,
        batch_timeout_ms=100,
        batch_max_records=16,
    )
    _run_until(make_worker(settings), half)
    _produce(kafka_conf, [(topics.interactions, r["item_id"], INTER.encode(r)) for r in rest])
    again = make_worker(settings)
    _run_until(again, len(rest))
    return topics, again


def test_the_worker_restarted_from_its_changelog_publishes_the_offline_params(
    method_case: tuple[str, Path, dict[str, list[dict[str, np.ndarray]]]],
    world: ww.World,
    kafka_conf: dict[str, str],
    bootstrap: str,
    unique_name: Callable[[str], str],
) -> None:
    method, path, offline = method_case
    topics, again = run_in_two_halves(
        world,
        kafka_conf,
        bootstrap,
        unique_name,
        lambda settings: Worker(settings, TorchWarmupHandler.from_checkpoint(path, "cpu")),
    )
    assert again.restored_items > 0  # the second half warmed up φ restored from the changelog

    params = [
        PARAMS.decode(m.value()) for m in read_to_end(kafka_conf, topics.item_params, timeout_s=60)
    ]
    has_graph = get_method(method).has_graph
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for r in params:
        assert r["method"] == method
        assert (r["n_fields"] > 0) == has_graph
        latest[(r["item_id"], r["version"])] = r
    expected = {(i, v + 1) for i, phis in offline.items() for v in range(len(phis))}
    assert set(latest) == expected
    worst = 0.0
    for (item_id, version), r in latest.items():
        ref = offline[item_id][version - 1]
        assert r["phase"] == PHASES[version - 1]
        adj = ref.get("adj")
        want_adj = np.zeros(0) if adj is None else adj.reshape(-1)
        assert len(r["adjacency"]) == want_adj.size
        worst = max(
            worst,
            float(np.abs(np.asarray(r["adjacency"]) - want_adj).max(initial=0.0)),
            float(np.abs(np.asarray(r["id_embedding"]) - ref["id"]).max()),
        )
    assert worst <= 1e-5, worst
    assert any(len(v) > 1 for v in offline.values())  # warm-up phases ran, not only cold

    # the ranker reads this method's params and scores with them as the model does
    ck = load_checkpoint(path)
    with RankerClient(ck, kafka_conf, topics.item_params, items_topic=topics.items) as ranker:
        ranker.catch_up(timeout_s=30)
        rows = [r for r in world.interactions if r["item_id"] in world.new_ids][:40]
        users = [{**flat_features(r), "user": r["user_id"]} for r in rows]
        got = ranker.score(users, [r["item_id"] for r in rows])
    items = {r["item_id"]: r for r in world.items}
    spec = ck.meta.spec
    flat = [
        {**flat_features(items[r["item_id"]]), **u, "item": r["item_id"]}
        for r, u in zip(rows, users, strict=True)
    ]
    enc = to_torch(encode_records(spec, flat))
    phi = {
        k: torch.from_numpy(np.stack([offline[r["item_id"]][-1][k] for r in rows]))
        for k in ck.model.phi_names
    }
    with torch.no_grad():
        want = torch.sigmoid(ck.model(enc.tokens, enc.weights, phi)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_an_unregistered_method_stops_the_handler_in_one_line(
    world: ww.World, tmp_path: Path
) -> None:
    import hashlib
    import json

    from emerg_stream.errors import ModelError

    path = ww.build_checkpoint(world, tmp_path / "ck", method="deepfm")
    payload = torch.load(path / "model.pt", weights_only=True)
    payload["config"]["kind"] = "mwuf"
    torch.save(payload, path / "model.pt")
    sha = hashlib.sha256((path / "model.pt").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps({"files": {"model.pt": sha}}))
    with pytest.raises(ModelError, match=r"unknown method 'mwuf'; this build knows") as err:
        TorchWarmupHandler.from_checkpoint(path, "cpu")
    assert "\n" not in str(err.value)
