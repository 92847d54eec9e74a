"""Replay a historical log into the stream, and read a topic back from beginning to end.

**Log -> topics** (:func:`replay`). The log is cut with the public split
(:func:`~emerg_stream.data.split.split_log`, same N and K as the offline protocol) only
to find the held-out *test* rows, which are left out; every other row becomes an
``Interaction`` (topic ``interactions``). Decisions, so the stream reproduces the
offline protocol exactly:

* **Order.** Global event-time order, ties broken by the row's position in the log
  (file order). The split sorts each item's rows by (time, file order) too, so every new
  item's rows reach the worker in the split's per-item order and its K-row phase chunks
  in the stream are exactly the offline ``warm_a`` / ``warm_b`` / ``warm_c`` rows.
* **Item announcements.** *Every* item (old, new, and items with too few rows for the
  split) gets one ``ItemEvent`` (topic ``items``) at its first appearance, right before
  its first interaction, with the same event time. The worker counts an announced old
  item as ignored-as-old; the announcement still tells it (and rankers) the item's side
  features, which an interaction does not carry. A new item's first row is never a test
  row, so every replayed interaction follows its item's announcement.
* **Event ids** are ``"<dataset>:<row index in the log>"``: deterministic, so running
  the replay twice produces the same ids and the worker drops the second copy.
* **Keys** are the item id (both topics; co-partitioned), values Confluent-framed Avro.
* **Times.** The log's integer time is converted to milliseconds (``time_unit``); with a
  ``speed`` factor the wall-clock gap between two records is their event-time gap divided
  by the factor (``None`` = as fast as possible).
* **Bounded.** It sends the plan once and returns after the producer is flushed;
  ``limit`` stops after that many interactions. The producer is idempotent
  (``enable.idempotence``), so retries inside one run never duplicate.

Feature values travel in the records' ``categorical`` / ``multi`` / ``numeric`` maps,
keyed by column name; a null value is left out of its map (unknown).

**Topic -> records** (:func:`read_to_end`): assign every partition of a topic from its
beginning, read up to its end when the read started, stop. Bounded by that end and by
a deadline; used by the stream evaluation and the ranker's catch-up.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from emerg_stream.data.log import ColumnSpec, InteractionLog
from emerg_stream.data.split import PARTS, split_log
from emerg_stream.errors import ConfigError, TransientError
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import Interaction, ItemEvent

__all__ = [
    "PART_NAMES",
    "ROW_COLUMN",
    "TIME_UNITS_MS",
    "ReplayCounts",
    "ReplayPlan",
    "assign_from_beginning",
    "event_id",
    "plan_replay",
    "read_assigned_to_end",
    "read_to_end",
    "reader_conf",
    "replay",
    "replay_records",
]

log = structlog.get_logger(__name__)

#: Column added to the log while planning: each row's position in the log (file order).
ROW_COLUMN = "__replay_row"
#: Milliseconds per unit of the log's integer time.
TIME_UNITS_MS: Mapping[str, float] = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}
TimeUnit = Literal["s", "ms", "us", "ns"]

#: Names of the values of :attr:`ReplayPlan.part`.
PART_NAMES: Mapping[int, str] = {**dict(enumerate(PARTS)), -1: "dropped"}

#: Rows converted to Python values at a time (bounds memory on large logs).
_CHUNK_ROWS = 20_000


def event_id(dataset: str, row: int) -> str:
    """The deterministic event id of log row ``row``: ``"<dataset>:<row>"``."""
    return f"{dataset}:{row}"


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay sends, in order (no Kafka involved; see the module docstring).

    Args:
        log: The log (with :data:`ROW_COLUMN` added).
        order: ``[R']`` log rows to send as interactions, in send order (test rows left out).
        announce: ``[R']`` bool, True where the row is its item's first row in ``order``
            (an ``ItemEvent`` goes right before it).
        part: ``[R]`` per log row: 0 old, 1 warm_a, 2 warm_b, 3 warm_c, 4 test, -1 item
            dropped by the split (too few rows).
        n: The split's N.
        k: The split's K.
    """

    log: InteractionLog
    order: npt.NDArray[np.int64]
    announce: npt.NDArray[np.bool_]
    part: npt.NDArray[np.int8]
    n: int
    k: int

    @property
    def n_interactions(self) -> int:
        """Interactions the plan sends."""
        return len(self.order)

    @property
    def n_items(self) -> int:
        """Item announcements the plan sends."""
        return int(self.announce.sum())

    @property
    def n_test(self) -> int:
        """Held-out test rows left out."""
        return int(np.count_nonzero(self.part == 4))


