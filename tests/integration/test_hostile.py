"""Hostile producers and Kafka's own size limits, against a real broker (issue 14).

Each case is a record the broker accepted that used to kill the worker or poison its
partition: (a) a bad record of 999,918 bytes whose dead letter no longer fits a Kafka
record; (b) a valid ~1 MB ItemEvent whose ItemState does not fit the changelog; (c) nine
valid clicks of ~120 KB on one new item (K = 10), whose support set outgrows the
changelog record; an ItemEvent stamped in microseconds (the partition clock); a
re-announced item with other features and a reused event id with other content; a record
that crashes the worker (the poison-pill guard). Every case ends with the worker alive
(or, for the crash, alive after one restart), every input counted in exactly one outcome
in the partition marks, and a restart that moves on to a record produced afterwards.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import worker_world as ww
from test_worker import (
    DEAD,
    INTER,
    ITEM,
    PARAMS,
    latest_marks,
    make_topics,
    mark_totals,
    produce,
    read_values,
    settings_for,
)
from topic_names import topic_names

from emerg_stream.config import TopicSettings, WorkerSettings
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.stream.handler import ItemFeatures, ParamsArrays
from emerg_stream.stream.worker import Worker

pytestmark = pytest.mark.integration

K = 10
BIG = 999_918  # the size of the bad record


@pytest.fixture(scope="module")
def world() -> ww.World:
    """4 new and 2 old items, K = 10 (so nine clicks stay in one support set)."""
    return ww.make_world(n_new=4, n_old=2, k=K)


@pytest.fixture(scope="module")
def handler(checkpoint: Path) -> Iterator[TorchWarmupHandler]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchWarmupHandler.from_checkpoint(checkpoint, "cpu")
    torch.set_num_threads(threads)


@pytest.fixture
def topics(kafka_conf: dict[str, str], unique_name: Callable[[str], str]) -> TopicSettings:
    return make_topics(kafka_conf, unique_name)


def run_once(
    settings: WorkerSettings, handler: Any, idle_s: float = 2.0, timeout_s: float = 120.0
) -> tuple[Worker, BaseException | None]:
    """Run a worker in a thread until it is idle; return it and what it raised."""
    worker = Worker(settings, handler, exit_when_idle_s=idle_s)
    raised: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:  # the test inspects it
            raised.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        worker.stop()
        thread.join(30)
        raise AssertionError("the worker did not become idle")
    return worker, (raised[0] if raised else None)


def conserved(kafka_conf: dict[str, str], topics: TopicSettings) -> dict[str, dict[str, int]]:
    """The outcome totals of the last marks (every record produced must be in them)."""
    return mark_totals(latest_marks(kafka_conf, topics))


def total(counts: dict[str, int]) -> int:
    return sum(counts.values())


def item_of(world: ww.World, i: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``i``-th new item (not one of the checkpoint's old items) and its clicks."""
    item = dict(next(r for r in world.items if r["item_id"] == world.new_ids[i]))
    return item, [dict(r) for r in world.rows_of(item["item_id"])]


def then_moves_on(
    kafka_conf: dict[str, str],
    bootstrap: str,
    topics: TopicSettings,
    group: str,
    handler: Any,
    n_items: int,
    n_inter: int,
    extra_item: dict[str, Any],
) -> dict[str, dict[str, int]]:
    """Restart the group on one more ItemEvent: it is applied, nothing else is redone."""
    produce(kafka_conf, [(topics.items, extra_item["item_id"], ITEM.encode(extra_item))])
    worker, exc = run_once(settings_for(bootstrap, topics, group), handler)
    assert exc is None, f"the restarted worker raised {exc!r}"
    totals = conserved(kafka_conf, topics)
    assert total(totals["items"]) == n_items + 1
    assert total(totals["interactions"]) == n_inter
    assert worker.counts.total("items") == 1 and worker.counts.total("interactions") == 0
    return totals


def dead_letters(kafka_conf: dict[str, str], topics: TopicSettings) -> list[dict[str, Any]]:
    return read_values(kafka_conf, topics.dead_letter, DEAD)


