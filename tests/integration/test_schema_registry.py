"""The ``EMERG_SCHEMA_REGISTRY_URL`` path against a real registry: Apicurio Registry.

Runs only with ``EMERG_TEST_SCHEMA_REGISTRY=apicurio`` (``make test-registry``; Java 17+
and Maven, the registry built once into ~/.cache/emerg-stream), on whichever broker the
integration run uses. The unit tests (tests/unit/test_avro.py) cover the same client
against an in-memory fake; these check what only a real registry shows: (1) every record
registers under ``<topic>-value`` and values round-trip through ids fetched back from the
registry; (2) an incompatible evolution is refused with a clear line and a compatible one
is accepted and read; (3) the worker end to end with its ids from the registry, which goes
down mid-stream: the worker stops with one clear error, nothing is consumed past it, and
after the registry is back a restarted worker publishes exactly the offline protocol's
params.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
import torch
import worker_world as ww
from confluent_kafka import Producer
from topic_names import fresh_topics

from emerg_stream.config import KafkaSettings, TopicSettings, WorkerSettings
from emerg_stream.errors import SchemaError, TransientError
from emerg_stream.io import records
from emerg_stream.io.avro import AvroSerde, frame, peek_schema_id
from emerg_stream.io.records import DeadLetter, Interaction, ItemEvent, ItemParams, Prediction
from emerg_stream.io.schemas import (
    RECORD_NAMES,
    REGISTRY_TIMEOUT_S,
    REGISTRY_URL_ENV,
    ConfluentRegistryClient,
    ManifestSchemaIds,
    RegistrySchemaIds,
    fingerprint,
    load_schema,
)
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.stream.reader import read_to_end
from emerg_stream.stream.schema_registry_server import APICURIO_VERSION, SchemaRegistryServer
from emerg_stream.stream.worker import Worker


def _wanted() -> bool:
    return os.environ.get("EMERG_TEST_SCHEMA_REGISTRY", "").strip().lower() == "apicurio"


_SKIP = "needs EMERG_TEST_SCHEMA_REGISTRY=apicurio (make test-registry; Java 17+, Maven)"
# skipped before any fixture runs: without the variable no broker, model or JVM starts
pytestmark = [pytest.mark.integration, pytest.mark.skipif(not _wanted(), reason=_SKIP)]
PHASES = ["cold", "warm_a", "warm_b", "warm_c", "common", "common", "common"]


@pytest.fixture(scope="module")
def registry() -> Iterator[SchemaRegistryServer]:
    """One Apicurio Registry (in memory, global compatibility BACKWARD) for the module."""
    with SchemaRegistryServer() as server:
        print(f"\n[registry] Apicurio {APICURIO_VERSION} at {server.url} {server.timings}")
        yield server


@pytest.fixture(scope="module")
def handler(checkpoint: Path) -> Iterator[TorchWarmupHandler]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchWarmupHandler.from_checkpoint(checkpoint, "cpu")
    torch.set_num_threads(threads)


def get_json(url: str) -> Any:
    """GET a registry resource directly (not through our client)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def sample(name: str, world: ww.World) -> dict[str, Any] | None:
    """A valid record of ``name`` to round-trip (None: registration checked only)."""
    if name == "ItemEvent":
        return dict(world.items[0])
    if name == "Interaction":
        return dict(world.interactions[0])
    return None


# -- (1) our schemas in a real registry ----------------------------------------------


def test_every_record_registers_under_its_subject_and_round_trips(registry, world, unique_name):
    for name in RECORD_NAMES:
        topic = unique_name(name.lower())
        writer = AvroSerde(
            getattr(records, name), topic=topic, ids=RegistrySchemaIds(registry_client(registry))
        )
        latest = get_json(f"{registry.url}/subjects/{topic}-value/versions/latest")
        assert latest["id"] == writer.schema_id, name
        assert fingerprint(json.loads(latest["schema"])) == fingerprint(load_schema(name)), name
        # a second process registers the same schema: the same id, no new version
        again = RegistrySchemaIds(registry_client(registry)).writer_id(name, topic)
        assert again == writer.schema_id, name
        assert get_json(f"{registry.url}/subjects/{topic}-value/versions") == [1], name
        value = sample(name, world)
        if value is None:
            continue
        data = writer.encode(value)  # type: ignore[arg-type]
        assert peek_schema_id(data) == writer.schema_id
        # a reader with a cold cache fetches the writer schema by id from the registry
        reader = AvroSerde(
            getattr(records, name), topic=topic, ids=RegistrySchemaIds(registry_client(registry))
        )
        assert reader.decode(data) == value
        # the registry's ids are not the manifest's: read without it, the value is refused
        with pytest.raises(SchemaError, match="unknown schema id"):
            AvroSerde(getattr(records, name), ids=ManifestSchemaIds()).decode(data)