def plan_replay(ilog: InteractionLog, n: int | None = None, k: int | None = None) -> ReplayPlan:
    """Order a log for replay and find the held-out test rows to leave out.

    Args:
        ilog: The interaction log.
        n: The split's N (default ``ilog.n``): must be the offline protocol's.
        k: The split's K (default ``ilog.k``).

    Returns:
        The plan.

    Raises:
        ConfigError: Bad N / K, or the log already has a :data:`ROW_COLUMN` column.
        DataError: Null item ids or timestamps.
    """
    table = ilog.table
    if ROW_COLUMN in table.column_names:
        raise ConfigError(f"the log already has a column named {ROW_COLUMN!r}")
    rows = table.num_rows
    table = table.append_column(ROW_COLUMN, pa.array(np.arange(rows, dtype=np.int64)))
    tagged = InteractionLog(ilog.name, table, ilog.schema, ilog.n, ilog.k, dict(ilog.sources))
    split = split_log(tagged, n, k)
    part = np.full(rows, -1, dtype=np.int8)
    for value, name in enumerate(PARTS):
        idx = np.asarray(split.part(name).column(ROW_COLUMN).combine_chunks(), dtype=np.int64)
        part[idx] = value
    ts = np.asarray(table.column(ilog.schema.timestamp).combine_chunks(), dtype=np.int64)
    order = np.lexsort((np.arange(rows, dtype=np.int64), ts)).astype(np.int64)
    order = order[part[order] != PARTS.index("test")]
    codes = np.asarray(
        pc.dictionary_encode(table.column(ilog.schema.item_id).combine_chunks()).indices,
        dtype=np.int64,
    )
    announce = np.zeros(len(order), dtype=bool)
    _, first = np.unique(codes[order], return_index=True)
    announce[first] = True
    return ReplayPlan(tagged, order, announce, part, split.n, split.k)


def _features(
    specs: tuple[ColumnSpec, ...], columns: Mapping[str, list[Any]], i: int
) -> tuple[dict[str, str], dict[str, list[str]], dict[str, float]]:
    """The three feature maps of row ``i`` of a chunk (nulls and non-finite values left out)."""
    cat: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    num: dict[str, float] = {}
    for spec in specs:
        value = columns[spec.name][i]
        if value is None:
            continue
        if spec.kind == "categorical":
            cat[spec.name] = str(value)
        elif spec.kind == "multi":
            multi[spec.name] = [str(t) for t in value if t is not None]
        elif math.isfinite(float(value)):
            num[spec.name] = float(value)
    return cat, multi, num


Record = tuple[Literal["item", "interaction"], str, ItemEvent | Interaction]


