"""The warm-up worker against a real broker (embedded Tansu unless EMERG_TEST_BOOTSTRAP).

(1) end to end in a thread: published params equal the offline protocol; (2) bad records
land in the dead-letter topic with their reason while the worker keeps going; (3) a
``kill -9`` mid-stream and a restart change nothing and count every record once; (4) two
worker processes with a rebalance mid-stream publish the same params as one.

Every test uses fresh topics and a fresh group; the checkpoint is a tiny untrained
EmerG model built once per module (``tests/worker_world.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
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
from emerg_stream.io.avro import AvroSerde, frame
from emerg_stream.io.records import DeadLetter, Interaction, ItemEvent, ItemParams, Prediction
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.stream.changelog import ChangelogFold
from emerg_stream.stream.commit import CommitPipeline
from emerg_stream.stream.reader import read_to_end
from emerg_stream.stream.topics import ensure_topics, load_topic_specs
from emerg_stream.stream.worker import Worker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 4
ITEM, INTER = AvroSerde(ItemEvent), AvroSerde(Interaction)
PARAMS, PRED, DEAD = AvroSerde(ItemParams), AvroSerde(Prediction), AvroSerde(DeadLetter)
PHASES = ["cold", "warm_a", "warm_b", "warm_c", "common", "common", "common"]


# -- fixtures and helpers -----------------------------------------------------------


@pytest.fixture(scope="module")
def handler(checkpoint: Path) -> Iterator[TorchWarmupHandler]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchWarmupHandler.from_checkpoint(checkpoint, "cpu")
    torch.set_num_threads(threads)


def make_topics(
    kafka_conf: dict[str, str],
    unique_name: Callable[[str], str],
    partitions: int = PARTITIONS,
) -> TopicSettings:
    """Fresh input, output and changelog topics (``partitions`` each) on the test broker."""
    return fresh_topics(kafka_conf, unique_name, partitions)


@pytest.fixture
def topics(kafka_conf: dict[str, str], unique_name: Callable[[str], str]) -> TopicSettings:
    return make_topics(kafka_conf, unique_name)


def settings_for(bootstrap: str, topics: TopicSettings, group: str, **kw: Any) -> WorkerSettings:
    return WorkerSettings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        topics=topics,
        group_id=group,
        heartbeat_interval_ms=500,
        batch_timeout_ms=100,
        **kw,
    )


def produce(
    kafka_conf: dict[str, str], records: list[tuple[str, str, bytes | None]], partition: int = -1
) -> None:
    """(topic, key, value) in order; keyed, so an item's records share a partition number
    (or all go to ``partition``)."""
    p = Producer({**kafka_conf, "enable.idempotence": True, "linger.ms": 5})
    for topic, key, value in records:
        p.produce(topic, value, key.encode(), partition)
    assert p.flush(30) == 0


def input_records(
    world: ww.World, topics: TopicSettings, interactions: list[Interaction] | None = None
) -> list[tuple[str, str, bytes | None]]:
    out = [(topics.items, r["item_id"], ITEM.encode(r)) for r in world.items]
    rows = world.interactions if interactions is None else interactions
    out += [(topics.interactions, r["item_id"], INTER.encode(r)) for r in rows]
    return out


def read_values(kafka_conf: dict[str, str], topic: str, serde: AvroSerde[Any]) -> list[Any]:
    return [serde.decode(m.value()) for m in read_to_end(kafka_conf, topic, timeout_s=60)]


def latest_marks(kafka_conf: dict[str, str], topics: TopicSettings) -> ChangelogFold:
    fold = ChangelogFold(list(range(PARTITIONS)), ItemStateCodec(dedupe_window=1000))
    for m in read_to_end(kafka_conf, topics.changelog, timeout_s=60):
        fold.feed(m.partition(), m.key(), m.value())
    fold.result()
    return fold


def mark_totals(fold: ChangelogFold) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = {
        "items": defaultdict(int),
        "interactions": defaultdict(int),
    }
    for r in fold.out.values():
        if r.mark is not None:
            for role in totals:
                for k, v in r.mark.counts.of(role).items():
                    totals[role][k] += v
    return {role: dict(v) for role, v in totals.items()}


def check_params(
    params: list[dict[str, Any]], offline: dict[str, list[dict[str, np.ndarray]]], world: ww.World
) -> int:
    """Every (item, version) equals the offline φ; the same version published twice is the
    same; returns how many distinct (item, version) pairs there are."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for r in params:
        key = (r["item_id"], r["version"])
        if key in seen:  # re-published after a restart or rebalance: identical
            np.testing.assert_allclose(r["adjacency"], seen[key]["adjacency"], atol=1e-5)
            np.testing.assert_allclose(r["id_embedding"], seen[key]["id_embedding"], atol=1e-5)
        seen[key] = r
    expected = {(i, v + 1) for i, phis in offline.items() for v in range(len(phis))}
    assert set(seen) == expected
    worst = 0.0
    for (item_id, version), r in seen.items():
        ref = offline[item_id][version - 1]
        assert r["phase"] == PHASES[version - 1]
        assert r["support_size"] == (version - 1) * world.k
        worst = max(
            worst,
            float(np.abs(np.asarray(r["adjacency"]) - ref["adj"].reshape(-1)).max()),
            float(np.abs(np.asarray(r["id_embedding"]) - ref["id"]).max()),
        )
    assert worst <= 1e-5, worst
    return len(seen)