# -- (1) sizes: the three ways into the crash loop -------------------------------------


def test_a_bad_record_too_big_for_its_dead_letter(
    world, handler, kafka_conf, bootstrap, topics, unique_name
):
    item, rows = item_of(world)
    key = item["item_id"]
    junk = b"\x00\x00\x00\x27\x12" + b"j" * (BIG - 5)
    records = [(topics.items, key, ITEM.encode(item)), (topics.interactions, key, junk)]
    records += [(topics.interactions, key, INTER.encode(r)) for r in rows[:3]]
    produce(kafka_conf, records)
    group = unique_name("group")
    _, exc = run_once(settings_for(bootstrap, topics, group), handler)
    assert exc is None, f"the worker died: {exc!r}"
    (d,) = dead_letters(kafka_conf, topics)
    assert d["error_kind"] == "oversize"
    assert d["truncated"] is True and d["value_size"] == BIG
    assert d["value_sha256"] == hashlib.sha256(junk).hexdigest()
    assert d["value"] is not None and junk.startswith(d["value"]) and len(d["value"]) < BIG
    totals = conserved(kafka_conf, topics)
    assert totals["interactions"]["dead_lettered"] == 1
    assert totals["interactions"]["applied"] == 3
    then_moves_on(kafka_conf, bootstrap, topics, group, handler, 1, 4, dict(item, item_id="x1"))


def test_b_a_valid_1mb_item_event(world, handler, kafka_conf, bootstrap, topics, unique_name):
    item, rows = item_of(world)
    huge = dict(item, item_id="huge", categorical={"genre": "g" * (BIG - 200)})
    value = ITEM.encode(huge)
    assert 900_000 < len(value) < 1_000_000
    records = [(topics.items, "huge", value), (topics.items, item["item_id"], ITEM.encode(item))]
    records += [(topics.interactions, item["item_id"], INTER.encode(r)) for r in rows[:2]]
    produce(kafka_conf, records)
    group = unique_name("group")
    _, exc = run_once(settings_for(bootstrap, topics, group), handler)
    assert exc is None, f"the worker died: {exc!r}"
    kinds = [(d["error_kind"], d["key"]) for d in dead_letters(kafka_conf, topics)]
    assert kinds == [("oversize", b"huge")]
    assert {p["item_id"] for p in read_values(kafka_conf, topics.item_params, PARAMS)} == {
        item["item_id"]
    }
    totals = conserved(kafka_conf, topics)
    assert totals["items"]["dead_lettered"] == 1 and totals["items"]["applied"] == 1
    then_moves_on(kafka_conf, bootstrap, topics, group, handler, 2, 2, dict(item, item_id="x2"))


def test_c_nine_big_clicks_on_one_new_item(
    world, handler, kafka_conf, bootstrap, topics, unique_name
):
    item, rows = item_of(world)
    key = item["item_id"]
    assert len(rows) >= 9
    big = [
        dict(r, categorical={"city": f"{j}" + "c" * 120_000}, event_id=f"big-{j}")
        for j, r in enumerate(rows[:9])
    ]
    records = [(topics.items, key, ITEM.encode(item))]
    records += [(topics.interactions, key, INTER.encode(r)) for r in big]
    produce(kafka_conf, records)
    group = unique_name("group")
    _, exc = run_once(settings_for(bootstrap, topics, group), handler)
    assert exc is None, f"the worker died: {exc!r}"
    kinds = sorted(d["error_kind"] for d in dead_letters(kafka_conf, topics))
    assert kinds == ["oversize_field"] * 9
    totals = conserved(kafka_conf, topics)
    assert totals["interactions"]["dead_lettered"] == 9
    then_moves_on(kafka_conf, bootstrap, topics, group, handler, 1, 9, dict(item, item_id="x3"))


# -- (2) one bad clock ----------------------------------------------------------------


