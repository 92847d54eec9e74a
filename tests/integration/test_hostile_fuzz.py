"""Fuzz through the broker: generated hostile records, the real worker, every outcome.

Hypothesis draws streams of records (valid and broken Avro, values up to the producer's
and topic's 1,000,000-byte limit, strings of every size, numbers and times at their
extremes, microsecond and negative clocks, re-announced items and reused event ids with
other content) and produces them to the embedded broker in the drawn order; the real
worker (a thread, batches of 1-16) consumes them. Checked in every example: within 90 s
every record has an outcome or waits in the pending buffer, and the worker never raised
(liveness); after a clean stop the partition marks count every produced record exactly
once, pending ones included (conservation); every dead letter names a distinct source
record; and a record produced after the stream is applied by a restart (it moves on).

Four examples by default (32 s on the shared 2-core machine); set
``EMERG_FUZZ_EXAMPLES`` for more.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import worker_world as ww
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_worker import DEAD, INTER, ITEM, latest_marks, make_topics, produce, read_values

from emerg_stream.config import KafkaSettings, TopicSettings, WorkerSettings
from emerg_stream.io.avro import frame
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.stream.worker import Worker

pytestmark = pytest.mark.integration

WORLD = ww.make_world(n_new=3, n_old=1, k=3)
EXAMPLES = int(os.environ.get("EMERG_FUZZ_EXAMPLES", "4"))
T0 = 1_700_000_000_000
BIG = 990_000  # a value at the producer's (and a default topic's) record limit


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchWarmupHandler]:
    ck = ww.build_checkpoint(WORLD, tmp_path_factory.mktemp("ck") / "tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchWarmupHandler.from_checkpoint(Path(ck), "cpu")
    torch.set_num_threads(threads)


# mostly well-formed (so items get applied, clicks scored, duplicates and conflicts
# happen), with every extreme in the mix
IDS = st.sampled_from(["n0", "n1", "n2", "n0", "n1", "o0", "ghost", "", "i" * 5_000])
TIMES = st.one_of(
    st.sampled_from([T0, T0 + 1_000, T0 - 3_000, T0 * 1000, -1, 0, 2**62, -(2**62)]),
    st.integers(T0 - 10**7, T0 + 10**7),
    st.integers(T0 - 10**7, T0 + 10**7),
)
NUMBERS = st.sampled_from([0.0, 1.5, 30.0, -0.0, 9.9e14, 1e308, float("nan"), float("inf")])
SIZES = st.sampled_from([0, 1, 1, 1, 1, 100, 5_000, 20_000, 200_000, BIG])


@st.composite
def word(draw: st.DrawFn) -> str:
    n = draw(SIZES)
    return draw(st.sampled_from(["drama", "x", "", "y"])) if n < 100 else "w" * n


def features(kinds: dict[str, str]) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly the spec's fields in their own maps; sometimes unknown or misplaced ones."""
    cat = [n for n, k in kinds.items() if k == "categorical"]
    num = [n for n, k in kinds.items() if k == "numeric"]
    return st.fixed_dictionaries(
        {
            "categorical": st.dictionaries(
                st.sampled_from([*cat, *cat, *cat, "unknown", *num]), word(), max_size=2
            ),
            "multi": st.dictionaries(st.sampled_from(["unknown"]), st.lists(word(), max_size=2)),
            "numeric": st.dictionaries(st.sampled_from([*num, *num, "unknown"]), NUMBERS),
        }
    )


@st.composite
def record(draw: st.DrawFn) -> tuple[str, str, bytes | None]:
    """(role, key, value) of one input record, good or broken."""
    role = draw(st.sampled_from(["items", "interactions", "interactions"]))
    if role == "items":
        kinds = {"genre": "categorical", "price": "numeric"}
        rec: dict[str, Any] = {"item_id": draw(IDS), **draw(features(kinds))}
        rec["event_time"] = draw(TIMES)
        good = ITEM.encode(rec)
    else:
        rec = {
            "event_id": draw(st.sampled_from(["e1", "e2", "e3", "e4", "", "e" * 5_000])),
            "item_id": draw(IDS),
            "user_id": draw(st.sampled_from(["u1", "u2", "u1", "u" * 5_000])),
            **draw(features({"city": "categorical", "age": "numeric"})),
            "label": draw(st.sampled_from([0, 1, 1, 0, 2])),
            "event_time": draw(TIMES),
        }
        good = INTER.encode(rec)
    key = rec["item_id"] or "k"
    if len(good) + len(key) > BIG + 1_000:  # over the producer's limit: not a record
        good = good[: BIG - len(key)]
    how = draw(st.sampled_from(["good"] * 6 + ["junk", "truncated", "schema", "null"]))
    if how == "junk":
        return role, key, b"\x00" * draw(SIZES)
    if how == "truncated":
        return role, key, good[: draw(st.integers(0, max(0, len(good) - 1)))]
    if how == "schema":
        return role, key, frame(draw(st.sampled_from([0, 424242, ITEM.schema_id])), good[5:])
    if how == "null":
        return role, key, None
    return role, key, good


