"""Replay a historical log into the stream: the log's rows become item and click records.

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

Reading a topic back is :mod:`emerg_stream.stream.reader`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import structlog
from confluent_kafka import (
    KafkaError,
    Message,
    Producer,
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
    "event_id",
    "plan_replay",
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
    counts = ReplayCounts(test_rows_left_out=plan.n_test)
    errors: list[str] = []
    items_out = (
        items_topic,
        AvroSerde(ItemEvent, topic=items_topic),
        _on_delivery(counts, errors, "item"),
    )
    clicks_out = (
        interactions_topic,
        AvroSerde(Interaction, topic=interactions_topic),
        _on_delivery(counts, errors, "interaction"),
    )
    bar = _progress(total, progress, ilog.name)
    # Flushed outside any except/finally block: confluent-kafka's flush fails with a
    # SystemError when it runs while a KeyboardInterrupt is being handled.
    failure: BaseException | None = None
    try:
        _send(plan, producer, items_out, clicks_out, time_unit, limit, speed, stop, bar)
    except BaseException as exc:  # re-raised below, after the flush (Ctrl-C included)
        failure = exc
    bar.close()
    left = producer.flush(5.0 if failure is not None else flush_timeout_s)
    if failure is not None:
        log.info("replay_interrupted", sent=bar.n, unacknowledged=left, error=repr(failure))
        raise failure
    counts.seconds = round(time.perf_counter() - t0, 3)
    _check_done(ilog.name, counts, left, errors, flush_timeout_s)
    return counts


#: Where one kind of record goes: topic, serializer, delivery callback.
_Out = tuple[str, AvroSerde[Any], Callable[[KafkaError | None, Message], None]]


def _on_delivery(
    counts: ReplayCounts, errors: list[str], kind: str
) -> Callable[[KafkaError | None, Message], None]:
    """A delivery callback counting ``kind``'s records into ``counts`` (first 3 errors kept)."""

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


def _send(
    plan: ReplayPlan,
    producer: Producer,
    items_out: _Out,
    clicks_out: _Out,
    time_unit: TimeUnit,
    limit: int | None,
    speed: float | None,
    stop: threading.Event | None,
    bar: Any,
) -> None:
    """Produce the plan's records in order, paced by ``speed``, until done or ``stop``."""
    first_t: int | None = None
    wall0 = time.monotonic()
    for kind, key, record in replay_records(plan, time_unit=time_unit, limit=limit):
        if stop is not None and stop.is_set():
            log.info("replay_stopped", sent=bar.n)
            break
        if speed is not None:
            first_t = record["event_time"] if first_t is None else first_t
            due = wall0 + (record["event_time"] - first_t) / 1000.0 / speed
            _sleep_until(due, producer, stop)
        if kind == "item":
            topic, serde, callback = items_out
            _produce(producer, topic, key, serde.encode(record), callback)
        else:
            topic, serde, callback = clicks_out
            _produce(producer, topic, key, serde.encode(cast(Interaction, record)), callback)
            bar.update(1)


def _check_done(
    name: str, counts: ReplayCounts, left: int, errors: list[str], flush_timeout_s: float
) -> None:
    """Log the counts; raise when records failed or were not acknowledged."""
    log.info(
        "replay_done",
        dataset=name,
        items=counts.items,
        interactions=counts.interactions,
        test_rows_left_out=counts.test_rows_left_out,
        failed=counts.failed,
        seconds=counts.seconds,
    )
    if left or counts.failed:
        raise TransientError(
            f"replay of {name}: {counts.failed} records failed and {left} were not "
            f"acknowledged within {flush_timeout_s}s (first errors: {errors}); re-running "
            "the replay is safe, the worker drops duplicates by event id"
        )


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