def registry_client(registry: SchemaRegistryServer) -> ConfluentRegistryClient:
    return ConfluentRegistryClient(registry.url)


def test_an_older_writer_decodes_and_an_unknown_id_is_refused(registry, world, unique_name):
    topic = unique_name("inter")
    subject = f"{topic}-value"
    older = load_schema("Interaction")
    older["fields"] = [f for f in older["fields"] if f["name"] != "numeric"]  # an older shape
    client = registry_client(registry)
    old_id = client.register(subject, json.dumps(older))  # version 1, by an older producer
    serde = AvroSerde(Interaction, topic=topic, ids=RegistrySchemaIds(client))
    assert serde.schema_id != old_id  # ours is version 2 (adds a field with a default)
    assert get_json(f"{registry.url}/subjects/{subject}/versions") == [1, 2]
    value = dict(world.interactions[0])
    buf = io.BytesIO()
    old_value = {k: v for k, v in value.items() if k != "numeric"}
    fastavro.schemaless_writer(buf, fastavro.parse_schema(older), old_value)
    reader = AvroSerde(Interaction, topic=topic, ids=RegistrySchemaIds(registry_client(registry)))
    assert reader.decode(frame(old_id, buf.getvalue())) == {**value, "numeric": {}}
    unknown = max(old_id, serde.schema_id) + 10_000
    with pytest.raises(SchemaError, match=rf"schema id {unknown}: schema registry refused \(404\)"):
        reader.decode(frame(unknown, buf.getvalue()))


# -- (2) schema evolution under the registry's compatibility rule -----------------------


def test_incompatible_evolution_is_refused_and_a_compatible_one_is_read(
    registry, world, unique_name
):
    topic = unique_name("inter")
    subject = f"{topic}-value"
    client = registry_client(registry)
    serde = AvroSerde(Interaction, topic=topic, ids=RegistrySchemaIds(client))

    breaking = load_schema("Interaction")
    breaking["fields"].append({"name": "region", "type": "string"})  # no default
    with pytest.raises(SchemaError) as refused:
        client.register(subject, json.dumps(breaking))
    line = str(refused.value)
    print(f"\n[registry] refusal: {line}")
    assert line.startswith(f"register {subject}: schema registry refused (409)")
    assert "region" in line  # the registry names the offending field
    assert "\n" not in line
    assert get_json(f"{registry.url}/subjects/{subject}/versions") == [1]

    evolved = load_schema("Interaction")
    evolved["fields"].append({"name": "region", "type": "string", "default": ""})
    new_id = client.register(subject, json.dumps(evolved))
    assert new_id != serde.schema_id
    assert get_json(f"{registry.url}/subjects/{subject}/versions") == [1, 2]
    # a newer producer's value: our reader fetches its schema and drops the new field
    value = dict(world.interactions[0])
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(evolved), {**value, "region": "eu"})
    reader = AvroSerde(Interaction, topic=topic, ids=RegistrySchemaIds(registry_client(registry)))
    assert reader.decode(frame(new_id, buf.getvalue())) == value


def test_a_frozen_registry_fails_the_call_instead_of_hanging(registry, unique_name):
    topic = unique_name("inter")
    writer = AvroSerde(Interaction, topic=topic, ids=RegistrySchemaIds(registry_client(registry)))
    reader = RegistrySchemaIds(registry_client(registry))  # a cold cache: it must ask
    registry.pause()  # SIGSTOP: the port accepts connections, nothing answers
    try:
        t0 = time.monotonic()
        with pytest.raises(TransientError, match=f"schema id {writer.schema_id}: schema registry"):
            reader.writer_schema(writer.schema_id)
        took = time.monotonic() - t0
    finally:
        registry.resume()
    print(f"\n[registry] a frozen registry failed the call after {took:.1f}s")
    # 4 tries (the client's 3 retries) of REGISTRY_TIMEOUT_S each, plus its backoff
    assert took < 4 * REGISTRY_TIMEOUT_S + 10
    assert reader.writer_schema(writer.schema_id).record == "Interaction"  # thawed: answers


# -- (3) the worker through the registry, which goes down mid-stream ---------------------


def make_topics(kafka_conf: dict[str, str], unique_name: Callable[[str], str]) -> TopicSettings:
    return fresh_topics(kafka_conf, unique_name, 2)


def produce(kafka_conf: dict[str, str], topic: str, values: list[tuple[str, bytes]]) -> None:
    p = Producer({**kafka_conf, "enable.idempotence": True, "linger.ms": 5})
    for key, value in values:
        p.produce(topic, value, key.encode())
    assert p.flush(30) == 0