def replay_records(
    plan: ReplayPlan,
    *,
    time_unit: TimeUnit = "s",
    limit: int | None = None,
) -> Iterator[Record]:
    """The plan's records in send order: ``(kind, key, record)``.

    Args:
        plan: From :func:`plan_replay`.
        time_unit: Unit of the log's integer time (converted to milliseconds).
        limit: Stop after this many interactions (their announcements included).

    Yields:
        ``("item", item_id, ItemEvent)`` right before the first
        ``("interaction", item_id, Interaction)`` of each item.

    Raises:
        ConfigError: Unknown ``time_unit``.
    """
    if time_unit not in TIME_UNITS_MS:
        raise ConfigError(f"unknown time unit {time_unit!r}; use one of {sorted(TIME_UNITS_MS)}")
    scale = TIME_UNITS_MS[time_unit]
    schema = plan.log.schema
    names = [
        ROW_COLUMN,
        schema.item_id,
        schema.user_id,
        schema.label,
        schema.timestamp,
        *(c.name for c in schema.features),
    ]
    order = plan.order if limit is None else plan.order[: max(limit, 0)]
    for start in range(0, len(order), _CHUNK_ROWS):
        idx = order[start : start + _CHUNK_ROWS]
        chunk = plan.log.table.select(names).take(pa.array(idx))
        cols = {name: chunk.column(name).to_pylist() for name in names}
        for i in range(len(idx)):
            item_id = str(cols[schema.item_id][i])
            t_ms = int(cols[schema.timestamp][i] * scale)
            if plan.announce[start + i]:
                cat, multi, num = _features(schema.item_features, cols, i)
                item: ItemEvent = {
                    "item_id": item_id,
                    "categorical": cat,
                    "multi": multi,
                    "numeric": num,
                    "event_time": t_ms,
                }
                yield "item", item_id, item
            cat, multi, num = _features(schema.user_features, cols, i)
            label = cols[schema.label][i]
            interaction: Interaction = {
                "event_id": event_id(plan.log.name, int(cols[ROW_COLUMN][i])),
                "item_id": item_id,
                "user_id": str(cols[schema.user_id][i]),
                "categorical": cat,
                "multi": multi,
                "numeric": num,
                "label": 1 if label else 0,
                "event_time": t_ms,
            }
            yield "interaction", item_id, interaction


@dataclass
class ReplayCounts:
    """What a replay did.

    Args:
        items: ``ItemEvent`` records delivered.
        interactions: ``Interaction`` records delivered.
        test_rows_left_out: Held-out test rows not sent.
        failed: Records the broker did not acknowledge (0 after a successful replay).
        seconds: Wall time.
        end_offsets: ``(topic, partition)`` -> offset after the last record this replay
            wrote there (from the acknowledgements). A consumer that committed these
            offsets has seen the whole replay; unlike a watermark query this is exact on
            every broker (Tansu's ``ListOffsets`` is not, see :func:`read_to_end`).
    """

    items: int = 0
    interactions: int = 0
    test_rows_left_out: int = 0
    failed: int = 0
    seconds: float = 0.0
    end_offsets: dict[tuple[str, int], int] = field(default_factory=dict)


