"""The worker's batch logic without a broker: real model handler, in-memory records.

Checks the behaviour a downstream user sees: the published params equal the offline
protocol's, every prediction uses the params in force before its interaction
(prequential), every input record gets exactly one outcome, and a checkpoint + restore
(also after a crash between checkpoints) changes nothing.
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import worker_world as ww
from devices import DEVICES

from emerg_stream.config import TopicSettings
from emerg_stream.errors import ModelError
from emerg_stream.io.avro import AvroSerde, frame
from emerg_stream.io.records import DeadLetter, Interaction, ItemEvent, ItemParams, Prediction
from emerg_stream.meta.kernel import library as cpu_kernel
from emerg_stream.meta.warmup import resolve_backend
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.stream.changelog import ChangelogFold
from emerg_stream.stream.envelope import Inbound, Outbound
from emerg_stream.stream.processor import WarmupProcessor

P = 3
TOPICS = TopicSettings()
ITEM = AvroSerde(ItemEvent)
INTER = AvroSerde(Interaction)
PARAMS = AvroSerde(ItemParams)
PRED = AvroSerde(Prediction)
DEAD = AvroSerde(DeadLetter)
PHASES = ["cold", "warm_a", "warm_b", "warm_c", "common", "common", "common"]


@pytest.fixture(scope="module")
def world() -> ww.World:
    return ww.make_world()


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory) -> Path:
    return ww.build_checkpoint(world, tmp_path_factory.mktemp("ck") / "tiny")


@pytest.fixture(scope="module")
def handler(checkpoint) -> Iterator[TorchWarmupHandler]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is several times faster on 2 cores
    yield TorchWarmupHandler.from_checkpoint(checkpoint, "cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def offline(world, checkpoint):
    return ww.offline_phis(world, checkpoint)


def part_of(item_id: str) -> int:
    return zlib.crc32(item_id.encode()) % P


class Log:
    """Input topics in memory: records get partitions (by key) and offsets."""

    def __init__(self) -> None:
        self.msgs: list[Inbound] = []
        self.next: dict[tuple[str, int], int] = defaultdict(int)

    def add(self, topic: str, key: str, value: bytes | None, p: int | None = None) -> Inbound:
        p = part_of(key) if p is None else p
        off = self.next[(topic, p)]
        self.next[(topic, p)] += 1
        msg = Inbound(topic, p, off, key.encode(), value)
        self.msgs.append(msg)
        return msg

    def item(self, rec) -> Inbound:
        return self.add(TOPICS.items, rec["item_id"], ITEM.encode(rec))

    def interaction(self, rec) -> Inbound:
        return self.add(TOPICS.interactions, rec["item_id"], INTER.encode(rec))


def stream_log(world: ww.World, *, items_late: bool = False) -> Log:
    """Items right before their first interaction (or all items after all clicks)."""
    log = Log()
    announced = set()
    items = {r["item_id"]: r for r in world.items}
    for rec in world.interactions:
        if not items_late and rec["item_id"] not in announced:
            announced.add(rec["item_id"])
            log.item(items[rec["item_id"]])
        log.interaction(rec)
    if items_late:
        for rec in world.items:
            log.item(rec)
    return log


def new_processor(handler, **kw) -> WarmupProcessor:
    opts = {"dedupe_window": 100, "pending_max": 1000, "pending_max_age_ms": 10**9}
    opts.update(kw)
    proc = WarmupProcessor(handler, TOPICS, **opts, clock=lambda: 1_800_000_000.0)
    for p in range(P):
        proc.assign(p, {}, None)
    return proc


def run(proc: WarmupProcessor, msgs: list[Inbound], batch: int) -> list[Outbound]:
    out: list[Outbound] = []
    for i in range(0, len(msgs), batch):
        produced, _ = proc.process(msgs[i : i + batch])
        out += produced
    return out


def decoded(out: list[Outbound], topic: str, serde: AvroSerde) -> list[dict]:
    return [serde.decode(o.value) for o in out if o.topic == topic]


def check_params_equal_offline(params: list[dict], offline, world) -> None:
    by_item: dict[str, list[dict]] = defaultdict(list)
    for rec in params:
        by_item[rec["item_id"]].append(rec)
    assert set(by_item) == set(world.new_ids)
    for item_id, recs in by_item.items():
        versions = [r["version"] for r in recs]
        assert versions == list(range(1, len(recs) + 1)), item_id
        n_rows = len(world.rows_of(item_id))
        assert len(recs) == 1 + n_rows // world.k
        for r in recs:
            v = r["version"]
            assert r["phase"] == PHASES[v - 1]
            assert r["support_size"] == (v - 1) * world.k
            ref = offline[item_id][v - 1]
            np.testing.assert_allclose(
                np.asarray(r["adjacency"]), ref["adj"].reshape(-1), atol=1e-5
            )
            np.testing.assert_allclose(np.asarray(r["id_embedding"]), ref["id"], atol=1e-5)


@pytest.mark.parametrize("batch", [1, 7, 40, 10_000])
def test_published_params_equal_the_offline_protocol_for_any_batching(
    world, handler, offline, batch
):
    proc = new_processor(handler)
    out = run(proc, stream_log(world).msgs, batch)
    check_params_equal_offline(decoded(out, TOPICS.item_params, PARAMS), offline, world)


@pytest.mark.slow
def test_compiled_warmup_publishes_the_offline_params(world, checkpoint, offline):
    """``warmup_backend=compile``: the worker's compiled warm-up step gives the offline φ."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compiled = TorchWarmupHandler.from_checkpoint(checkpoint, "cpu", warmup_backend="compile")
        assert compiled.warmup_backend == "compile"
        out = run(new_processor(compiled), stream_log(world).msgs, 40)
    finally:
        torch.set_num_threads(threads)
    check_params_equal_offline(decoded(out, TOPICS.item_params, PARAMS), offline, world)


