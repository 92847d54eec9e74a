"""Fuzzed input through decode + processor (no broker): the loop never raises.

Random bytes, truncated records, wrong schema ids and schema-valid records with absurd
values (NaN, ±inf, negative or far-future times, huge strings, unknown categories, empty
features) are mixed with good records. Every record ends in exactly one counted outcome
(or still waits in the pending buffer), and every dead letter carries the source topic,
partition, offset, key, raw bytes and a known reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import worker_world as ww
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emerg_stream.config import TopicSettings
from emerg_stream.io.avro import AvroSerde, frame
from emerg_stream.io.records import DeadLetter, Interaction, ItemEvent, ItemParams, Prediction
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.stream.dlq import ERROR_KINDS
from emerg_stream.stream.envelope import Inbound
from emerg_stream.stream.processor import WarmupProcessor

TOPICS = TopicSettings()
ITEM, INTER, DEAD = AvroSerde(ItemEvent), AvroSerde(Interaction), AvroSerde(DeadLetter)
PARAMS, PRED = AvroSerde(ItemParams), AvroSerde(Prediction)
P = 2
WORLD = ww.make_world(n_new=3, n_old=1, k=2)


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchWarmupHandler]:
    ck = ww.build_checkpoint(WORLD, tmp_path_factory.mktemp("ck") / "tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchWarmupHandler.from_checkpoint(Path(ck), "cpu")
    torch.set_num_threads(threads)


IDS = st.sampled_from(["n0", "n1", "n2", "o0", "ghost", "", "x" * 5000])
TIMES = st.one_of(
    st.sampled_from([-(2**62), -1, 0, 2**62, 1_700_000_000_000]),
    st.integers(-(2**63), 2**63 - 1),
)
NUMBERS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 9.9e14, -9.9e14, -0.0]),
    st.floats(allow_nan=True),
)
WORDS = st.one_of(st.sampled_from(["drama", "never-seen", "", "y" * 10_000]), st.text(max_size=8))


def _features(names: dict[str, str]) -> st.SearchStrategy[dict[str, Any]]:
    """The three feature maps, each possibly empty, with known and unknown names."""
    keys = st.sampled_from([*names, "unknown_field"])
    return st.fixed_dictionaries(
        {
            "categorical": st.dictionaries(keys, WORDS, max_size=2),
            "multi": st.dictionaries(keys, st.lists(WORDS, max_size=3), max_size=2),
            "numeric": st.dictionaries(keys, NUMBERS, max_size=2),
        }
    )


ITEM_RECS = st.builds(
    lambda i, f, t: {"item_id": i, **f, "event_time": t},
    IDS,
    _features({"genre": "categorical", "tags": "multi", "price": "numeric"}),
    TIMES,
)
INTER_RECS = st.builds(
    lambda e, i, u, f, label, t: {
        "event_id": e,
        "item_id": i,
        "user_id": u,
        **f,
        "label": label,
        "event_time": t,
    },
    st.sampled_from(["e1", "e2", "e3", "e4", "", "z" * 3000]),
    IDS,
    WORDS,
    _features({"city": "categorical", "age": "numeric"}),
    st.one_of(st.sampled_from([0, 1]), st.integers(-(2**31), 2**31 - 1)),
    TIMES,
)


@st.composite
def raw_record(draw: st.DrawFn) -> tuple[str, str, bytes | None]:
    """(topic, key, value bytes) of one input record, good or bad in one of many ways."""
    topic = draw(st.sampled_from([TOPICS.items, TOPICS.interactions]))
    serde = ITEM if topic == TOPICS.items else INTER
    rec = draw(ITEM_RECS if topic == TOPICS.items else INTER_RECS)
    key = rec["item_id"] or "k"
    good = serde.encode(rec)
    how = draw(st.sampled_from(["good", "good", "good", "random", "truncated", "schema", "null"]))
    if how == "random":
        return topic, key, draw(st.binary(max_size=64))
    if how == "truncated":
        return topic, key, good[: draw(st.integers(0, max(0, len(good) - 1)))]
    if how == "schema":
        other = draw(st.sampled_from([0, 1, 424242, 2**32 - 1, ITEM.schema_id, INTER.schema_id]))
        return topic, key, frame(other, good[5:])
    if how == "null":
        return topic, key, None
    return topic, key, good


def _processor(handler: TorchWarmupHandler) -> WarmupProcessor:
    proc = WarmupProcessor(
        handler,
        TOPICS,
        dedupe_window=8,
        pending_max=4,
        pending_max_age_ms=1_000,
        clock=lambda: 1_800_000_000.0,
    )
    for p in range(P):
        proc.assign(p, {}, None)
    return proc


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(records=st.lists(raw_record(), min_size=1, max_size=24), batch=st.integers(1, 8))
def test_every_fuzzed_record_ends_in_exactly_one_outcome(
    handler: TorchWarmupHandler, records: list[tuple[str, str, bytes | None]], batch: int
) -> None:
    proc = _processor(handler)
    offsets: dict[tuple[str, int], int] = {}
    msgs = []
    for i, (topic, key, value) in enumerate(records):
        p = i % P
        off = offsets.get((topic, p), 0)
        offsets[(topic, p)] = off + 1
        msgs.append(Inbound(topic, p, off, key.encode(), value))
    out = []
    for i in range(0, len(msgs), batch):
        produced, _ = proc.process(msgs[i : i + batch])  # never raises
        out += produced
    proc.checkpoint()

    n_items = sum(1 for m in msgs if m.topic == TOPICS.items)
    assert proc.counts.total("items") == n_items
    assert proc.counts.total("interactions") + len(proc.pending) == len(msgs) - n_items

    by_source = {(m.topic, m.partition, m.offset): m for m in msgs}
    dead = [DEAD.decode(o.value) for o in out if o.topic == TOPICS.dead_letter]
    sources = [(d["source_topic"], d["source_partition"], d["source_offset"]) for d in dead]
    assert len(sources) == len(set(sources))  # no record dead-lettered twice
    for d, src in zip(dead, sources, strict=True):
        m = by_source[src]
        assert d["value"] == m.value and d["key"] == m.key
        assert d["error_kind"] in ERROR_KINDS and d["message"]
    # dead-lettered records, plus a copy of each conflicting one (its own outcome)
    counted = sum(
        proc.counts.of(role)[o]
        for role in ("items", "interactions")
        for o in ("dead_lettered", "conflicting_item", "conflicting_event")
    )
    assert len(dead) == counted
    # what passes validation never poisons a model output (no NaN/inf params or scores)
    for o in out:
        if o.topic == TOPICS.item_params:
            p = PARAMS.decode(o.value)
            assert all(math.isfinite(x) for x in [*p["adjacency"], *p["id_embedding"]])
        elif o.topic == TOPICS.predictions:
            assert math.isfinite(PRED.decode(o.value)["score"])