def replay(
    ilog: InteractionLog,
    producer_conf: Mapping[str, str],
    items_topic: str,
    interactions_topic: str,
    *,
    n: int | None = None,
    k: int | None = None,
    speed: float | None = None,
    limit: int | None = None,
    time_unit: TimeUnit = "s",
    progress: bool = False,
    stop: threading.Event | None = None,
    flush_timeout_s: float = 60.0,
) -> ReplayCounts:
    """Replay a log into the items and interactions topics (see the module docstring).

    Args:
        ilog: The interaction log.
        producer_conf: librdkafka settings (``KafkaSettings.as_librdkafka()``); the
            replay adds ``enable.idempotence=true`` and ``acks=all``.
        items_topic: Topic of ``ItemEvent`` records.
        interactions_topic: Topic of ``Interaction`` records.
        n: The split's N (default ``ilog.n``).
        k: The split's K (default ``ilog.k``).
        speed: ``None`` = as fast as possible; else event-time gaps are divided by it.
        limit: Stop after this many interactions.
        time_unit: Unit of the log's integer time.
        progress: Show a tqdm progress bar (on stderr).
        stop: Set it to stop early (e.g. on Ctrl-C); what was sent is still flushed.
        flush_timeout_s: Longest wait for the last acknowledgements.

    Returns:
        The counts of delivered records.

    Raises:
        ConfigError: ``speed`` not positive, bad N / K or time unit.
        TransientError: Records not acknowledged by the broker (the message says how many
            and the first error); re-running the replay is safe (the worker de-duplicates).
    """
    if speed is not None and not speed > 0:
        raise ConfigError(f"replay speed must be a positive factor, got {speed}")
    t0 = time.perf_counter()
    plan = plan_replay(ilog, n, k)
    total = plan.n_interactions if limit is None else min(limit, plan.n_interactions)
    conf = dict(producer_conf)
    conf.update({"enable.idempotence": "true", "acks": "all"})
    conf.setdefault("linger.ms", "20")
    producer = Producer(conf)
    item_serde = AvroSerde(ItemEvent, topic=items_topic)
    inter_serde = AvroSerde(Interaction, topic=interactions_topic)
    counts = ReplayCounts(test_rows_left_out=plan.n_test)
    errors: list[str] = []

    def delivered(kind: str) -> Callable[[KafkaError | None, Message], None]:
        def callback(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                counts.failed += 1
                if len(errors) < 3:
                    errors.append(f"{msg.topic()}: {err.str()}")
                return
            if kind == "item":
                counts.items += 1
            else:
                counts.interactions += 1
            topic, part, off = msg.topic(), msg.partition(), msg.offset()
            if topic is not None and part is not None and off is not None:
                key = (topic, part)
                counts.end_offsets[key] = max(counts.end_offsets.get(key, 0), off + 1)

        return callback

    on_item, on_interaction = delivered("item"), delivered("interaction")
    bar = _progress(total, progress, ilog.name)
    first_t: int | None = None
    wall0 = time.monotonic()
    # Flushed outside any except/finally block: confluent-kafka's flush fails with a
    # SystemError when it runs while a KeyboardInterrupt is being handled.
    failure: BaseException | None = None
    try:
        for kind, key, record in replay_records(plan, time_unit=time_unit, limit=limit):
            if stop is not None and stop.is_set():
                log.info("replay_stopped", sent=bar.n)
                break
            if speed is not None:
                first_t = record["event_time"] if first_t is None else first_t
                due = wall0 + (record["event_time"] - first_t) / 1000.0 / speed
                _sleep_until(due, producer, stop)
            if kind == "item":
                value = item_serde.encode(record)
                _produce(producer, items_topic, key, value, on_item)
            else:
                value = inter_serde.encode(cast(Interaction, record))
                _produce(producer, interactions_topic, key, value, on_interaction)
                bar.update(1)
    except BaseException as exc:  # re-raised below, after the flush (Ctrl-C included)
        failure = exc
    bar.close()
    left = producer.flush(5.0 if failure is not None else flush_timeout_s)
    if failure is not None:
        log.info("replay_interrupted", sent=bar.n, unacknowledged=left, error=repr(failure))
        raise failure
    counts.seconds = round(time.perf_counter() - t0, 3)
    log.info(
        "replay_done",
        dataset=ilog.name,
        items=counts.items,
        interactions=counts.interactions,
        test_rows_left_out=counts.test_rows_left_out,
        failed=counts.failed,
        seconds=counts.seconds,
    )
    if left or counts.failed:
        raise TransientError(
            f"replay of {ilog.name}: {counts.failed} records failed and {left} were not "
            f"acknowledged within {flush_timeout_s}s (first errors: {errors}); re-running "
            "the replay is safe, the worker drops duplicates by event id"
        )
    return counts


def _produce(
    producer: Producer,
    topic: str,
    key: str,
    value: bytes,
    callback: Callable[[KafkaError | None, Message], None],
) -> None:
    """Produce one record, waiting for room in the local queue when it is full."""
    while True:
        try:
            producer.produce(topic, value=value, key=key.encode(), on_delivery=callback)
        except BufferError:
            producer.poll(0.05)
            continue
        producer.poll(0)
        return


def _sleep_until(due: float, producer: Producer, stop: threading.Event | None) -> None:
    """Wait until the monotonic time ``due``, serving delivery callbacks meanwhile."""
    while True:
        left = due - time.monotonic()
        if left <= 0 or (stop is not None and stop.is_set()):
            return
        producer.poll(min(left, 0.1))


class _NoBar:
    n = 0

    def update(self, k: int) -> None:
        self.n += k

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, name: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"replay {name}", unit="ev", smoothing=0.1)


# --- reading a topic back ------------------------------------------------------------


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