@pytest.mark.parametrize("device", DEVICES)
def test_the_worker_publishes_the_offline_params_on_every_device(
    world, checkpoint, offline, device
):
    """The worker's handler on the device (φ held there across a batch, host batches
    copied pinned and asynchronously) publishes the host's offline φ."""
    on_device = TorchWarmupHandler.from_checkpoint(checkpoint, device)
    assert on_device.device.type == device
    out = run(new_processor(on_device), stream_log(world).msgs, 40)
    check_params_equal_offline(decoded(out, TOPICS.item_params, PARAMS), offline, world)


def test_the_handler_runs_the_kernel_by_default(handler):
    """The stream's default backend is the CPU kernel wherever it builds (this machine
    has a C++ compiler: the published-params tests above ran it against autograd)."""
    assert handler.warmup_backend == "auto"
    kind, kernel = resolve_backend(handler.model, "auto", torch.float32, torch.device("cpu"))
    if shutil.which(os.environ.get("CXX", "c++")):
        assert kind == "kernel" and kernel is not None
    else:
        assert kind == "autograd"


def test_a_kernel_that_cannot_build_stops_the_handler_or_falls_back(
    checkpoint, monkeypatch, tmp_path
):
    """``warmup_backend=kernel`` without a compiler is a start-up error naming the cause;
    ``auto`` starts on autograd."""
    monkeypatch.setenv("CXX", "no-such-cxx-for-emerg")
    monkeypatch.setenv("EMERG_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_KERNELS", {})
    with pytest.raises(ModelError, match=r"no C\+\+ compiler"):
        TorchWarmupHandler.from_checkpoint(checkpoint, "cpu", warmup_backend="kernel")
    fallback = TorchWarmupHandler.from_checkpoint(checkpoint, "cpu")
    kind, _ = resolve_backend(fallback.model, "auto", torch.float32, torch.device("cpu"))
    assert kind == "autograd"


