"""Read a topic back: every partition from its beginning up to its end when the read began.

:func:`read_to_end` assigns every partition of a topic from its beginning and reads up to
the end it had when the read started, then stops. It is bounded by that end and by a
deadline, joins no group and commits nothing. :func:`assign_from_beginning` and
:func:`read_assigned_to_end` are its two halves, for a caller that keeps the consumer
(the ranker's catch-up, the changelog restore, the lag probe); :func:`reader_conf` gives
such a consumer its settings. Used by the stream evaluation, the ranker, the changelog
restore, the dead-letter replay, ``status`` and ``report``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaException,
    Message,
    TopicPartition,
)

from emerg_stream.errors import ConfigError, TransientError

__all__ = [
    "assign_from_beginning",
    "read_assigned_to_end",
    "read_to_end",
    "reader_conf",
]


def read_to_end(
    consumer_conf: Mapping[str, str],
    topic: str,
    *,
    timeout_s: float = 60.0,
) -> Iterator[Message]:
    """Every record of ``topic`` from the beginning up to (at least) its end at the start.

    Assigns all partitions (no group membership, no commits) and stops when every
    partition reached its end (see :func:`read_assigned_to_end`). Records with errors
    raise. Tombstones are yielded (``value()`` is ``None``).

    Args:
        consumer_conf: librdkafka settings; a ``group.id`` is made up if absent (it is
            never joined or committed to).
        topic: The topic.
        timeout_s: Deadline for the whole read.

    Yields:
        The records, in offset order within each partition.

    Raises:
        ConfigError: The topic does not exist.
        TransientError: The end was not reached before the deadline, or the broker failed.
    """
    consumer = Consumer(reader_conf(consumer_conf))
    try:
        ends = assign_from_beginning(consumer, [topic], timeout_s=timeout_s)
        yield from read_assigned_to_end(consumer, ends, timeout_s=timeout_s)
    finally:
        consumer.close()


def reader_conf(consumer_conf: Mapping[str, str]) -> dict[str, str]:
    """Consumer settings of a reader that assigns partitions itself and never commits."""
    conf = dict(consumer_conf)
    conf.setdefault("group.id", f"emerg-reader-{uuid.uuid4().hex[:12]}")
    conf.update({"enable.auto.commit": "false", "enable.partition.eof": "false"})
    # librdkafka's default, explicit: with exactly_once workers, records of open or
    # aborted transactions are never read (the end read is the last stable offset)
    conf.setdefault("isolation.level", "read_committed")
    conf.setdefault("auto.offset.reset", "earliest")
    return conf


def assign_from_beginning(
    consumer: Consumer, topics: Sequence[str], *, timeout_s: float = 30.0
) -> dict[tuple[str, int], int]:
    """Assign every partition of ``topics`` from its first offset (no group membership).

    Args:
        consumer: A consumer made with :func:`reader_conf` settings.
        topics: Topics to read.
        timeout_s: Deadline of each metadata / offsets request.

    Returns:
        ``(topic, partition)`` -> listed high watermark (a lower bound of the end on
        Tansu; 0 for an empty partition), for :func:`read_assigned_to_end`.

    Raises:
        ConfigError: A topic does not exist.
        TransientError: The broker did not answer.
    """
    ends: dict[tuple[str, int], int] = {}
    assignment = []
    for topic in topics:
        for p, (lo, hi) in _end_offsets(consumer, topic, timeout_s).items():
            ends[(topic, p)] = hi if hi > lo else 0
            assignment.append(TopicPartition(topic, p, OFFSET_BEGINNING))
    consumer.assign(assignment)
    return ends


def read_assigned_to_end(
    consumer: Consumer, listed: Mapping[tuple[str, int], int], *, timeout_s: float = 60.0
) -> Iterator[Message]:
    """Read the partitions assigned by :func:`assign_from_beginning` up to their ends.

    The end of a partition is the larger of the ``ListOffsets`` high watermark and the
    high watermark of the first fetch response: the embedded Tansu broker answers
    ``ListOffsets`` with the base offset of the last *batch* plus one, which is short of
    the true end whenever that batch holds several records; its fetch responses carry the
    true end. Every record consumed is yielded, also one written after the read began
    that came in the same fetch (so a live consumer loses nothing); the read stops once
    every partition reached its end.

    Args:
        consumer: The consumer (left open and assigned).
        listed: From :func:`assign_from_beginning`.
        timeout_s: Deadline of the whole read.

    Yields:
        Records (tombstones included), in offset order within each partition.

    Raises:
        TransientError: The end was not reached before the deadline, or a record error.
    """
    deadline = time.monotonic() + timeout_s
    # (topic, partition) -> end offset; None until the first fetch response told the end
    todo: dict[tuple[str, int], int | None] = {tp: None for tp, hi in listed.items() if hi > 0}
    while todo:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransientError(
                f"reading to the end timed out after {timeout_s}s; not done "
                f"((topic, partition): end offset): {dict(sorted(todo.items()))}"
            )
        # what is fetched already, else wait for one record: a read that waited for a
        # full batch spent its whole timeout on the last, partial one of every read
        msgs = consumer.consume(1000, timeout=0) or consumer.consume(1, min(left, 0.5))
        for msg in msgs:
            err = msg.error()
            if err is not None:
                raise TransientError(f"reading {msg.topic()}: {err.str()}")
            topic, p, off = msg.topic(), msg.partition(), msg.offset()
            if topic is None or p is None or off is None:
                continue
            key = (topic, p)
            if key in todo and todo[key] is None:
                _, fetched = consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
                todo[key] = max(listed[key], int(fetched))
            end = todo.get(key)
            if end is not None and off + 1 >= end:
                del todo[key]
            yield msg
        if not msgs and todo:
            # Compaction can leave a gap at the end, and a transaction's control records
            # (or an aborted transaction) are never delivered: the position says we are
            # past them. A partition that delivered nothing has only the listed end (the
            # last stable offset for a read_committed reader; on Tansu records arrive).
            for tp in consumer.position([TopicPartition(t, p) for t, p in todo]):
                key = (tp.topic, tp.partition)
                end = todo.get(key)
                if end is None:
                    end = listed[key]
                if tp.offset >= end:
                    del todo[key]


def _end_offsets(consumer: Consumer, topic: str, timeout_s: float) -> dict[int, tuple[int, int]]:
    """Partition -> (low, high) watermark of every partition of ``topic``."""
    try:
        md = consumer.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        raise TransientError(f"cannot read metadata of {topic}: {exc.args[0].str()}") from exc
    tm = md.topics.get(topic)
    if tm is None or tm.error is not None or not tm.partitions:
        why = tm.error.str() if tm is not None and tm.error is not None else "no partitions"
        raise ConfigError(f"topic {topic!r} cannot be read: {why}")
    out: dict[int, tuple[int, int]] = {}
    for p in sorted(tm.partitions):
        try:
            lo, hi = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout_s, cached=False
            )
        except KafkaException as exc:
            raise TransientError(
                f"cannot read the offsets of {topic}[{p}]: {exc.args[0].str()}"
            ) from exc
        out[p] = (int(lo), int(hi))
    return out
