"""Inputs shared by the stream benchmarks: a checkpoint, a replay log, topics, a broker.

The events are the ml-100k replay (``emerg_stream.stream.replay``: item announcements
right before their first click, test rows left out) when the dataset and a trained
checkpoint are found (``$EMERG_DATA_DIR`` / ``/work/shared/data`` and
``runs/ml-100k/checkpoints/emerg-seed0`` or ``--checkpoint``), else the synthetic world
of the worker tests (``tests/worker_world.py``) scaled up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Producer

from benchmarks.common import REPO_ROOT
from emerg_stream.config import KafkaSettings, TopicSettings, WorkerSettings
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import Interaction, ItemEvent
from emerg_stream.stream.envelope import Inbound
from emerg_stream.stream.topics import ensure_topics, load_topic_specs

DEFAULT_CHECKPOINT = REPO_ROOT / "runs" / "ml-100k" / "checkpoints" / "emerg-seed0"
ITEM, INTER = AvroSerde(ItemEvent), AvroSerde(Interaction)


@dataclass
class Events:
    """Records in send order: ``(kind, key, record, encoded value)``, and their source."""

    source: str
    checkpoint: Path
    records: list[tuple[str, str, Any, bytes]]

    @property
    def n_items(self) -> int:
        return sum(1 for r in self.records if r[0] == "item")

    @property
    def n_interactions(self) -> int:
        return sum(1 for r in self.records if r[0] == "interaction")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=None, help="trained checkpoint dir")
    p.add_argument("--limit", type=int, default=0, help="interactions replayed (0 = all)")
    p.add_argument("--partitions", type=int, default=2, help="input partitions")
    p.add_argument(
        "--broker",
        choices=["embedded", "kafka"],
        default="embedded",
        help="embedded Tansu, or Apache Kafka (KRaft, from the Maven cache; Java 17+)",
    )
    p.add_argument(
        "--guarantee",
        choices=["at_least_once", "exactly_once"],
        default="at_least_once",
        help="the worker's processing_guarantee (exactly_once needs --broker kafka)",
    )


def start_broker(kind: str) -> Any:
    """An unstarted broker context manager of ``kind`` (``.bootstrap`` once entered)."""
    if kind == "kafka":
        from emerg_stream.stream.apache_kafka import ApacheKafka

        return ApacheKafka()
    from emerg_stream.stream.broker import EmbeddedBroker

    return EmbeddedBroker()


def load_events(limit: int | None, checkpoint: Path | None) -> Events:
    """The ml-100k replay (first ``limit`` interactions), or the synthetic world."""
    from emerg_stream.data import load_dataset
    from emerg_stream.errors import EmergError

    ck = checkpoint or DEFAULT_CHECKPOINT
    try:
        log = load_dataset("ml-100k", None) if (ck / "manifest.json").is_file() else None
    except EmergError:
        log = None  # no dataset: the synthetic world
    if log is not None:
        from emerg_stream.meta.checkpoint import load_checkpoint
        from emerg_stream.stream.replay import plan_replay, replay_records

        meta = load_checkpoint(ck).meta
        plan = plan_replay(log, meta.n, meta.k)
        recs = []
        for kind, key, rec in replay_records(plan, limit=limit or None):
            serde: AvroSerde[Any] = ITEM if kind == "item" else INTER
            recs.append((kind, key, rec, serde.encode(rec)))
        return Events("ml-100k replay", ck, recs)
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import worker_world as ww

    world = ww.make_world(n_new=2000, n_old=20)
    ck = ww.build_checkpoint(world, Path(tempfile.mkdtemp(prefix="bench-ck-")) / "tiny")
    first = {r["item_id"]: r for r in world.items}
    recs, seen = [], set()
    for r in world.interactions[: limit or None]:
        if r["item_id"] not in seen:
            seen.add(r["item_id"])
            recs.append(
                ("item", r["item_id"], first[r["item_id"]], ITEM.encode(first[r["item_id"]]))
            )
        recs.append(("interaction", r["item_id"], r, INTER.encode(r)))
    return Events("synthetic world (tests/worker_world.py)", ck, recs)


def fresh_topics(conf: dict[str, str], partitions: int, tag: str = "") -> TopicSettings:
    """A fresh set of pipeline topics (unique names)."""
    u = uuid.uuid4().hex[:8]
    names = TopicSettings(
        items=f"b{tag}-items-{u}",
        interactions=f"b{tag}-inter-{u}",
        item_params=f"b{tag}-params-{u}",
        predictions=f"b{tag}-preds-{u}",
        dead_letter=f"b{tag}-dead-{u}",
        changelog=f"b{tag}-changelog-{u}",
        partitions=partitions,
    )
    ensure_topics(conf, load_topic_specs(None, names))
    return names


def outputs_like(conf: dict[str, str], inputs: TopicSettings, tag: str) -> TopicSettings:
    """Fresh output topics (params, predictions, dead letters, changelog) on ``inputs``."""
    fresh = fresh_topics(conf, inputs.partitions or 1, tag)
    return TopicSettings(
        items=inputs.items,
        interactions=inputs.interactions,
        item_params=fresh.item_params,
        predictions=fresh.predictions,
        dead_letter=fresh.dead_letter,
        changelog=fresh.changelog,
        partitions=inputs.partitions,
    )


def produce_all(
    conf: dict[str, str], topics: TopicSettings, events: Events
) -> tuple[list[Inbound], float]:
    """Produce every record (keyed by item id), flushed; returns them as consumed records
    (with their offsets) in send order, and the seconds it took."""
    p = Producer({**conf, "enable.idempotence": True, "linger.ms": 20})
    out: list[Inbound | None] = [None] * len(events.records)

    def delivered(i: int) -> Any:
        def cb(err: Any, msg: Any) -> None:
            if err is not None:
                raise RuntimeError(str(err))
            out[i] = Inbound(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value())

        return cb

    t0 = time.perf_counter()
    for i, (kind, key, _, value) in enumerate(events.records):
        topic = topics.items if kind == "item" else topics.interactions
        while True:
            try:
                p.produce(topic, value, key.encode(), on_delivery=delivered(i))
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    if p.flush(120):
        raise RuntimeError("records not delivered")
    took = time.perf_counter() - t0
    if any(r is None for r in out):
        raise RuntimeError("missing delivery reports")
    return [r for r in out if r is not None], took


def worker_settings(bootstrap: str, topics: TopicSettings, group: str, **kw: Any) -> WorkerSettings:
    """The worker's default settings on the benchmark broker (fast group joins)."""
    extra = kw.pop("kafka_extra", None) or {}
    return WorkerSettings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap, extra=extra),
        topics=topics,
        group_id=group,
        heartbeat_interval_ms=500,
        **kw,
    )