def test_an_item_stamped_in_microseconds_does_not_move_the_clock(
    world, handler, kafka_conf, bootstrap, topics, unique_name
):
    """The issue's case: a µs-stamped ItemEvent, then a click 3 s before its own item, the
    item itself only after a restart (the clock is in the marks, it survives one)."""
    item, rows = item_of(world)
    t = rows[0]["event_time"]
    micro = dict(item, item_id="micro", event_time=t * 1000)
    late = dict(item, item_id="late", event_time=t + 3_000)
    click = dict(rows[0], item_id="late", event_id="early-click", event_time=t)
    produce(kafka_conf, [(topics.items, "micro", ITEM.encode(micro))], 0)
    produce(kafka_conf, [(topics.interactions, "late", INTER.encode(click))], 0)
    group = unique_name("group")
    settings = settings_for(bootstrap, topics, group, pending_max_age_ms=60_000)
    _, exc = run_once(settings, handler)
    assert exc is None
    (d,) = dead_letters(kafka_conf, topics)
    assert (d["error_kind"], d["key"]) == ("bad_event_time", b"micro")
    marks = latest_marks(kafka_conf, topics).out
    assert marks[0].mark is not None and marks[0].mark.pending  # the click waits
    assert marks[0].mark.items_time == 0  # the µs time moved no clock
    produce(kafka_conf, [(topics.items, "late", ITEM.encode(late))], 0)
    _, exc = run_once(settings, handler)
    assert exc is None
    assert len(dead_letters(kafka_conf, topics)) == 1
    totals = conserved(kafka_conf, topics)
    assert totals["interactions"]["applied"] == 1, totals
    assert totals["items"] == dict(totals["items"], applied=1, dead_lettered=1)
    marks = latest_marks(kafka_conf, topics).out
    assert marks[0].mark is not None and marks[0].mark.items_time == t + 3_000
    then_moves_on(kafka_conf, bootstrap, topics, group, handler, 2, 1, dict(late, item_id="x4"))


# -- (3) conflicts ---------------------------------------------------------------------


def test_conflicting_items_and_events_are_their_own_outcomes(
    world, handler, kafka_conf, bootstrap, topics, unique_name
):
    item, rows = item_of(world)
    key = item["item_id"]
    other = dict(item, categorical={"genre": "another-genre"})
    same = dict(item, event_time=item["event_time"] + 1)  # same features, later: a duplicate
    relabelled = dict(rows[0], label=1 - rows[0]["label"])
    records = [(topics.items, key, ITEM.encode(r)) for r in (item, other, same)]
    records += [(topics.interactions, key, INTER.encode(r)) for r in rows[:3]]
    records += [(topics.interactions, key, INTER.encode(r)) for r in (rows[0], relabelled)]
    produce(kafka_conf, records)
    group = unique_name("group")
    _, exc = run_once(settings_for(bootstrap, topics, group), handler)
    assert exc is None
    totals = conserved(kafka_conf, topics)
    assert totals["items"] == dict(totals["items"], applied=1, duplicate=1, conflicting_item=1)
    assert totals["interactions"] == dict(
        totals["interactions"], applied=3, duplicate=1, conflicting_event=1
    )
    kinds = sorted(d["error_kind"] for d in dead_letters(kafka_conf, topics))
    assert kinds == ["conflicting_event", "conflicting_item"]
    # keep_first: one version 1, from the first features
    v1 = [p for p in read_values(kafka_conf, topics.item_params, PARAMS) if p["version"] == 1]
    assert len(v1) == 1
    then_moves_on(kafka_conf, bootstrap, topics, group, handler, 3, 5, dict(item, item_id="x5"))


# -- the poison-pill guard --------------------------------------------------------------


class Crashing:
    """A handler that raises on the cold start of item ``poison`` (a bug a record finds)."""

    def __init__(self, inner: TorchWarmupHandler) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def cold_start(self, items: Sequence[ItemFeatures]) -> ParamsArrays:
        if any(i.item_id == "poison" for i in items):
            raise RuntimeError("the model cannot take this item")
        return self.inner.cold_start(items)


