"""Operator view against a real broker: the lag and prequential-AUC gauges of a running
worker, and ``emerg-stream status`` (group lag per partition, items per phase)."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
import worker_world as ww
from confluent_kafka import Producer
from test_worker import make_topics

from emerg_stream import cli
from emerg_stream.config import KafkaSettings, TopicSettings, WorkerSettings
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import Interaction, ItemEvent, ItemParams
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.stream.reader import read_to_end
from emerg_stream.stream.worker import Worker

pytestmark = pytest.mark.integration

PARTITIONS = 2


@pytest.fixture(scope="module")
def world() -> ww.World:
    return ww.make_world(n_new=12, n_old=2)


@pytest.fixture(scope="module")
def handler(
    world: ww.World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TorchWarmupHandler]:
    ck = ww.build_checkpoint(world, tmp_path_factory.mktemp("ck") / "tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchWarmupHandler.from_checkpoint(ck, "cpu")
    torch.set_num_threads(threads)


def status_json(bootstrap: str, topics: TopicSettings, group: str, monkeypatch, capsys) -> dict:
    for role, name in topics.names().items():
        monkeypatch.setenv(f"EMERG_TOPICS__{role.upper()}", name)
    capsys.readouterr()
    assert cli.main(["status", "--group", group, "--bootstrap", bootstrap, "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_lag_auc_gauges_and_status(
    world, handler, kafka_conf, bootstrap, unique_name, monkeypatch, capsys
):
    topics = make_topics(kafka_conf, unique_name, PARTITIONS)
    group = unique_name("group")
    # linger: several records per batch, where Tansu's ListOffsets answers short
    p = Producer({**kafka_conf, "enable.idempotence": True, "linger.ms": 20})
    item_serde, inter_serde = AvroSerde(ItemEvent), AvroSerde(Interaction)
    for r in world.items:
        p.produce(topics.items, item_serde.encode(r), r["item_id"].encode())
    for r in world.interactions:
        p.produce(topics.interactions, inter_serde.encode(r), r["item_id"].encode())
    assert p.flush(30) == 0
    del p

    before = status_json(bootstrap, topics, group, monkeypatch, capsys)
    assert before["total_lag"] == len(world.items) + len(world.interactions)
    assert before["items"] == 0

    settings = WorkerSettings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        topics=topics,
        group_id=group,
        heartbeat_interval_ms=500,
        batch_timeout_ms=100,
        batch_max_records=32,
        metrics_port=0,
        metrics_host="127.0.0.1",
    )
    worker = Worker(settings, handler)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        n = len(world.interactions)
        deadline = time.monotonic() + 90
        while worker.counts.total("interactions") < n:
            assert time.monotonic() < deadline, "worker did not finish"
            time.sleep(0.05)
        time.sleep(0.5)  # one more (empty) poll updates the lag
        with urllib.request.urlopen(
            f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10
        ) as resp:
            scraped = resp.read().decode()
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive()

    lags = re.findall(
        r'emerg_worker_consumer_lag\{partition="(\d)",topic="([^"]+)"\} (\S+)', scraped
    )
    assert {(int(p), t) for p, t, _ in lags} == {
        (p, t) for p in range(PARTITIONS) for t in (topics.items, topics.interactions)
    }
    assert all(float(v) == 0.0 for *_, v in lags)
    primary = r'\{method="emerg",role="primary"\}'  # the AUC gauges are per method
    auc = re.search(rf"^emerg_worker_prequential_auc{primary} (\S+)$", scraped, re.M)
    assert 0.0 <= float(auc.group(1)) <= 1.0
    window = re.search(rf"^emerg_worker_prequential_window{primary} (\S+)$", scraped, re.M)
    assert float(window.group(1)) == len(world.interactions)  # every interaction is scored once

    after = status_json(bootstrap, topics, group, monkeypatch, capsys)
    assert after["total_lag"] == 0
    serde = AvroSerde(ItemParams)
    latest: dict[str, ItemParams] = {}
    for m in read_to_end(kafka_conf, topics.item_params, timeout_s=60):
        rec = serde.decode(m.value())
        if rec["item_id"] not in latest or rec["version"] > latest[rec["item_id"]]["version"]:
            latest[rec["item_id"]] = rec
    assert after["items"] == len(world.new_ids)
    assert after["phases"] == dict(Counter(r["phase"] for r in latest.values()))
    assert len(after["phases"]) > 1  # items moved past cold start