class WorkerThread:
    """A :class:`Worker` run in a thread; keeps the exception it ended with."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # kept for the test to inspect
            self.error = exc

    def wait(self, cond: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if not self.thread.is_alive():
                raise AssertionError(f"worker ended ({self.error!r}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "worker did not stop"


def test_worker_through_the_registry_loses_nothing_when_it_goes_down(
    world, handler, offline, kafka_conf, bootstrap, unique_name, monkeypatch, tmp_path
):
    # its own registry, in an H2 file, so that a restart keeps every schema and id
    server = SchemaRegistryServer(data_dir=tmp_path / "registry").start()
    try:
        url = server.url
        monkeypatch.setenv(REGISTRY_URL_ENV, url)
        topics = make_topics(kafka_conf, unique_name)
        settings = WorkerSettings(
            kafka=KafkaSettings(bootstrap_servers=bootstrap),
            topics=topics,
            group_id=unique_name("group"),
            heartbeat_interval_ms=500,
            batch_timeout_ms=100,
            batch_max_records=64,
        )
        items = AvroSerde(ItemEvent, topic=topics.items)  # registry ids, from the variable
        # Another producer registered the same Interaction schema written out otherwise
        # (indented JSON): the registry gives that text an id of its own, one the worker
        # never registered itself and has to fetch when it first reads it.
        client = registry_client(server)
        foreign_text = json.dumps(load_schema("Interaction"), indent=2)
        foreign_id = client.register(f"{topics.interactions}-value", foreign_text)
        parsed = fastavro.parse_schema(json.loads(foreign_text))

        def foreign(r: Interaction) -> bytes:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, parsed, dict(r))
            return frame(foreign_id, buf.getvalue())

        produce(kafka_conf, topics.items, [(r["item_id"], items.encode(r)) for r in world.items])
        first = WorkerThread(Worker(settings, handler))
        # the worker's own id for the schema (its decoder registered it) is another one
        own_id = RegistrySchemaIds(registry_client(server)).writer_id(
            "Interaction", topics.interactions
        )
        assert own_id != foreign_id
        first.wait(lambda: first.worker.counts.total("items") == len(world.items), 90, "items")

        server.stop()  # the registry goes down while the worker runs
        inter = [(r["item_id"], foreign(r)) for r in world.interactions]
        produce(kafka_conf, topics.interactions, inter)
        first.thread.join(90)
        assert not first.thread.is_alive(), "the worker kept going without its registry"
        err = first.error
        assert isinstance(err, TransientError), repr(err)
        print(f"\n[registry] the worker stopped with: {err}")
        assert f"schema id {foreign_id}: schema registry unavailable" in str(err)
        assert first.worker.counts.total("interactions") == 0

        server.start()  # back, on the same port, with the same schemas
        assert server.url == url
        second = WorkerThread(Worker(settings, handler))
        try:
            n = len(world.interactions)
            second.wait(lambda: second.worker.counts.total("interactions") == n, 120, "clicks")
        finally:
            second.stop()
        assert second.error is None, repr(second.error)
        c = second.worker.counts
        assert c.interactions["dead_lettered"] == 0

        def read(topic: str, serde: AvroSerde[Any]) -> list[tuple[int, Any]]:
            out = []
            for m in read_to_end(kafka_conf, topic, timeout_s=60):
                out.append((peek_schema_id(m.value()), serde.decode(m.value())))
            return out

        params = read(topics.item_params, AvroSerde(ItemParams, topic=topics.item_params))
        preds = read(topics.predictions, AvroSerde(Prediction, topic=topics.predictions))
        assert read(topics.dead_letter, AvroSerde(DeadLetter, topic=topics.dead_letter)) == []
        # every click scored once or more (at-least-once), none missing
        assert {p["event_id"] for _, p in preds} == {r["event_id"] for r in world.interactions}
        check_params([p for _, p in params], offline, world)
        # the outputs are framed with ids the registry holds, under the outputs' subjects
        for topic, ids in ((topics.item_params, params), (topics.predictions, preds)):
            latest = get_json(f"{url}/subjects/{topic}-value/versions/latest")
            assert {i for i, _ in ids} == {latest["id"]}
    finally:
        server.stop()


def check_params(
    params: list[dict[str, Any]], offline: dict[str, list[dict[str, np.ndarray]]], world: ww.World
) -> None:
    """Every (item, version) equals the offline φ (a re-publication is identical)."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for r in params:
        key = (r["item_id"], r["version"])
        if key in seen:
            np.testing.assert_allclose(r["adjacency"], seen[key]["adjacency"], atol=1e-5)
        seen[key] = r
    expected = {(i, v + 1) for i, phis in offline.items() for v in range(len(phis))}
    assert set(seen) == expected
    for (item_id, version), r in seen.items():
        ref = offline[item_id][version - 1]
        assert r["phase"] == PHASES[version - 1]
        np.testing.assert_allclose(np.asarray(r["adjacency"]), ref["adj"].reshape(-1), atol=1e-5)
        np.testing.assert_allclose(np.asarray(r["id_embedding"]), ref["id"], atol=1e-5)
