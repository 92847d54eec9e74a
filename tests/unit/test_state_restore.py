"""Lazy restore through the worker's batch logic (no broker): restored items stay raw
until a record touches them, the results equal those of a processor that never
stopped, a changelog written in ItemState version 1 restores the same, and a restored
item of another model shape is refused when it is first used."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import fastavro
import numpy as np
import pytest
import torch
import worker_world as ww

from emerg_stream.config import TopicSettings
from emerg_stream.errors import ModelError
from emerg_stream.io.avro import AvroSerde, frame
from emerg_stream.io.records import Interaction, ItemEvent, ItemParams, Prediction
from emerg_stream.io.schemas import load_manifest, load_schema
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.state.dedupe import event_hash
from emerg_stream.stream.changelog import ChangelogFold, Restored
from emerg_stream.stream.checkpointing import MARK_KEY
from emerg_stream.stream.envelope import Inbound, Outbound
from emerg_stream.stream.processor import WarmupProcessor

TOPICS = TopicSettings()
ITEM, INTER = AvroSerde(ItemEvent), AvroSerde(Interaction)
PARAMS, PRED = AvroSerde(ItemParams), AvroSerde(Prediction)
WINDOW = 100


@pytest.fixture(scope="module")
def world() -> ww.World:
    return ww.make_world(n_new=6, n_old=1)


@pytest.fixture(scope="module")
def handler(world, tmp_path_factory) -> Iterator[TorchWarmupHandler]:
    ck = ww.build_checkpoint(world, tmp_path_factory.mktemp("ck") / "tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchWarmupHandler.from_checkpoint(Path(ck), "cpu")
    torch.set_num_threads(threads)


def processor(
    handler: TorchWarmupHandler, shadow: TorchWarmupHandler | None = None
) -> WarmupProcessor:
    return WarmupProcessor(
        handler,
        TOPICS,
        dedupe_window=WINDOW,
        pending_max=1000,
        pending_max_age_ms=10**9,
        clock=lambda: 1_800_000_000.0,
        shadow=shadow,
    )


def inputs(world: ww.World) -> list[Inbound]:
    """Every item then its clicks, all on partition 0, offsets in order."""
    out: list[Inbound] = []
    offsets: dict[str, int] = defaultdict(int)
    items = {r["item_id"]: r for r in world.items}
    announced: set[str] = set()
    for rec in world.interactions:
        if rec["item_id"] not in announced:
            announced.add(rec["item_id"])
            out.append(
                Inbound(
                    TOPICS.items,
                    0,
                    offsets["i"],
                    rec["item_id"].encode(),
                    ITEM.encode(items[rec["item_id"]]),
                )
            )
            offsets["i"] += 1
        out.append(
            Inbound(
                TOPICS.interactions, 0, offsets["c"], rec["item_id"].encode(), INTER.encode(rec)
            )
        )
        offsets["c"] += 1
    return out


def fold(records: list[Outbound], codec: ItemStateCodec) -> Restored:
    f = ChangelogFold([0], codec)
    for r in records:
        f.feed(0, r.key, r.value)
    return f.result()[0]


def as_version_1(value: bytes, event_ids: list[str], codec: ItemStateCodec) -> bytes:
    """``value`` rewritten as emerg-stream wrote it before version 2 (ids as strings)."""
    rec = dict(codec.serde.decode(value))
    remembered = set(np.frombuffer(rec.pop("recent_event_hashes"), dtype="<u8").tolist())
    rec["recent_event_ids"] = [i for i in event_ids if event_hash(i) in remembered]
    schema = json.loads(json.dumps(load_schema("ItemState", 1)).replace("timestamp-millis", "x"))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema, named_schemas={}), rec)
    return frame(load_manifest().records["ItemState"].versions[1].schema_id, buf.getvalue())


def outputs(out: list[Outbound]) -> tuple[list[dict], list[dict]]:
    params = [PARAMS.decode(o.value) for o in out if o.topic == TOPICS.item_params]
    preds = [PRED.decode(o.value) for o in out if o.topic == TOPICS.predictions]
    return params, preds


@pytest.mark.parametrize("old_format", [False, True], ids=["current", "version-1"])
def test_restored_items_stay_raw_until_touched_and_continue_exactly(world, handler, old_format):
    msgs = inputs(world)
    cut = next(j for j, m in enumerate(msgs) if m.topic == TOPICS.interactions and m.offset == 40)
    first, rest = msgs[:cut], msgs[cut:]
    ref = processor(handler)
    ref.assign(0, {}, None)
    ref.process(first)
    changelog = ref.checkpoint().records
    codec = ItemStateCodec(dedupe_window=WINDOW)
    if old_format:
        ids = [r["event_id"] for r in world.interactions]
        changelog = [
            r
            if r.key == MARK_KEY
            else Outbound(r.topic, r.key, as_version_1(r.value, ids, codec), r.partition)
            for r in changelog
        ]
    restored = fold(changelog, codec)
    n_items = len(restored.items)
    assert n_items == len({m.key for m in first if m.topic == TOPICS.items})

    proc = processor(handler)
    starts = proc.assign(0, restored.items, restored.mark)
    part = proc.store.partition(0)
    assert part.items.n_raw == n_items  # nothing decoded by restore or assign
    touched = {m.key.decode() for m in rest[:5] if m.topic == TOPICS.interactions}
    assert starts["interactions"] == 40

    expect, _ = ref.process(rest[:5])
    got, _ = proc.process(rest[:5])
    assert part.items.n_raw == n_items - len(touched & set(part.items))
    assert outputs(got) == outputs(expect)
    # a click applied before the checkpoint, delivered again: remembered, a duplicate
    dup = next(m for m in first if m.topic == TOPICS.interactions and m.key.decode() in touched)
    again = Inbound(dup.topic, 0, 10_000, dup.key, dup.value)
    _, s = proc.process([again])
    assert s.counts.interactions["duplicate"] == 1
    _, s = ref.process([again])
    assert s.counts.interactions["duplicate"] == 1

    expect, _ = ref.process(rest[5:])
    got, _ = proc.process(rest[5:])
    assert outputs(got) == outputs(expect)

    # the next checkpoint writes the same item states (a version-1 state knew no content
    # digests: those of its remembered ids stay unknown, the rest is the same)
    def states(p: WarmupProcessor) -> list[tuple[bytes | None, dict[str, object]]]:
        out = []
        for r in p.checkpoint().records:
            if r.key != MARK_KEY and r.value is not None:
                rec = dict(codec.serde.decode(r.value))
                if old_format:
                    rec.pop("recent_content_hashes")
                out.append((r.key, rec))
        return out

    mine, theirs = states(proc), states(ref)
    assert mine and mine == theirs


def test_a_restored_item_of_another_shape_is_refused_when_first_used(world, handler):
    codec = ItemStateCodec(dedupe_window=WINDOW)
    msgs = inputs(world)
    ref = processor(handler)
    ref.assign(0, {}, None)
    first_item = next(m for m in msgs if m.topic == TOPICS.items)
    ref.process([first_item])
    changelog = ref.checkpoint().records
    item_id = first_item.key.decode()
    bad = []
    for r in changelog:
        if r.key == first_item.key:
            task = codec.decode(r.value)
            task.set_params(np.zeros(4), np.zeros(3))  # F=2, D=3: not this model's
            r = Outbound(r.topic, r.key, codec.encode(task), r.partition)
        bad.append(r)
    restored = fold(bad, codec)
    proc = processor(handler)
    proc.assign(0, restored.items, restored.mark)  # lazy: not refused yet
    click = next(m for m in msgs if m.topic == TOPICS.interactions and m.key.decode() == item_id)
    with pytest.raises(ModelError, match="another shape"):
        proc.process([click])