def run_until(
    settings_: WorkerSettings, handler: Any, done: Callable[[Worker], bool], timeout_s: float = 90
) -> Worker:
    """Run a worker in a thread until ``done(worker)`` (liveness), then stop it cleanly."""
    worker = Worker(settings_, handler)
    raised: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:  # the test reports it
            raised.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not done(worker):
            assert thread.is_alive(), f"the worker died: {raised[0]!r}" if raised else "exited"
            assert time.monotonic() < deadline, f"no outcome for some records: {worker.counts}"
            time.sleep(0.05)
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive(), "the worker did not stop"
    assert not raised, f"the worker died: {raised[0]!r}"
    return worker


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(records=st.lists(record(), min_size=10, max_size=40), batch=st.integers(1, 16))
def test_fuzzed_records_through_the_broker_each_get_one_outcome(
    handler: TorchWarmupHandler,
    kafka_conf: dict[str, str],
    bootstrap: str,
    unique_name: Callable[[str], str],
    records: list[tuple[str, str, bytes | None]],
    batch: int,
) -> None:
    topics: TopicSettings = make_topics(kafka_conf, unique_name)
    role_topic = {"items": topics.items, "interactions": topics.interactions}
    produce(kafka_conf, [(role_topic[r], k, v) for r, k, v in records])
    group = unique_name("group")
    settings_ = WorkerSettings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        topics=topics,
        group_id=group,
        heartbeat_interval_ms=500,
        batch_timeout_ms=100,
        batch_max_records=batch,
        pending_max=8,
    )
    n_items = sum(1 for r, _, _ in records if r == "items")
    n_inter = len(records) - n_items

    def all_counted(w: Worker) -> bool:
        pending = len(w.processor.pending)
        return w.counts.total("items") == n_items and (
            w.counts.total("interactions") + pending == n_inter
        )

    run_until(settings_, handler, all_counted)

    marks = latest_marks(kafka_conf, topics)
    counted = {"items": 0, "interactions": 0}
    pending = 0
    for r in marks.out.values():
        if r.mark is not None:
            for role in counted:
                counted[role] += r.mark.counts.total(role)
            pending += len(r.mark.pending)
    assert counted["items"] == n_items
    assert counted["interactions"] + pending == n_inter

    dead = read_values(kafka_conf, topics.dead_letter, DEAD)
    sources = [(d["source_topic"], d["source_partition"], d["source_offset"]) for d in dead]
    assert len(sources) == len(set(sources))
    assert all(d["truncated"] or d["value_size"] in (None, len(d["value"] or b"")) for d in dead)

    # liveness: a restart moves on to a record produced after the stream
    item = dict(WORLD.items[0], item_id="after", event_time=T0)
    produce(kafka_conf, [(topics.items, "after", ITEM.encode(item))])
    run_until(settings_, handler, lambda w: w.counts.total("items") == 1)

    outcomes: dict[str, int] = {}
    for r in marks.out.values():
        if r.mark is not None:
            for role in counted:
                for k, v in r.mark.counts.of(role).items():
                    outcomes[k] = outcomes.get(k, 0) + v
    kinds: dict[str, int] = {}
    for d in dead:
        kinds[d["error_kind"]] = kinds.get(d["error_kind"], 0) + 1
    print(
        f"\n[fuzz] {len(records)} records (largest {max(len(v or b'') for *_, v in records):,} "
        f"bytes), batch {batch}: outcomes {dict(sorted((k, v) for k, v in outcomes.items() if v))}"
        f", pending {pending}; dead letters {dict(sorted(kinds.items()))} "
        f"({sum(d['truncated'] for d in dead)} truncated); 2 runs, 0 crashes"
    )
