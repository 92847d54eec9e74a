"""Consumer lag: of this worker's assigned partitions (cheap, per batch) and of a group.

**Tansu's ``ListOffsets`` quirk**: the embedded broker answers ``ListOffsets`` with the
base offset of the last record *batch* plus one, short of the true end whenever that
batch holds several records; its *fetch* responses carry the true high watermark (see
:func:`emerg_stream.stream.reader.read_assigned_to_end`). Hence:

- :func:`assigned_lag` (the worker, once per batch) uses the high watermark cached from
  the last fetch response and the consumer's position: two local calls, no request. A
  paused partition is not fetched, so its cached end may be stale until it resumes.
- :func:`group_lag` (``emerg-stream status``) lists the ends, then fetches from the
  listed end minus one to learn the true end, and subtracts the group's committed
  offsets.

**Behind or waiting.** An interaction whose item is not announced yet waits in the
worker's pending buffer, and the committed offset of its partition stays at it (by
design: a restart must read it again). That shows as committed-offset lag although the
worker is not behind. :func:`split_lag` splits a partition's lag with the partition's
last mark (:func:`last_marks`): *behind* = end minus the worker's position, *held* =
position minus committed offset, with the number of pending orphans and the event-time
age of the oldest.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from emerg_stream.errors import TransientError
from emerg_stream.stream.checkpointing import MARK_KEY, PartitionMark
from emerg_stream.stream.reader import read_to_end, reader_conf

__all__ = [
    "PartitionLag",
    "SplitLag",
    "assigned_lag",
    "group_lag",
    "last_marks",
    "split_lag",
    "true_ends",
]


@dataclass(frozen=True)
class PartitionLag:
    """One partition of a group.

    Args:
        topic: Topic.
        partition: Partition number.
        committed: The group's committed offset (``None``: nothing committed).
        end: The partition's end (next offset to be written).
        start: The partition's first offset (the lag's base when nothing is committed).
    """

    topic: str
    partition: int
    committed: int | None
    end: int
    start: int

    @property
    def lag(self) -> int:
        """``end - committed`` (``end - start`` when nothing is committed)."""
        base = self.start if self.committed is None else self.committed
        return max(0, self.end - base)


def assigned_lag(consumer: Consumer) -> dict[tuple[str, int], int]:
    """Lag of every assigned partition from local state (cached fetch high watermark).

    Partitions without a position yet (nothing consumed) or without a fetched end are
    left out.
    """
    assignment = consumer.assignment()
    if not assignment:
        return {}
    out: dict[tuple[str, int], int] = {}
    for tp in consumer.position(assignment):
        if tp.offset < 0:
            continue
        _, hi = consumer.get_watermark_offsets(tp, cached=True)
        if hi < 0:
            continue
        out[(tp.topic, tp.partition)] = max(0, int(hi) - tp.offset)
    return out


def true_ends(
    consumer: Consumer, topic: str, partitions: Sequence[int], *, timeout_s: float = 10.0
) -> dict[int, tuple[int, int]]:
    """Partition -> (low, true end), robust to Tansu's short ``ListOffsets`` answers.

    Assigns ``consumer`` (a :func:`~emerg_stream.stream.reader.reader_conf` consumer) to
    each non-empty partition at its listed end minus one and reads until a fetch
    response told each end (or the deadline: the listed end stays, a lower bound).

    Raises:
        TransientError: The broker did not answer the offsets request.
    """
    out: dict[int, tuple[int, int]] = {}
    for p in partitions:
        try:
            lo, hi = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout_s, cached=False
            )
        except KafkaException as exc:
            raise TransientError(f"cannot read the offsets of {topic}[{p}]: {exc}") from exc
        out[p] = (int(lo), int(hi))
    todo = {p for p, (lo, hi) in out.items() if hi > lo}
    if not todo:
        return out
    consumer.assign([TopicPartition(topic, p, max(out[p][0], out[p][1] - 1)) for p in todo])
    deadline = time.monotonic() + timeout_s
    try:
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.2):
                got = msg.partition()
                if msg.error() is not None or got is None or got not in todo:
                    continue
                _, fetched = consumer.get_watermark_offsets(TopicPartition(topic, got), cached=True)
                lo, hi = out[got]
                out[got] = (lo, max(hi, int(fetched)))
                todo.discard(got)
    finally:
        consumer.unassign()
    return out


def group_lag(
    consumer_conf: dict[str, str],
    group: str,
    topics: Sequence[str],
    *,
    timeout_s: float = 10.0,
) -> list[PartitionLag]:
    """Committed offset, true end and lag of every partition of ``topics`` for ``group``.

    The reading consumer uses ``group.id = group`` only to ask for its committed offsets;
    it never subscribes, joins or commits.

    Raises:
        TransientError: The broker did not answer.
    """
    conf = reader_conf({**consumer_conf, "group.id": group})
    consumer = Consumer(conf)
    try:
        out: list[PartitionLag] = []
        for topic in topics:
            try:
                md = consumer.list_topics(topic, timeout=timeout_s)
            except KafkaException as exc:
                raise TransientError(f"cannot read metadata of {topic}: {exc}") from exc
            tm = md.topics.get(topic)
            if tm is None or tm.error is not None:
                continue
            parts = sorted(tm.partitions)
            try:
                committed = consumer.committed(
                    [TopicPartition(topic, p) for p in parts], timeout=timeout_s
                )
            except KafkaException as exc:
                raise TransientError(f"cannot read the offsets of group {group}: {exc}") from exc
            ends = true_ends(consumer, topic, parts, timeout_s=timeout_s)
            for tp in committed:
                lo, hi = ends[tp.partition]
                off = tp.offset if tp.offset >= 0 else None
                out.append(PartitionLag(topic, tp.partition, off, hi, lo))
        return out
    finally:
        consumer.close()


@dataclass(frozen=True)
class SplitLag:
    """A partition's committed-offset lag split into behind and held (see the module doc).

    Args:
        behind: End minus the worker's position (records not processed yet).
        held: Position minus committed offset (processed, held back by orphans).
        pending: Orphans pending at the last mark.
        oldest_pending_age_ms: Event-time age of the oldest, against the item clock.
    """

    behind: int
    held: int
    pending: int
    oldest_pending_age_ms: int | None


def last_marks(
    consumer_conf: dict[str, str], changelog: str, *, timeout_s: float = 60.0
) -> dict[int, PartitionMark]:
    """Partition -> the last partition mark of the changelog (item states are skipped)."""
    out: dict[int, PartitionMark] = {}
    for msg in read_to_end(consumer_conf, changelog, timeout_s=timeout_s):
        p = msg.partition()
        if msg.key() == MARK_KEY and p is not None:
            out[p] = PartitionMark.decode(msg.value())
    return out


def split_lag(lag: PartitionLag, mark: PartitionMark | None, role: str) -> SplitLag:
    """Split ``lag`` (a partition of ``role``'s topic) with that partition's last mark."""
    if mark is None or role not in mark.positions:
        return SplitLag(lag.lag, 0, 0, None)
    position = min(max(mark.positions[role], lag.start), lag.end)
    base = lag.start if lag.committed is None else lag.committed
    held = max(0, position - base) if role == "interactions" and mark.pending else 0
    age = None
    if role == "interactions" and mark.pending_oldest_time is not None:
        age = max(0, mark.items_time - mark.pending_oldest_time)
    pending = len(mark.pending) if role == "interactions" else 0
    return SplitLag(max(0, lag.lag - held), held, pending, age)