def test_a_record_that_crashed_the_worker_is_dead_lettered_on_restart(
    world, handler, kafka_conf, bootstrap, topics, unique_name
):
    item, rows = item_of(world)
    poison = dict(item, item_id="poison")
    produce(kafka_conf, [(topics.items, "poison", ITEM.encode(poison))], 0)
    produce(
        kafka_conf,
        [(topics.items, item["item_id"], ITEM.encode(item))]
        + [(topics.interactions, item["item_id"], INTER.encode(r)) for r in rows[:2]],
    )
    group = unique_name("group")
    crashing = Crashing(handler)
    _, exc = run_once(settings_for(bootstrap, topics, group), crashing)
    assert isinstance(exc, RuntimeError), exc  # the first run dies (exit non-zero) ...
    _, exc = run_once(settings_for(bootstrap, topics, group), crashing)
    assert exc is None, f"the same record crashed the worker twice: {exc!r}"  # ... once
    d = [x for x in dead_letters(kafka_conf, topics) if x["key"] == b"poison"]
    assert [x["error_kind"] for x in d] == ["poison_pill"]
    assert "the model cannot take this item" in d[0]["message"]
    totals = conserved(kafka_conf, topics)
    assert total(totals["items"]) == 2 and total(totals["interactions"]) == 2
    assert totals["items"]["dead_lettered"] >= 1
    then_moves_on(kafka_conf, bootstrap, topics, group, crashing, 2, 2, dict(item, item_id="x6"))


# -- Kafka's limits read at start ---------------------------------------------------------


def test_refuses_bounds_whose_largest_state_cannot_fit_the_changelog(
    handler, kafka_conf, bootstrap, unique_name
):
    from emerg_stream.errors import ConfigError
    from emerg_stream.stream.topics import TopicSpec, ensure_topics, load_topic_specs

    names = topic_names(unique_name, 2)
    specs = [s for s in load_topic_specs(None, names) if s.role != "changelog"]
    config = {"cleanup.policy": "compact", "max.message.bytes": "200000"}
    specs.append(TopicSpec("changelog", names.changelog, 2, 1, config))
    ensure_topics(kafka_conf, specs)
    worker = Worker(settings_for(bootstrap, names, unique_name("group")), handler)
    with pytest.raises(ConfigError, match=r"at most 199,488 bytes \(topic max.message.bytes"):
        worker.run()  # K=10 rows of 16 KiB + 256 KiB of side features > 200,000
    assert worker.batches == 0
    fits = WorkerSettings(
        **{
            **settings_for(bootstrap, names, unique_name("group")).model_dump(),
            "inputs": {"max_value_bytes": 65_536, "max_support_row_bytes": 8_192},
        }
    )
    worker, exc = run_once(fits, handler, idle_s=0.5)
    assert exc is None  # the same topics with smaller input bounds: it starts


# -- produce and commit errors --------------------------------------------------------------


def test_an_output_refused_for_good_is_counted_not_fatal(
    handler, kafka_conf, bootstrap, topics, unique_name
):
    from confluent_kafka import Producer

    from emerg_stream.errors import TransientError
    from emerg_stream.stream.envelope import Outbound
    from emerg_stream.stream.worker import producer_conf

    settings = settings_for(bootstrap, topics, unique_name("group"))
    worker = Worker(settings, handler)
    out = worker.output
    out.producer = Producer(producer_conf(settings))
    huge = b"p" * 1_200_000
    out.produce(
        [Outbound(topics.predictions, b"k", huge), Outbound(topics.predictions, b"k", b"ok")]
    )
    refused = worker.metrics.registry.get_sample_value(
        "emerg_worker_outputs_refused_total",
        {"topic": topics.predictions, "error": "MSG_SIZE_TOO_LARGE"},
    )
    assert refused == 1.0
    out.flush()  # the record after it was delivered
    # a dead letter refused for good is re-sent without its raw bytes
    big = worker.processor.dead.serde.encode(
        {
            "source_topic": topics.items,
            "source_partition": 0,
            "source_offset": 3,
            "key": b"k",
            "value": huge,
            "error_kind": "decode",
            "message": "m",
            "failed_time": 0,
        }
    )
    out.produce([Outbound(topics.dead_letter, b"k", big)])
    out.flush()
    (d,) = dead_letters(kafka_conf, topics)
    assert (d["value"], d["truncated"], d["source_offset"]) == (None, True, 3)
    assert d["message"].startswith("raw bytes left out: MSG_SIZE_TOO_LARGE")
    with pytest.raises(TransientError, match="an item state was refused"):
        out.produce([Outbound(topics.changelog, b"k", huge, partition=0)])
    out.producer.flush(10)
    out.producer = None


