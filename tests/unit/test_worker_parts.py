"""The worker's small parts: pending buffer bounds, partition progress/marks, counters."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emerg_stream.errors import SchemaError
from emerg_stream.stream.checkpointing import PartitionMark, PartitionProgress
from emerg_stream.stream.envelope import Inbound
from emerg_stream.stream.metrics import OUTCOMES, OutcomeCounts, WorkerMetrics
from emerg_stream.stream.pending import PendingBuffer, PendingEntry


def entry(p: int, off: int, item: str, t: int) -> PendingEntry:
    rec = {
        "event_id": f"e{p}-{off}",
        "item_id": item,
        "user_id": "u",
        "categorical": {},
        "multi": {},
        "numeric": {},
        "label": 0,
        "event_time": t,
    }
    return PendingEntry(Inbound("inter", p, off, item.encode(), b"raw"), rec)  # type: ignore[arg-type]


def test_pending_count_bound_evicts_the_oldest_over_all_partitions():
    buf = PendingBuffer(max_records=3, max_age_ms=10**9)
    assert buf.add(entry(0, 5, "a", 1)) == []
    assert buf.add(entry(1, 2, "b", 2)) == []
    assert buf.add(entry(0, 6, "a", 3)) == []
    gone = buf.add(entry(1, 3, "c", 4))
    assert [(e.msg.partition, e.msg.offset) for e in gone] == [(0, 5)]
    assert len(buf) == 3 and buf.offsets(0) == [6] and buf.offsets(1) == [2, 3]
    assert [e.msg.offset for e in buf.take(0, "a")] == [6]
    assert buf.take(0, "a") == [] and len(buf) == 2
    assert PendingBuffer(0, 10).add(entry(0, 1, "a", 1))[0].msg.offset == 1  # nothing waits


def test_pending_age_bound_uses_the_given_item_clock_per_partition():
    buf = PendingBuffer(max_records=10, max_age_ms=100)
    for off, t in enumerate([0, 50, 120]):
        buf.add(entry(0, off, "a", t))
    buf.add(entry(1, 0, "b", 0))
    assert buf.expire(0, 100) == []
    assert [e.msg.offset for e in buf.expire(0, 151)] == [0, 1]
    assert buf.offsets(0) == [2] and buf.offsets(1) == [0]
    assert buf.drop_partition(1) == 1 and len(buf) == 1


@settings(max_examples=60)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.sampled_from("abc"), st.integers(0, 500)), max_size=40
    ),
    st.integers(0, 6),
)
def test_pending_never_exceeds_its_bound_and_loses_nothing(ops, cap):
    buf = PendingBuffer(max_records=cap, max_age_ms=50)
    added, out = 0, 0
    for i, (p, item, t) in enumerate(ops):
        added += 1
        out += len(buf.add(entry(p, i, item, t)))
        out += len(buf.expire(p, t))
        assert len(buf) <= cap
    for p in range(3):
        for item in "abc":
            out += len(buf.take(p, item))
    assert out == added and len(buf) == 0


def test_progress_marks_positions_pending_and_counts_and_resumes_from_them():
    prog = PartitionProgress(2)
    for off in range(10):
        prog.advance("interactions", off)
    prog.advance("items", 3)
    prog.observe_item_time(1234)
    prog.counts.add("interactions", "applied", 7)
    mark = prog.mark("mv1", pending=[4, 8], now_ms=99)
    assert mark.positions == {"interactions": 10, "items": 4} and mark.pending == [4, 8]
    assert prog.commit_offsets([4, 8]) == {"items": 4, "interactions": 4}
    back = PartitionMark.decode(mark.encode())
    assert back == mark
    resumed = PartitionProgress.from_mark(back)
    assert resumed.start_offsets() == {"items": 4, "interactions": 4}
    # records 5..7 and 9 were applied before: skipped; 4 and 8 are read again
    assert [o for o in range(4, 12) if resumed.skips(o)] == [5, 6, 7, 9]
    # halfway through re-reading, a checkpoint still remembers offset 8 and the position
    resumed.advance("interactions", 4)
    resumed.advance("interactions", 5)
    again = resumed.mark("mv1", pending=[4], now_ms=100)
    assert again.pending == [4, 8] and again.positions["interactions"] == 10
    assert resumed.counts.interactions["applied"] == 7 and again.items_time == 1234


def test_mark_decoding_rejects_garbage():
    for raw in (b"", b"{}", b'{"v": 99}', b"[1, 2]"):
        with pytest.raises(SchemaError):
            PartitionMark.decode(raw)


def test_outcome_counts_and_prometheus_mirror():
    c = OutcomeCounts()
    c.add("items", "applied")
    c.add("interactions", "duplicate", 3)
    with pytest.raises(ValueError):
        c.add("interactions", "lost")
    with pytest.raises(ValueError):
        c.add("clicks", "applied")
    assert OutcomeCounts.from_dict(c.to_dict()) == c
    assert c.total("interactions") == 3 and set(c.items) == set(OUTCOMES)
    m = WorkerMetrics()
    m.count("interactions", "duplicate", 3)
    value = m.registry.get_sample_value(
        "emerg_worker_records_total", {"topic": "interactions", "outcome": "duplicate"}
    )
    assert value == 3.0


def test_backpressure_pauses_a_partition_ahead_of_its_items_and_resumes_it():
    from emerg_stream.stream.flow import Backpressure

    bp = Backpressure(pending_max=40, items_quiet_s=5.0)
    bp.assigned([0, 1], now=0.0)
    assert bp.high_water(2) == 10
    assert bp.decide({0: 10, 1: 3}, now=1.0) == ([0], [])
    assert bp.decide({0: 12, 1: 3}, now=1.5) == ([], [])  # stays paused
    bp.items_delivered([0], now=2.0)
    assert bp.decide({0: 5, 1: 3}, now=2.0) == ([], [0])  # items caught up: half the mark
    assert bp.decide({0: 10, 1: 0}, now=6.9) == ([0], [])  # items of 0 seen at 2.0: active
    # the items partition goes quiet: nothing to wait for, resume and let the bounds act
    assert bp.decide({0: 10, 1: 0}, now=7.1) == ([], [0])
    assert bp.decide({0: 30, 1: 0}, now=8.0) == ([], [])
    bp.revoked([0])
    assert bp.paused == set()


def test_pending_counts_per_partition_follow_every_exit():
    buf = PendingBuffer(max_records=3, max_age_ms=10)
    buf.add(entry(0, 1, "a", 0))
    buf.add(entry(0, 2, "b", 0))
    buf.add(entry(1, 1, "c", 100))
    assert (buf.count(0), buf.count(1)) == (2, 1)
    buf.add(entry(1, 2, "c", 100))  # evicts partition 0's oldest
    assert (buf.count(0), buf.count(1)) == (1, 2)
    buf.expire(0, 50)
    assert buf.count(0) == 0
    buf.take(1, "c")
    assert buf.count(1) == 0 and len(buf) == 0