@pytest.mark.parametrize("batch", [1, 9, 10_000])
def test_every_prediction_uses_the_params_before_its_interaction(world, handler, batch):
    proc = new_processor(handler)
    preds = decoded(run(proc, stream_log(world).msgs, batch), TOPICS.predictions, PRED)
    assert len(preds) == len(world.interactions)
    seen: dict[str, int] = defaultdict(int)
    for p in preds:
        i = seen[p["item_id"]]
        seen[p["item_id"]] += 1
        if p["item_id"] in world.old_ids:
            assert (p["params_version"], p["phase"]) == (0, "old")
        else:
            # the i-th interaction (0-based) sees version 1 + i // K: an update at the
            # K-th row only affects the rows after it
            assert p["params_version"] == 1 + i // world.k
            assert p["phase"] == PHASES[i // world.k]
        assert 0.0 <= p["score"] <= 1.0


def test_prediction_scores_do_not_depend_on_batching(world, handler):
    a = decoded(run(new_processor(handler), stream_log(world).msgs, 1), TOPICS.predictions, PRED)
    b = decoded(run(new_processor(handler), stream_log(world).msgs, 500), TOPICS.predictions, PRED)
    key = lambda p: p["event_id"]  # noqa: E731
    np.testing.assert_allclose(
        [p["score"] for p in sorted(a, key=key)],
        [p["score"] for p in sorted(b, key=key)],
        atol=1e-6,
    )


def test_counts_conserve_and_duplicates_are_dropped(world, handler, offline):
    log = stream_log(world)
    again = world.interactions[::5]  # re-delivered by an at-least-once producer
    for rec in again:
        log.interaction(rec)
    log.item(world.items[0])  # re-announced
    proc = new_processor(handler)
    out = run(proc, log.msgs, 13)
    c = proc.counts
    assert c.items == {
        "applied": len(world.new_ids),
        "duplicate": 1,
        "dead_lettered": 0,
        "ignored_old_item": len(world.old_ids),
        "conflicting_item": 0,
        "conflicting_event": 0,
    }
    n_old_rows = sum(1 for r in world.interactions if r["item_id"] in world.old_ids)
    dup_old = sum(1 for r in again if r["item_id"] in world.old_ids)
    assert c.interactions["ignored_old_item"] == n_old_rows + dup_old
    assert c.interactions["duplicate"] == len(again) - dup_old
    assert c.interactions["applied"] == len(world.interactions) - n_old_rows
    assert c.total("interactions") == len(world.interactions) + len(again)
    assert proc.totals().to_dict() == c.to_dict()
    check_params_equal_offline(decoded(out, TOPICS.item_params, PARAMS), offline, world)


def test_interactions_before_their_item_wait_then_apply_in_order(world, handler, offline):
    proc = new_processor(handler)
    out = run(proc, stream_log(world, items_late=True).msgs, 25)
    assert len(proc.pending) == 0
    assert proc.counts.interactions["dead_lettered"] == 0
    check_params_equal_offline(decoded(out, TOPICS.item_params, PARAMS), offline, world)


def test_pending_buffer_bounds_dead_letter_as_unknown_item(world, handler):
    log = Log()
    orphan = dict(world.interactions[0], item_id="never", event_id="x1", event_time=1000)
    log.interaction(orphan)
    log.interaction(dict(orphan, event_id="x2", event_time=2000))
    log.interaction(dict(orphan, event_id="x3", event_time=3000))
    # count cap 2: the oldest is evicted at once
    proc = new_processor(handler, pending_max=2, pending_max_age_ms=10**9)
    out = run(proc, log.msgs, 10)
    dead = decoded(out, TOPICS.dead_letter, DEAD)
    assert [(d["error_kind"], d["source_offset"]) for d in dead] == [("unknown_item", 0)]
    assert len(proc.pending) == 2
    # a fourth waiting interaction evicts the (now) oldest one
    late = dict(orphan, event_id="x4", event_time=5000)
    out = run(proc, [log.interaction(late)], 10)
    assert [d["source_offset"] for d in decoded(out, TOPICS.dead_letter, DEAD)] == [1]
    # event-time age cap 1500 ms against the partition's *item* stream time: a burst of
    # later interactions does not expire anything (the items side may just lag) ...
    proc2 = new_processor(handler, pending_max=10, pending_max_age_ms=1500)
    assert decoded(run(proc2, log.msgs, 10), TOPICS.dead_letter, DEAD) == []
    # ... an ItemEvent at 5000 in the same partition expires those at 1000..3000
    other = dict(world.items[0], item_id="other", event_time=5000)
    announce = log.add(TOPICS.items, "other", ITEM.encode(other), p=log.msgs[0].partition)
    out = run(proc2, [announce], 10)
    dead = decoded(out, TOPICS.dead_letter, DEAD)
    assert sorted(d["source_offset"] for d in dead) == [0, 1, 2]
    assert all("announced" in d["message"] for d in dead)
    assert proc2.counts.interactions["dead_lettered"] == 3 and len(proc2.pending) == 1
    assert (
        DEAD.decode(next(o for o in out if o.topic == TOPICS.dead_letter).value)["value"]
        == log.msgs[0].value
    )


def test_bad_records_are_dead_lettered_with_their_reason(world, handler):
    log = Log()
    item = dict(world.items[0])
    good = next(r for r in world.interactions if r["item_id"] == item["item_id"])
    log.item(item)
    cases = {
        "decode": log.add(TOPICS.interactions, good["item_id"], b"\x00\x00\x00\x27\x12garbage"),
        "null_value": log.add(TOPICS.interactions, good["item_id"], None),
        "schema_id": log.add(
            TOPICS.interactions, good["item_id"], frame(10003, INTER.encode(good)[5:])
        ),
        "missing_field": log.interaction(dict(good, event_id="")),
        "bad_label": log.interaction(dict(good, event_id="l", label=3)),
        "nonfinite_feature": log.interaction(
            dict(good, event_id="n", numeric={"age": float("nan")})
        ),
        "bad_feature": log.interaction(dict(good, event_id="b", categorical={"age": "old"})),
    }
    bad_item = log.add(
        TOPICS.items, "zz", ITEM.encode(dict(item, item_id="zz", numeric={"price": float("inf")}))
    )
    ok = log.interaction(dict(good, event_id="fine", categorical={"city": "never-seen"}))
    proc = new_processor(handler)
    out = run(proc, log.msgs, 100)
    dead = {
        d["source_offset"]: d
        for d in decoded(out, TOPICS.dead_letter, DEAD)
        if d["source_topic"] == TOPICS.interactions
    }
    for kind, msg in cases.items():
        assert dead[msg.offset]["error_kind"] == kind, (kind, dead[msg.offset]["message"])
        assert dead[msg.offset]["value"] == msg.value and dead[msg.offset]["key"] == msg.key
    item_dead = [
        d for d in decoded(out, TOPICS.dead_letter, DEAD) if d["source_topic"] == TOPICS.items
    ]
    assert [(d["source_offset"], d["error_kind"]) for d in item_dead] == [
        (bad_item.offset, "nonfinite_feature")
    ]
    assert ok.offset not in dead  # an unknown category is not an error
    assert proc.counts.interactions == {
        "applied": 1,
        "duplicate": 0,
        "dead_lettered": len(cases),
        "ignored_old_item": 0,
        "conflicting_item": 0,
        "conflicting_event": 0,
    }
    assert proc.counts.items["dead_lettered"] == 1


def changelog_of(records: list[Outbound], store: dict[int, list[Outbound]]) -> None:
    for r in records:
        assert r.topic == TOPICS.changelog and r.partition is not None
        store[r.partition].append(r)


def restore(
    proc_like_handler, changelog: dict[int, list[Outbound]], **kw
) -> tuple[WarmupProcessor, dict]:
    codec = ItemStateCodec(dedupe_window=100)
    fold = ChangelogFold(list(range(P)), codec)
    for p, recs in changelog.items():
        for r in recs:
            fold.feed(p, r.key, r.value)
    restored = fold.result()
    opts = {"dedupe_window": 100, "pending_max": 1000, "pending_max_age_ms": 10**9}
    opts.update(kw)
    proc = WarmupProcessor(proc_like_handler, TOPICS, **opts, clock=lambda: 1_800_000_000.0)
    starts = {p: proc.assign(p, r.items, r.mark) for p, r in restored.items()}
    return proc, starts


def resume_input(log: Log, starts: dict) -> list[Inbound]:
    role = {TOPICS.items: "items", TOPICS.interactions: "interactions"}
    return [m for m in log.msgs if m.offset >= (starts[m.partition][role[m.topic]] or 0)]


@pytest.mark.parametrize("crash_after", [3, 11])
def test_crash_between_checkpoints_replays_to_the_same_params_and_counts(
    world, handler, offline, crash_after
):
    """Run 1 checkpoints after some batches and dies (its later outputs lost, its last
    checkpoint only half written); run 2 restores and finishes: params equal the offline
    ones, and the partitions' counters count every record exactly once."""
    log = stream_log(world, items_late=True)  # pending interactions at the checkpoints too
    for rec in world.interactions[::7]:
        log.interaction(rec)  # some duplicates
    changelog: dict[int, list[Outbound]] = defaultdict(list)
    proc = new_processor(handler)
    batch = 9
    published: list[Outbound] = []
    for b, i in enumerate(range(0, len(log.msgs), batch)):
        out, _ = proc.process(log.msgs[i : i + batch])
        published += out
        if b < crash_after:
            changelog_of(proc.checkpoint().records, changelog)
        elif b == crash_after:
            half = proc.checkpoint().records
            changelog_of([r for r in half if not r.key.startswith(b"\x00")][:3], changelog)
            break
    proc2, starts = restore(handler, changelog)
    out2 = run(proc2, resume_input(log, starts), batch)
    params = decoded(published + out2, TOPICS.item_params, PARAMS)
    # latest version per item (re-published versions are identical)
    latest: dict[tuple[str, int], dict] = {}
    for r in params:
        latest[(r["item_id"], r["version"])] = r
    check_params_equal_offline(
        sorted(latest.values(), key=lambda r: (r["item_id"], r["version"])), offline, world
    )
    totals = proc2.totals()
    assert totals.total("interactions") == sum(
        1 for m in log.msgs if m.topic == TOPICS.interactions
    )
    assert totals.total("items") == len(world.items)
    assert totals.interactions["duplicate"] == len(world.interactions[::7]) - sum(
        1 for r in world.interactions[::7] if r["item_id"] in world.old_ids
    )


def test_restore_discards_states_after_the_last_mark(world, handler):
    log = stream_log(world)
    proc = new_processor(handler)
    changelog: dict[int, list[Outbound]] = defaultdict(list)
    run(proc, log.msgs[:30], 30)
    changelog_of(proc.checkpoint().records, changelog)
    run(proc, log.msgs[30:60], 30)
    cp = proc.checkpoint()
    items_only = [r for r in cp.records if not r.key.startswith(b"\x00")]
    changelog_of(items_only, changelog)  # crash before the marks
    _, starts = restore(handler, changelog)
    # resume where the first (complete) checkpoint ended; None = never checkpointed
    first: dict[int, dict[str, int | None]] = {
        p: {"items": None, "interactions": None} for p in range(P)
    }
    for m in log.msgs[:30]:
        role = "items" if m.topic == TOPICS.items else "interactions"
        first[m.partition][role] = max(first[m.partition][role] or 0, m.offset + 1)
    assert starts == first


def test_restored_state_of_another_model_is_refused(world, handler):
    proc = new_processor(handler)
    run(proc, stream_log(world).msgs[:20], 20)
    cp = proc.checkpoint()
    mark = next(r for r in cp.records if r.key.startswith(b"\x00"))
    changelog = {
        mark.partition: [
            Outbound(
                mark.topic,
                mark.key,
                mark.value.replace(handler.model_version.encode(), b"0123456789abcdef"),
                mark.partition,
            )
        ]
    }
    from emerg_stream.errors import ModelError

    with pytest.raises(ModelError, match="model version"):
        restore(handler, changelog)