def test_a_failed_partition_commit_is_logged_retried_then_raised(
    handler, kafka_conf, bootstrap, topics, unique_name
):
    from confluent_kafka import Consumer, TopicPartition

    from emerg_stream.errors import TransientError
    from emerg_stream.stream.commit import commit_offsets

    settings = settings_for(bootstrap, topics, unique_name("group"))
    worker = Worker(settings, handler)
    consumer = Consumer({**kafka_conf, "group.id": unique_name("group")})
    try:
        ok = [TopicPartition(topics.items, 0, 1)]
        commit_offsets(consumer, ok, in_revoke=False, metrics=worker.metrics)
        bad = [TopicPartition(topics.items, 0, 2), TopicPartition(unique_name("none"), 7, 1)]
        with pytest.raises(TransientError, match=r"offset commit failed for .*\[7\]"):
            commit_offsets(consumer, bad, in_revoke=False, metrics=worker.metrics)
        retries = worker.metrics.registry.get_sample_value("emerg_worker_commit_retries_total")
        assert retries is not None and retries >= 4
    finally:
        consumer.close()


# -- lag: behind vs held by orphans ------------------------------------------------------------


def test_status_and_metrics_tell_held_by_orphans_from_behind(
    world, handler, kafka_conf, bootstrap, topics, unique_name, monkeypatch, capsys
):
    from test_observability import status_json

    item, rows = item_of(world)
    orphan = dict(rows[0], item_id="ghost", event_id="orphan")
    later = [dict(r, item_id="later", event_id=f"l{j}") for j, r in enumerate(rows[:5])]
    produce(kafka_conf, [(topics.interactions, "ghost", INTER.encode(orphan))], 0)
    produce(kafka_conf, [(topics.items, "later", ITEM.encode(dict(item, item_id="later")))], 0)
    produce(kafka_conf, [(topics.interactions, "later", INTER.encode(r)) for r in later], 0)
    group = unique_name("group")
    worker, exc = run_once(settings_for(bootstrap, topics, group), handler)
    assert exc is None
    value = worker.metrics.registry.get_sample_value
    assert value("emerg_worker_pending_held", {"partition": "0"}) == 1.0
    held = {"topic": topics.interactions, "partition": "0"}
    assert value("emerg_worker_pending_held_records", held) == 6.0
    assert value("emerg_worker_consumer_lag", held) == 0.0  # not behind
    status = status_json(bootstrap, topics, group, monkeypatch, capsys)
    (p0,) = [x for x in status["lag"] if x["topic"] == topics.interactions and x["partition"] == 0]
    assert (p0["lag"], p0["behind"], p0["held"], p0["pending"]) == (6, 0, 6, 1)
    assert status["total_behind"] == 0 and status["total_held"] == 6
    # two more clicks arrive and are not processed: behind, the held part unchanged
    produce(kafka_conf, [(topics.interactions, "later", INTER.encode(r)) for r in later[:2]], 0)
    status = status_json(bootstrap, topics, group, monkeypatch, capsys)
    (p0,) = [x for x in status["lag"] if x["topic"] == topics.interactions and x["partition"] == 0]
    assert (p0["lag"], p0["behind"], p0["held"]) == (8, 2, 6)
    from emerg_stream import cli

    assert cli.main(["status", "--group", group, "--bootstrap", bootstrap]) == 0
    text = capsys.readouterr().out
    assert "total lag 8: behind 2, held by pending orphans 6" in text
    assert "1 pending orphans, oldest " in text