def worker_proc(
    checkpoint: Path,
    bootstrap: str,
    topics: TopicSettings,
    group: str,
    stats: Path,
    log: Path,
    env_extra: dict[str, str] | None = None,
    args: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """The worker job as a subprocess (batches of 8), with extra environment and options."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMERG_")}
    for role, name in topics.names().items():
        env[f"EMERG_TOPICS__{role.upper()}"] = name
    env.update(
        {
            "EMERG_BATCH_MAX_RECORDS": "8",
            "EMERG_BATCH_TIMEOUT_MS": "100",
            "EMERG_HEARTBEAT_INTERVAL_MS": "500",
            "PYTHONPATH": str(ROOT),
            **(env_extra or {}),
        }
    )
    cmd = [sys.executable, "-m", "emerg_stream.cli", "--log-json", "worker"]
    cmd += ["--checkpoint", str(checkpoint), "--bootstrap", bootstrap, "--group", group]
    cmd += ["--device", "cpu", "--stats-file", str(stats), *(args or [])]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def read_stats(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str, *procs: Any) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"worker exited ({p.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert code == 0, log.read_text()[-3000:]


# -- (1) end to end -----------------------------------------------------------------


def test_end_to_end_params_equal_the_offline_protocol(
    world, checkpoint, handler, offline, kafka_conf, bootstrap, topics, unique_name
):
    dupes = world.interactions[::6]
    produce(kafka_conf, input_records(world, topics, world.interactions + dupes))
    settings = settings_for(
        bootstrap, topics, unique_name("group"), batch_max_records=64, metrics_port=0
    )
    worker = Worker(settings, handler)
    t0 = time.monotonic()
    thread = threading.Thread(target=worker.run)
    thread.start()
    total_in = len(world.interactions) + len(dupes)
    try:
        wait_for(lambda: worker.counts.total("interactions") == total_in, 90, "the worker")
        took = time.monotonic() - t0
        assert worker.metrics_port is not None
        url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            scraped = resp.read().decode()
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive(), "worker did not stop"

    n_versions = check_params(read_values(kafka_conf, topics.item_params, PARAMS), offline, world)
    preds = read_values(kafka_conf, topics.predictions, PRED)
    n_old = sum(1 for r in world.interactions if r["item_id"] in world.old_ids)
    dup_old = sum(1 for r in dupes if r["item_id"] in world.old_ids)
    assert len({p["event_id"] for p in preds}) == len(world.interactions)
    assert read_values(kafka_conf, topics.dead_letter, DEAD) == []
    c = worker.counts
    assert c.interactions == {
        "applied": len(world.interactions) - n_old,
        "duplicate": len(dupes) - dup_old,
        "dead_lettered": 0,
        "ignored_old_item": n_old + dup_old,
        "conflicting_item": 0,
        "conflicting_event": 0,
    }
    assert c.items == {
        "applied": len(world.new_ids),
        "duplicate": 0,
        "dead_lettered": 0,
        "ignored_old_item": len(world.old_ids),
        "conflicting_item": 0,
        "conflicting_event": 0,
    }
    assert mark_totals(latest_marks(kafka_conf, topics)) == c.to_dict()
    applied = c.interactions["applied"]
    assert f'emerg_worker_records_total{{outcome="applied",topic="interactions"}} {applied}.0' in (
        scraped
    )
    n_cold = len(world.new_ids)
    assert f'emerg_worker_params_published_total{{phase="cold"}} {n_cold}.0' in scraped
    assert "emerg_worker_checkpoint_seconds_count" in scraped
    print(
        f"\n[e2e] {total_in} interactions, {n_versions} params versions, {worker.batches} "
        f"batches, {worker.checkpoints} checkpoints, {took:.1f}s from start (group join incl.)"
    )


def test_each_batch_is_checkpointed_in_order_and_committed_only_when_durable(
    world, handler, kafka_conf, bootstrap, topics, unique_name
):
    """The pipelined checkpoint keeps the at-least-once order for every batch.

    Batch n's changelog is produced only after a flush that followed n's outputs, its
    offsets are committed only after a flush that followed its changelog, and every
    batch's checkpoint is committed by the time the worker stops.
    """
    produce(kafka_conf, input_records(world, topics))
    settings = settings_for(bootstrap, topics, unique_name("group"), batch_max_records=16)
    worker = Worker(settings, handler)
    events: list[tuple[str, int]] = []  # (what, id of the object it concerns)
    process, checkpoint = worker.processor.process, worker.processor.checkpoint
    pipeline = worker.pipeline
    assert isinstance(pipeline, CommitPipeline)
    produce_, flush, commit = pipeline.output.produce, pipeline.output.flush, pipeline.commit
    batches: list[tuple[int, int]] = []  # (id of outputs, id of checkpoint records)
    alive: list[Any] = []  # every object whose id is recorded (ids are not reused then)

    def spy_process(batch: Any) -> Any:
        out = process(batch)
        alive.append(out[0])
        batches.append((id(out[0]), -1))
        return out

    def spy_checkpoint() -> Any:
        cp = checkpoint()
        alive.append(cp.records)
        if batches and batches[-1][1] == -1:
            batches[-1] = (batches[-1][0], id(cp.records) if cp.records else 0)
        return cp

    def spy_produce(records: Any) -> None:
        events.append(("produce", id(records)))
        produce_(records)

    def spy_flush() -> None:
        flush()
        events.append(("flush", 0))

    def spy_commit(cp: Any, **kw: Any) -> None:
        events.append(("commit", id(cp.records)))
        commit(cp, **kw)

    worker.processor.process = spy_process  # type: ignore[method-assign]
    worker.processor.checkpoint = spy_checkpoint  # type: ignore[method-assign]
    pipeline.output.produce = spy_produce  # type: ignore[method-assign]
    pipeline.output.flush = spy_flush  # type: ignore[method-assign]
    pipeline.commit = spy_commit  # type: ignore[method-assign]
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(
            lambda: worker.counts.total("interactions") == len(world.interactions), 90, "worker"
        )

        # idle, the worker drains the pipeline by itself (before any stop)
        def drained() -> bool:  # and stays so (no batch in between)
            before = worker.checkpoints
            if not pipeline.idle:
                return False
            time.sleep(0.5)
            return pipeline.idle and worker.checkpoints == before

        wait_for(drained, 20, "the idle drain")
        committed_while_idle = worker.checkpoints
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive(), "worker did not stop"

    def first(what: str, obj: int) -> int:
        hits = [i for i, e in enumerate(events) if e == (what, obj)]
        assert len(hits) == 1, f"{what} of one batch seen {len(hits)} times"
        return hits[0]

    def flushed_between(a: int, b: int) -> bool:
        return any(e[0] == "flush" for e in events[a + 1 : b])

    checked = 0
    for outputs, records in batches:
        if records == 0:  # nothing changed: no changelog, nothing to commit
            continue
        out_i, cl_i, commit_i = (
            first("produce", outputs),
            first("produce", records),
            first("commit", records),
        )
        assert out_i < cl_i < commit_i
        assert flushed_between(out_i, cl_i), "changelog produced before its outputs were acked"
        assert flushed_between(cl_i, commit_i), "offsets committed before the changelog was acked"
        checked += 1
    assert checked >= 10, f"only {checked} batches checked"
    assert committed_while_idle == checked == worker.checkpoints


# -- (2) bad records ----------------------------------------------------------------


def test_bad_records_are_dead_lettered_and_the_worker_keeps_going(
    world, handler, kafka_conf, bootstrap, topics, unique_name
):
    item = world.items[0]
    rows = world.rows_of(item["item_id"])
    good = rows[0]
    key = item["item_id"]
    orphan = dict(good, item_id="never-announced", event_id="orphan")
    bad: list[tuple[str, str, str, bytes | None]] = [
        ("decode", topics.interactions, key, b"\x00\x00\x00\x27\x12 not avro at all"),
        ("decode", topics.interactions, key, b"plain text, no frame"),
        ("schema_id", topics.interactions, key, frame(424242, INTER.encode(good)[5:])),
        # an ItemEvent payload under the Interaction id: required fields are missing
        ("decode", topics.interactions, key, frame(INTER.schema_id, ITEM.encode(item)[5:])),
        ("missing_field", topics.interactions, key, INTER.encode(dict(good, event_id=""))),
        ("bad_label", topics.interactions, key, INTER.encode(dict(good, event_id="l", label=2))),
        (
            "nonfinite_feature",
            topics.interactions,
            key,
            INTER.encode(dict(good, event_id="nan", numeric={"age": float("nan")})),
        ),
        ("decode", topics.items, "junk", b"\x00\x00\x00"),
        (
            "nonfinite_feature",
            topics.items,
            "inf-item",
            ITEM.encode(dict(item, item_id="inf-item", numeric={"price": float("inf")})),
        ),
    ]
    records = [(topics.items, key, ITEM.encode(item))]
    records += [(t, k, v) for _, t, k, v in bad]
    records += [(topics.interactions, key, INTER.encode(r)) for r in rows]
    produce(kafka_conf, records)
    # partition 0: an interaction of an item never announced, then an ItemEvent 10 s of
    # event time later: the item stream time passes the 5 s age cap, the orphan expires
    later = dict(item, item_id="announced-later", event_time=orphan["event_time"] + 10_000)
    produce(kafka_conf, [(topics.interactions, "never-announced", INTER.encode(orphan))], 0)
    produce(kafka_conf, [(topics.items, "announced-later", ITEM.encode(later))], 0)
    bad.append(("unknown_item", topics.interactions, "never-announced", INTER.encode(orphan)))
    settings = settings_for(
        bootstrap, topics, unique_name("group"), batch_max_records=5, pending_max_age_ms=5_000
    )
    worker = Worker(settings, handler, exit_when_idle_s=2.0)
    thread = threading.Thread(target=worker.run)
    thread.start()
    thread.join(90)
    assert not thread.is_alive()

    dead = read_values(kafka_conf, topics.dead_letter, DEAD)
    got = sorted((d["source_topic"] == topics.items, d["error_kind"]) for d in dead)
    want = sorted((t == topics.items, kind) for kind, t, _, _ in bad)
    assert got == want
    by_value = {d["value"]: d for d in dead}
    for kind, topic, k, value in bad:
        d = by_value[value]
        assert (d["error_kind"], d["source_topic"], d["key"]) == (kind, topic, k.encode())
        assert d["message"]
    # the good interactions after the bad ones were all applied and published
    params = read_values(kafka_conf, topics.item_params, PARAMS)
    assert max(p["version"] for p in params if p["item_id"] == key) == 1 + len(rows) // world.k
    n_in = sum(1 for r in records if r[0] == topics.interactions) + 1
    c = worker.counts
    assert c.total("interactions") == n_in  # every record exactly one outcome
    assert c.interactions["applied"] == len(rows)
    assert c.interactions["dead_lettered"] == sum(1 for b in bad if b[1] == topics.interactions)
    assert c.items == dict(c.items, applied=2, duplicate=0, dead_lettered=2, ignored_old_item=0)
    assert c.total("items") == 4


# -- (2b) interactions far ahead of their items ---------------------------------------


def test_interactions_ahead_of_their_items_are_throttled_not_dead_lettered(
    world, handler, offline, kafka_conf, bootstrap, topics, unique_name
):
    """All clicks are in the topic before any item: with a pending buffer smaller than
    the clicks waiting, the worker pauses the interactions partitions until the items
    arrive, instead of overflowing into the dead-letter topic."""
    n_new_rows = sum(1 for r in world.interactions if r["item_id"] in world.new_ids)
    pending_max = 120
    assert n_new_rows > 2 * pending_max
    produce(
        kafka_conf,
        [(topics.interactions, r["item_id"], INTER.encode(r)) for r in world.interactions],
    )
    settings = settings_for(
        bootstrap, topics, unique_name("group"), batch_max_records=16, pending_max=pending_max
    )
    worker = Worker(settings, handler)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: worker.pauses > 0, 60, "the interactions to be paused")
        produce(kafka_conf, [(topics.items, r["item_id"], ITEM.encode(r)) for r in world.items])
        wait_for(
            lambda: worker.counts.total("interactions") == len(world.interactions),
            90,
            "every interaction",
        )
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive()
    assert worker.counts.interactions["dead_lettered"] == 0
    assert read_values(kafka_conf, topics.dead_letter, DEAD) == []
    check_params(read_values(kafka_conf, topics.item_params, PARAMS), offline, world)
    print(f"\n[backpressure] {worker.pauses} partition pauses, pending bound {pending_max}")


# -- (3) kill -9 and restart --------------------------------------------------------


def test_kill_9_mid_stream_then_restart_changes_nothing(
    world, checkpoint, offline, kafka_conf, bootstrap, topics, unique_name, tmp_path
):
    dupes = world.interactions[::9]
    produce(kafka_conf, input_records(world, topics, world.interactions + dupes))
    total_in = len(world.interactions) + len(dupes)
    group = unique_name("group")
    stats1, stats2 = tmp_path / "run1.json", tmp_path / "run2.json"
    log1, log2 = tmp_path / "run1.log", tmp_path / "run2.log"
    t0 = time.monotonic()
    run1 = worker_proc(checkpoint, bootstrap, topics, group, stats1, log1)

    def progressed() -> bool:
        s = read_stats(stats1)
        return s is not None and sum(s["process"]["interactions"].values()) >= total_in // 4

    wait_for(progressed, 120, "run 1 to get a quarter through", run1)
    run1.kill()  # SIGKILL: no checkpoint, no leave-group
    run1.wait(10)
    at_kill = read_stats(stats1)
    assert at_kill is not None
    done1 = sum(at_kill["process"]["interactions"].values())
    assert 0 < done1 < total_in, "the kill did not land mid-stream"

    run2 = worker_proc(checkpoint, bootstrap, topics, group, stats2, log2)

    def finished() -> bool:
        fold = latest_marks(kafka_conf, topics)
        return sum(mark_totals(fold)["interactions"].values()) == total_in

    try:
        wait_for(finished, 120, "run 2 to finish", run2)
    finally:
        stop(run2, log2)
    took = time.monotonic() - t0

    check_params(read_values(kafka_conf, topics.item_params, PARAMS), offline, world)
    totals = mark_totals(latest_marks(kafka_conf, topics))
    n_old = sum(1 for r in world.interactions if r["item_id"] in world.old_ids)
    dup_old = sum(1 for r in dupes if r["item_id"] in world.old_ids)
    # exactly once over both runs: each record one outcome, none twice, none lost
    assert totals["interactions"] == {
        "applied": len(world.interactions) - n_old,
        "duplicate": len(dupes) - dup_old,
        "dead_lettered": 0,
        "ignored_old_item": n_old + dup_old,
        "conflicting_item": 0,
        "conflicting_event": 0,
    }
    assert sum(totals["items"].values()) == len(world.items)
    final = read_stats(stats2)
    assert final is not None
    by_mark = {
        role: sum(sum(m["counts"][role].values()) for m in final["marks"].values())
        for role in ("items", "interactions")
    }
    assert by_mark == {"items": len(world.items), "interactions": total_in}
    print(
        f"\n[crash] killed run 1 after {done1}/{total_in} interactions; run 2 counted "
        f"{sum(final['process']['interactions'].values())}; total {took:.1f}s"
    )


# -- (4) scale-out with a rebalance mid-stream ----------------------------------------


def test_two_workers_with_a_rebalance_publish_what_one_worker_does(
    world, checkpoint, offline, kafka_conf, bootstrap, topics, unique_name, tmp_path
):
    half = len(world.interactions) // 2
    first, second = world.interactions[:half], world.interactions[half:]
    produce(kafka_conf, input_records(world, topics, first))
    group = unique_name("group")
    stats_a, stats_b = tmp_path / "a.json", tmp_path / "b.json"
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    t0 = time.monotonic()
    a = worker_proc(checkpoint, bootstrap, topics, group, stats_a, log_a)
    procs = [a]
    try:

        def a_done_first_half() -> bool:
            s = read_stats(stats_a)
            return s is not None and sum(s["process"]["interactions"].values()) >= half

        wait_for(a_done_first_half, 120, "worker A to process the first half", a)
        b = worker_proc(checkpoint, bootstrap, topics, group, stats_b, log_b)
        procs.append(b)

        def split() -> bool:
            sa, sb = read_stats(stats_a), read_stats(stats_b)
            return (
                sa is not None
                and sb is not None
                and len(sa["partitions"]) == len(sb["partitions"]) == PARTITIONS // 2
            )

        wait_for(split, 120, "the partitions to be split between A and B", *procs)
        t_split = time.monotonic() - t0
        produce(kafka_conf, [(topics.interactions, r["item_id"], INTER.encode(r)) for r in second])

        def finished() -> bool:
            fold = latest_marks(kafka_conf, topics)
            return sum(mark_totals(fold)["interactions"].values()) >= len(world.interactions)

        wait_for(finished, 120, "both workers to finish", *procs)
    finally:
        for p, log in zip(procs, [log_a, log_b], strict=False):
            stop(p, log)
    took = time.monotonic() - t0
    n = check_params(read_values(kafka_conf, topics.item_params, PARAMS), offline, world)
    totals = mark_totals(latest_marks(kafka_conf, topics))
    assert sum(totals["interactions"].values()) == len(world.interactions)
    sa, sb = read_stats(stats_a), read_stats(stats_b)
    assert sa is not None and sb is not None
    assert sum(sb["process"]["interactions"].values()) > 0, "B processed nothing"
    # B took over partitions mid-stream: their item states came from the changelog
    assert sb["restored_items"] > 0 and sa["rebalances"] >= 2
    print(
        f"\n[scale-out] {n} params versions; rebalance split after {t_split:.1f}s; "
        f"A counted {sum(sa['process']['interactions'].values())}, B "
        f"{sum(sb['process']['interactions'].values())}; total {took:.1f}s"
    )


# -- refusals -----------------------------------------------------------------------


def test_refuses_to_start_when_items_and_interactions_are_not_copartitioned(
    handler, kafka_conf, bootstrap, unique_name
):
    from emerg_stream.errors import ConfigError
    from emerg_stream.stream.topics import TopicSpec

    names = TopicSettings(
        items=unique_name("items"),
        interactions=unique_name("inter"),
        item_params=unique_name("params"),
        predictions=unique_name("preds"),
        dead_letter=unique_name("dead"),
        changelog=unique_name("changelog"),
    )
    specs = [s for s in load_topic_specs(None, names) if s.role not in ("items", "interactions")]
    specs += [
        TopicSpec("items", names.items, 2, 1),
        TopicSpec("interactions", names.interactions, 3, 1),
    ]
    ensure_topics(kafka_conf, specs)
    worker = Worker(settings_for(bootstrap, names, unique_name("group")), handler)
    with pytest.raises(ConfigError, match="co-partitioned"):
        worker.run()


def test_refuses_state_written_by_another_model_version(
    world, handler, kafka_conf, bootstrap, topics, unique_name
):
    from emerg_stream.errors import ModelError
    from emerg_stream.stream.checkpointing import MARK_KEY, PartitionProgress

    mark = PartitionProgress(0).mark("another-model", [], 0)
    p = Producer(kafka_conf)
    p.produce(topics.changelog, mark.encode(), MARK_KEY, 0)
    assert p.flush(10) == 0
    del p
    produce(kafka_conf, input_records(world, topics))
    worker = Worker(settings_for(bootstrap, topics, unique_name("group")), handler)
    with pytest.raises(ModelError, match="model version"):
        worker.run()  # raised in the assign callback, out of consume()
    assert worker.batches == 0
    assert read_values(kafka_conf, topics.item_params, PARAMS) == []
