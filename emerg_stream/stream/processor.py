"""The worker's logic between poll and produce, without Kafka: one micro-batch at a time.

:meth:`WarmupProcessor.process` takes the consumed records of a batch and returns the
records to produce; :meth:`WarmupProcessor.checkpoint` returns the changelog records and
the offsets to commit. In between it owns the item states, the pending buffer and the
counters. Per batch:

1. **Decode** every record (failures become dead letters). Records below a restored
   partition mark are skipped (already applied before a restart or rebalance).
2. **Items** (all ``ItemEvent`` of the batch first, in offset order per partition): an
   unknown new item gets a state; an old item (one of the checkpoint's training set) gets
   a state holding its side features only; a re-announced item is a duplicate. All new
   items get φ⁰ in ONE batched ``cold_start`` call and version 1 (phase ``cold``) is
   published. Interactions that waited for an announced item are released.
3. **Interactions** in offset order per partition: an unknown item's interaction waits
   in the pending buffer; an old item's is scored only (``ignored_old_item``); a new
   item's is de-duplicated by event id (per-item bounded window) and queued.
4. **Rounds** (strict prequential order): each round takes, for every item, its queued
   interactions up to its next threshold; ONE scoring call scores all of them with the
   params in force *before* they are applied (predictions); they are appended to the
   support buffers; ONE ``update`` call runs the warm-up of every item that reached its
   threshold (thresholds K, 2K, 3K, then every K: :class:`~emerg_stream.phases.WarmupSchedule`),
   and each gets a new params version. Items with more queued interactions continue in
   the next round with their new params.
5. **Expiry**: pending interactions older than the age bound (measured against the
   partition's item stream time) are dead-lettered (``unknown_item``), as are those
   evicted by the count bound.

Every input record ends in exactly one counted outcome (``applied``, ``duplicate``,
``dead_lettered``, ``ignored_old_item``), except those still pending, which are counted
when they leave the buffer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog

from emerg_stream.config import InputSettings, TopicSettings
from emerg_stream.errors import ModelError
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import Interaction, ItemEvent, ItemParams, Prediction
from emerg_stream.phases import COLD, OLD, WarmupSchedule
from emerg_stream.state import ItemTask, RecentIds, StateStore, dedupe
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.state.item import SupportRows, encode_side
from emerg_stream.stream import dlq
from emerg_stream.stream.checkpointing import (
    MARK_KEY,
    PartitionMark,
    PartitionProgress,
    SuspectNote,
)
from emerg_stream.stream.decode import RecordDecoder, Rejected
from emerg_stream.stream.envelope import Inbound, Outbound
from emerg_stream.stream.handler import (
    BatchSession,
    ItemFeatures,
    ParamsArrays,
    WarmupHandler,
)
from emerg_stream.stream.limits import OutputLimits
from emerg_stream.stream.metrics import (
    APPLIED,
    CONFLICTING_EVENT,
    CONFLICTING_ITEM,
    DEAD_LETTERED,
    DUPLICATE,
    IGNORED_OLD_ITEM,
    OutcomeCounts,
    SlidingAUC,
    WorkerMetrics,
)
from emerg_stream.stream.pending import PendingBuffer, PendingEntry
from emerg_stream.topic_roles import INPUT_ROLES

__all__ = ["BatchSummary", "CheckpointRecords", "WarmupProcessor"]

log = structlog.get_logger(__name__)

Key = tuple[int, str]  # (partition, item id)


@dataclass
class BatchSummary:
    """What one batch did (for the per-batch log line and the tests)."""

    records: int = 0
    skipped: int = 0
    new_items: int = 0
    counts: OutcomeCounts = field(default_factory=OutcomeCounts)
    pending: int = 0
    rounds: int = 0
    updated_items: int = 0
    predictions: int = 0
    params: dict[str, int] = field(default_factory=dict)
    update_s: float = 0.0


@dataclass
class CheckpointRecords:
    """What one checkpoint writes.

    Args:
        records: Changelog records: per partition the changed items, then the mark.
        offsets: ``(topic, partition)`` -> offset to commit.
        marks: Partition -> the mark written.
        items: Item states written.
        state_bytes: Bytes of those item states (framed values).
    """

    records: list[Outbound] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    marks: dict[int, PartitionMark] = field(default_factory=dict)
    items: int = 0
    state_bytes: int = 0


@dataclass
class _Queued:
    msg: Inbound
    rec: Interaction


class WarmupProcessor:
    """State, pending buffer, counters and the batch logic (see the module docstring).

    Args:
        handler: The model side.
        topics: Topic names.
        dedupe_window: Event ids remembered per item.
        pending_max: Interactions waiting for their item, in total.
        pending_max_age_ms: Event-time age after which a waiting interaction expires.
        metrics: Prometheus mirror of the counters (optional).
        auc_window: Labelled predictions in the prequential AUC window (``self.auc``).
        clock: Wall clock in seconds (for produced/updated times and the event-time bound).
        inputs: Bounds on input records (sizes, clocks, the item conflict policy).
        limits: Record size limits of the changelog and dead-letter topics.
    """

    def __init__(
        self,
        handler: WarmupHandler,
        topics: TopicSettings,
        *,
        dedupe_window: int,
        pending_max: int,
        pending_max_age_ms: int,
        metrics: WorkerMetrics | None = None,
        auc_window: int = 10_000,
        clock: Callable[[], float] = time.time,
        inputs: InputSettings | None = None,
        limits: OutputLimits | None = None,
    ) -> None:
        self.handler = handler
        self.topics = topics
        self.schedule = WarmupSchedule(handler.k)
        self.old_ids = handler.old_item_ids
        self.dedupe_window = dedupe_window
        self.metrics = metrics
        self.clock = clock
        self.store = StateStore()
        self.progress: dict[int, PartitionProgress] = {}
        self.pending = PendingBuffer(pending_max, pending_max_age_ms)
        #: Outcomes counted by this process (the partitions' totals are in ``progress``).
        self.counts = OutcomeCounts()
        #: Prequential AUC of the latest labelled predictions (published once per batch).
        self.auc = SlidingAUC(auc_window)
        self.codec = ItemStateCodec(dedupe_window=dedupe_window, topic=topics.changelog)
        self.inputs = InputSettings() if inputs is None else inputs
        self.decoder = RecordDecoder(
            handler.fields,
            items_topic=topics.items,
            interactions_topic=topics.interactions,
            max_string_bytes=self.inputs.max_string_bytes,
        )
        self.limits = OutputLimits()
        self.dead = dlq.DeadLetters(topics.dead_letter)
        self.use_limits(OutputLimits() if limits is None else limits)
        #: Partition -> the records of the batch a previous run crashed on (poison pills).
        self.suspects: dict[int, SuspectNote] = {}
        #: Support rows dropped to keep an item state within the changelog's record limit.
        self.rows_dropped = 0
        self.params_serde: AvroSerde[ItemParams] = AvroSerde(ItemParams, topic=topics.item_params)
        self.pred_serde: AvroSerde[Prediction] = AvroSerde(Prediction, topic=topics.predictions)
        self._roles = {topics.name(role): role for role in INPUT_ROLES}
        #: Called inside every batched update, between the inner loop and storing its
        #: params (the worker's fault-injection point ``mid_update``).
        self.on_update: Callable[[], None] | None = None

    def use_limits(self, limits: OutputLimits) -> None:
        """Size dead letters and item states to the topics' record limits (read at start)."""
        self.limits = limits
        self.dead = dlq.DeadLetters(self.topics.dead_letter, limits.dead_letter)

    # -- partitions ------------------------------------------------------------------

    def assign(
        self,
        partition: int,
        items: Mapping[str, ItemTask],
        mark: PartitionMark | None,
        suspect: SuspectNote | None = None,
    ) -> dict[str, int | None]:
        """Take over a partition with its restored items and last mark.

        Restored items may still be raw changelog values (an :class:`ItemMap` from
        :func:`~emerg_stream.stream.changelog.restore_partitions`): they are checked
        (params shape, threshold) when first decoded, the decoded ones here. ``suspect``
        (the poison-pill guard's note) names records a previous run crashed on: they are
        dead-lettered ``poison_pill`` when read again instead of being processed.

        Returns:
            Role -> offset to start reading at (``None``: the committed offset).

        Raises:
            ModelError: The restored state belongs to another model version or shape (a
                raw item's shape raises when it is first looked up).
        """
        if mark is not None and mark.model_version != self.handler.model_version:
            raise ModelError(
                f"changelog partition {partition} holds state of model version "
                f"{mark.model_version}, this worker runs {self.handler.model_version}: use a "
                f"fresh changelog topic (EMERG_TOPICS__CHANGELOG) for a new checkpoint"
            )
        part = self.store.add_partition(partition, items)
        for task in part.items.decoded():
            self._check_restored(task)
        part.items.add_check(self._check_restored)
        prog = PartitionProgress(partition) if mark is None else PartitionProgress.from_mark(mark)
        self.progress[partition] = prog
        if suspect is not None:
            self.suspects[partition] = suspect
        else:
            self.suspects.pop(partition, None)
        self._gauges()
        return prog.start_offsets()

    def _check_restored(self, task: ItemTask) -> None:
        """Refuse a restored item of another model shape, or one past its threshold."""
        adjacency, id_embedding = task.adjacency, task.id_embedding
        if adjacency is not None and (
            adjacency.size != self.handler.n_fields**2
            or id_embedding is None
            or id_embedding.size != self.handler.dim
        ):
            raise ModelError(f"restored item {task.item_id!r} has params of another shape")
        if not task.is_old and task.support_size >= task.next_threshold:
            raise ModelError(f"restored item {task.item_id!r} is past its threshold")

    def revoke(self, partition: int) -> None:
        """Drop a partition's items, progress and pending interactions.

        Pending interactions are not counted: the partition's next owner reads them again.
        """
        self.store.drop_partition(partition)
        self.progress.pop(partition, None)
        self.suspects.pop(partition, None)
        self.pending.drop_partition(partition)
        self._gauges()

    @property
    def partitions(self) -> list[int]:
        """Partitions held."""
        return sorted(self.progress)

    def totals(self) -> OutcomeCounts:
        """Counters summed over the held partitions (since their beginning)."""
        out = OutcomeCounts()
        for prog in self.progress.values():
            out.merge(prog.counts)
        return out

    # -- the batch -------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def _count(self, p: int, role: str, outcome: str, summary: BatchSummary) -> None:
        self.progress[p].counts.add(role, outcome)
        self.counts.add(role, outcome)
        summary.counts.add(role, outcome)
        if self.metrics is not None:
            self.metrics.count(role, outcome)

    def _dead(
        self, msg: Inbound, role: str, why: Rejected, out: list[Outbound], summary: BatchSummary
    ) -> None:
        out.append(self.dead.record(msg, why.kind, why.message, self._now()))
        self._count(msg.partition, role, DEAD_LETTERED, summary)

    def _screen(self, msg: Inbound, role: str) -> Rejected | None:
        """Why a record is refused before decoding: a poison pill, or over the size bound."""
        note = self.suspects.get(msg.partition)
        if note is not None and msg.offset in note.offsets.get(role, ()):
            return Rejected(
                dlq.POISON_PILL,
                f"in the batch the worker crashed on ({note.error}); dead-lettered instead "
                f"of crashing again",
            )
        size = len(msg.key or b"") + len(msg.value or b"")
        if size > self.inputs.max_value_bytes:
            return Rejected(
                dlq.OVERSIZE,
                f"record of {size:,} bytes (key + value) is over the bound of "
                f"{self.inputs.max_value_bytes:,} (EMERG_INPUTS__MAX_VALUE_BYTES); not decoded",
            )
        return None

    def _bad_time(self, event_time: int, clock: int | None) -> Rejected | None:
        """An event time too far ahead of the wall clock or of the partition's item clock."""
        now = self._now()
        ahead = self.inputs.max_ahead_of_wall_ms
        if event_time > now + ahead:
            return Rejected(
                dlq.BAD_EVENT_TIME,
                f"event time {event_time} is {event_time - now:,} ms ahead of the worker's "
                f"clock ({now}), over EMERG_INPUTS__MAX_AHEAD_OF_WALL_MS={ahead} "
                f"(milliseconds since the epoch expected; microseconds?)",
            )
        jump = self.inputs.max_ahead_of_clock_ms
        if clock and jump and event_time > clock + jump:
            return Rejected(
                dlq.BAD_EVENT_TIME,
                f"event time {event_time} is {event_time - clock:,} ms ahead of the "
                f"partition's item clock ({clock}), over "
                f"EMERG_INPUTS__MAX_AHEAD_OF_CLOCK_MS={jump}",
            )
        return None

    def process(self, batch: Sequence[Inbound]) -> tuple[list[Outbound], BatchSummary]:
        """Process one micro-batch (see the module docstring).

        Returns:
            The records to produce (params, predictions, dead letters), in order, and a
            summary of the batch.
        """
        summary = BatchSummary(records=len(batch))
        out: list[Outbound] = []
        items_in: dict[int, list[Inbound]] = {}
        inter_in: dict[int, list[Inbound]] = {}
        for msg in batch:
            prog = self.progress.get(msg.partition)
            role = self._roles.get(msg.topic)
            if prog is None or role is None:
                summary.skipped += 1  # not ours (a stale record around a rebalance)
                continue
            if role == "interactions" and prog.skips(msg.offset):
                summary.skipped += 1
                prog.advance(role, msg.offset)
                continue
            prog.advance(role, msg.offset)
            why = self._screen(msg, role)
            if why is not None:
                self._dead(msg, role, why, out, summary)
                continue
            (items_in if role == "items" else inter_in).setdefault(msg.partition, []).append(msg)

        released = self._items(items_in, out, summary)
        queues, old_rows = self._route(inter_in, released, out, summary)
        self._rounds(queues, old_rows, out, summary)
        for p in set(items_in) | set(inter_in):
            for entry in self.pending.expire(p, self.progress[p].items_time):
                why = Rejected(
                    dlq.UNKNOWN_ITEM,
                    f"item {entry.record['item_id']!r} was not announced within "
                    f"{self.pending.max_age_ms} ms of event time",
                )
                self._dead(entry.msg, "interactions", why, out, summary)
        summary.pending = len(self.pending)
        self._gauges()
        if self.metrics is not None and summary.predictions:
            self.metrics.set_auc(self.auc)
        return out, summary

    def _items(
        self, items_in: dict[int, list[Inbound]], out: list[Outbound], summary: BatchSummary
    ) -> dict[int, list[PendingEntry]]:
        new: dict[Key, ItemTask] = {}  # cold starts of this batch (new and replaced items)
        released: dict[int, list[PendingEntry]] = {}
        now = self._now()
        for p in sorted(items_in):
            part, prog = self.store.partition(p), self.progress[p]
            for msg in sorted(items_in[p], key=lambda m: m.offset):
                rec = self.decoder.item(msg)
                if isinstance(rec, Rejected):
                    self._dead(msg, "items", rec, out, summary)
                    continue
                bad = self._bad_time(rec["event_time"], prog.items_time)
                if bad is not None:
                    self._dead(msg, "items", bad, out, summary)
                    continue
                prog.observe_item_time(rec["event_time"])
                item_id = rec["item_id"]
                known = part.items.get(item_id)
                if known is not None:
                    self._reannounced(p, msg, rec, known, new, out, summary)
                    continue
                old = item_id in self.old_ids
                task = ItemTask(
                    item_id=item_id,
                    categorical=dict(rec["categorical"]),
                    multi={k: list(v) for k, v in rec["multi"].items()},
                    numeric=dict(rec["numeric"]),
                    phase=OLD if old else COLD,
                    next_threshold=self.schedule.first_threshold,
                    recent=RecentIds(self.dedupe_window),
                    last_offsets={(msg.topic, p): msg.offset},
                    updated_time=now,
                )
                part.items[item_id] = task
                part.touch(item_id)
                self._count(p, "items", IGNORED_OLD_ITEM if old else APPLIED, summary)
                if not old:
                    new[(p, item_id)] = task
                released.setdefault(p, []).extend(self.pending.take(p, item_id))
        if new:
            tasks = list(new.values())
            params = self.handler.cold_start([_features(t) for t in tasks])
            for i, task in enumerate(tasks):
                task.set_params(params.adjacency[i], params.id_embedding[i])
                task.version += 1
                out.append(self._params(task, 0, now))
                summary.params[COLD] = summary.params.get(COLD, 0) + 1
            summary.new_items = len(tasks)
        return released

    def _reannounced(
        self,
        p: int,
        msg: Inbound,
        rec: ItemEvent,
        task: ItemTask,
        new: dict[Key, ItemTask],
        out: list[Outbound],
        summary: BatchSummary,
    ) -> None:
        """A known item announced again: a duplicate, or a conflict (other features)."""
        side = (dict(rec["categorical"]), {k: list(v) for k, v in rec["multi"].items()})
        if task.side_features() == (*side, dict(rec["numeric"])):
            self._count(p, "items", DUPLICATE, summary)
            return
        replace = (
            self.inputs.item_conflict == "replace_cold"
            and not task.is_old
            and task.phase == COLD
            and task.support_size == 0
        )
        if replace:
            task.set_side(encode_side(*side, dict(rec["numeric"])))
            task.last_offsets[(msg.topic, p)] = msg.offset
            task.updated_time = self._now()
            self.store.partition(p).touch(task.item_id)
            new[(p, task.item_id)] = task
            done = "replaced its features; cold-start params re-generated (a new version)"
        else:
            done = "kept the first features and params"
        why = Rejected(
            dlq.CONFLICTING_ITEM,
            f"item {task.item_id!r} re-announced with other side features: {done} "
            f"(EMERG_INPUTS__ITEM_CONFLICT={self.inputs.item_conflict})",
        )
        log.warning(
            "item_conflict", item_id=task.item_id[:200], partition=p, offset=msg.offset, done=done
        )
        out.append(self.dead.record(msg, why.kind, why.message, self._now()))
        self._count(p, "items", CONFLICTING_ITEM, summary)

    def _route(
        self,
        inter_in: dict[int, list[Inbound]],
        released: dict[int, list[PendingEntry]],
        out: list[Outbound],
        summary: BatchSummary,
    ) -> tuple[dict[Key, list[_Queued]], list[tuple[Key, _Queued]]]:
        queues: dict[Key, list[_Queued]] = {}
        old_rows: list[tuple[Key, _Queued]] = []
        for p in sorted(set(inter_in) | set(released)):
            part = self.store.partition(p)
            todo: list[tuple[Inbound, Interaction | None]] = [
                (m, None) for m in inter_in.get(p, [])
            ]
            todo += [(e.msg, e.record) for e in released.get(p, [])]
            todo.sort(key=lambda t: t[0].offset)
            for msg, known in todo:
                rec: Interaction | Rejected = (
                    known if known is not None else self.decoder.interaction(msg)
                )
                if known is None and not isinstance(rec, Rejected):
                    rec = self._check_interaction(msg, rec)
                if isinstance(rec, Rejected):
                    self._dead(msg, "interactions", rec, out, summary)
                    continue
                key = (p, rec["item_id"])
                task = part.items.get(rec["item_id"])
                if task is None and rec["item_id"] not in self.old_ids:
                    for gone in self.pending.add(PendingEntry(msg, rec)):
                        why = Rejected(
                            dlq.UNKNOWN_ITEM,
                            f"item {gone.record['item_id']!r} not announced and the pending "
                            f"buffer is full ({self.pending.max_records} interactions)",
                        )
                        self._dead(gone.msg, "interactions", why, out, summary)
                        self.progress[gone.msg.partition].dirty = True
                    continue
                if task is None or task.is_old:
                    old_rows.append((key, _Queued(msg, rec)))
                    continue
                seen = task.recent.check(rec["event_id"], dedupe.content_digest(rec))
                if seen == dedupe.DUPLICATE:
                    self._count(p, "interactions", DUPLICATE, summary)
                    continue
                if seen == dedupe.CONFLICT:
                    why = Rejected(
                        dlq.CONFLICTING_EVENT,
                        f"event id {rec['event_id'][:200]!r} was already applied to item "
                        f"{task.item_id[:200]!r} with other content; the first one stays",
                    )
                    log.warning(
                        "event_conflict",
                        item_id=task.item_id[:200],
                        event_id=rec["event_id"][:200],
                        partition=p,
                        offset=msg.offset,
                    )
                    out.append(self.dead.record(msg, why.kind, why.message, self._now()))
                    self._count(p, "interactions", CONFLICTING_EVENT, summary)
                    continue
                part.touch(task.item_id)
                queues.setdefault(key, []).append(_Queued(msg, rec))
        return queues, old_rows

    def _check_interaction(self, msg: Inbound, rec: Interaction) -> Interaction | Rejected:
        """The event-time bound and the support-row bound of a decoded interaction."""
        bad = self._bad_time(rec["event_time"], None)
        if bad is not None:
            return bad
        cap = self.inputs.max_support_row_bytes
        if len(msg.value or b"") > cap:
            size = len(self.codec.encode_row(rec))
            if size > cap:
                return Rejected(
                    dlq.OVERSIZE_FIELD,
                    f"its support row is {size:,} bytes, over "
                    f"EMERG_INPUTS__MAX_SUPPORT_ROW_BYTES={cap:,}",
                )
        return rec

    def _rounds(
        self,
        queues: dict[Key, list[_Queued]],
        old_rows: list[tuple[Key, _Queued]],
        out: list[Outbound],
        summary: BatchSummary,
    ) -> None:
        if not queues and not old_rows:
            return
        keys = list(queues)
        tasks = [self.store.partition(p).items[i] for p, i in keys]
        old_keys = list(dict.fromkeys(k for k, _ in old_rows))
        old_slot = {k: len(tasks) + j for j, k in enumerate(old_keys)}
        features = [_features(t) for t in tasks]
        for p, item_id in old_keys:
            task = self.store.get(p, item_id)
            features.append(
                _features(task) if task is not None else ItemFeatures(item_id, {}, {}, {})
            )
        n_new, n_all = len(tasks), len(features)
        params = ParamsArrays.zeros(n_all, self.handler.n_fields, self.handler.dim)
        for j, task in enumerate(tasks):
            if task.adjacency is None or task.id_embedding is None:
                raise ModelError(f"item {task.item_id!r} has no params")
            params.adjacency[j] = task.adjacency
            params.id_embedding[j] = task.id_embedding
        trained = np.zeros(n_all, dtype=np.bool_)
        trained[n_new:] = True
        session = self.handler.open_batch(features, params, trained)
        cursor = [0] * n_new
        first = True
        while True:
            slots: list[int] = []
            rows: list[_Queued] = []
            crossing: list[int] = []
            if first:
                for key, q in old_rows:
                    slots.append(old_slot[key])
                    rows.append(q)
                first = False
            for j, key in enumerate(keys):
                queue, c = queues[key], cursor[j]
                if c >= len(queue):
                    continue
                task = tasks[j]
                room = task.next_threshold - task.support_size
                take = queue[c : c + room]
                cursor[j] = c + len(take)
                slots += [j] * len(take)
                rows += take
                if len(take) == room:
                    crossing.append(j)
            if not rows:
                break
            summary.rounds += 1
            self._score_and_apply(session, slots, rows, tasks, out, summary)
            if crossing:
                self._update(session, crossing, tasks, out, summary)

    def _score_and_apply(
        self,
        session: BatchSession,
        slots: list[int],
        rows: list[_Queued],
        tasks: list[ItemTask],
        out: list[Outbound],
        summary: BatchSummary,
    ) -> None:
        scores = session.score(np.asarray(slots, dtype=np.int64), [q.rec for q in rows])
        self.auc.add(scores, [q.rec["label"] for q in rows])
        now = self._now()
        n_new = len(tasks)
        for slot, q, score in zip(slots, rows, scores.tolist(), strict=True):
            rec, p = q.rec, q.msg.partition
            task = tasks[slot] if slot < n_new else None
            out.append(
                Outbound(
                    self.topics.predictions,
                    rec["item_id"].encode(),
                    self.pred_serde.encode(
                        {
                            "event_id": rec["event_id"],
                            "item_id": rec["item_id"],
                            "user_id": rec["user_id"],
                            "score": float(score),
                            "label": rec["label"],
                            "params_version": 0 if task is None else task.version,
                            "phase": OLD if task is None else task.phase,
                            "event_time": rec["event_time"],
                        }
                    ),
                )
            )
            summary.predictions += 1
            if task is None:
                self._count(p, "interactions", IGNORED_OLD_ITEM, summary)
                continue
            task.support.append(self.codec.encode_row(rec))
            task.support_size += 1
            task.last_offsets[(q.msg.topic, p)] = q.msg.offset
            task.updated_time = now
            self._count(p, "interactions", APPLIED, summary)

    def _update(
        self,
        session: BatchSession,
        crossing: list[int],
        tasks: list[ItemTask],
        out: list[Outbound],
        summary: BatchSummary,
    ) -> None:
        slots = np.asarray(crossing, dtype=np.int64)
        support = [self.codec.decode_rows(tasks[j].support) for j in crossing]
        t0 = time.perf_counter()
        session.update(slots, support)
        if self.on_update is not None:
            self.on_update()
        params = session.params(slots)
        took = time.perf_counter() - t0
        summary.update_s += took
        summary.updated_items += len(crossing)
        if self.metrics is not None:
            self.metrics.batch_update.observe(took)
        now = self._now()
        for i, j in enumerate(crossing):
            task = tasks[j]
            threshold = task.next_threshold
            task.set_params(params.adjacency[i], params.id_embedding[i])
            task.version += 1
            task.phase = self.schedule.phase_at(threshold)
            task.support.clear()
            task.next_threshold = self.schedule.next_threshold(threshold)
            out.append(self._params(task, threshold, now))
            summary.params[task.phase] = summary.params.get(task.phase, 0) + 1

    def _params(self, task: ItemTask, support_size: int, now: int) -> Outbound:
        if task.adjacency is None or task.id_embedding is None:
            raise ModelError(f"item {task.item_id!r} has no params to publish")
        if self.metrics is not None:
            self.metrics.params_published.labels(phase=task.phase).inc()
        value = self.params_serde.encode(
            {
                "item_id": task.item_id,
                "version": task.version,
                "phase": task.phase,
                "support_size": support_size,
                "model_version": self.handler.model_version,
                "n_fields": task.n_fields,
                "adjacency": task.adjacency.tolist(),
                "id_embedding": task.id_embedding.tolist(),
                "source_offsets": [
                    {"topic": t, "partition": p, "offset": o}
                    for (t, p), o in sorted(task.last_offsets.items())
                ],
                "produced_time": now,
            }
        )
        return Outbound(self.topics.item_params, task.item_id.encode(), value)

    # -- checkpoint ------------------------------------------------------------------

    def checkpoint(self) -> CheckpointRecords:
        """Changelog records of what changed since the last call, and offsets to commit.

        Returns:
            Per changed partition its changed items' ``ItemState`` values, then its mark
            (explicit partition = the input partition), and the offsets to commit.
        """
        cp = CheckpointRecords()
        now = self._now()
        for p in self.partitions:
            prog, part = self.progress[p], self.store.partition(p)
            changed = part.take_dirty()
            if not changed and not prog.dirty:
                continue
            for task in changed:
                value = self._fitting_state(task)
                cp.state_bytes += len(value)
                cp.records.append(
                    Outbound(self.topics.changelog, task.item_id.encode(), value, partition=p)
                )
            cp.items += len(changed)
            pending = self.pending.offsets(p)
            mark = prog.mark(self.handler.model_version, pending, now, self.pending.oldest_time(p))
            cp.marks[p] = mark
            cp.records.append(Outbound(self.topics.changelog, MARK_KEY, mark.encode(), partition=p))
            for role, off in prog.commit_offsets(pending).items():
                cp.offsets[(self.topics.name(role), p)] = off
            prog.dirty = False
        return cp

    def _fitting_state(self, task: ItemTask) -> bytes:
        """The framed state of ``task``, its oldest support rows dropped until it fits.

        The start-up check (:func:`~emerg_stream.stream.limits.check_state_fits`) makes
        this a no-op unless a topic's limit was lowered under a running configuration;
        each dropped row is counted (``rows_dropped``, the
        ``emerg_worker_support_rows_dropped_total`` metric) and logged.
        """
        value = self.codec.encode(task)
        budget = self.limits.changelog - len(task.item_id.encode("utf-8"))
        if len(value) <= budget:
            return value
        rows = self.codec.decode_rows(task.support)
        dropped = 0
        while rows and len(value) > budget:
            rows.pop(0)
            dropped += 1
            task.support = SupportRows(self.codec.encode_row(r) for r in rows)
            value = self.codec.encode(task)
        self.rows_dropped += dropped
        if self.metrics is not None:
            self.metrics.rows_dropped.inc(dropped)
        log.warning(
            "support_rows_dropped",
            item_id=task.item_id[:200],
            dropped=dropped,
            kept=len(rows),
            state_bytes=len(value),
            limit=budget,
        )
        if len(value) > budget:
            raise ModelError(
                f"the state of item {task.item_id[:200]!r} is {len(value):,} bytes without "
                f"support rows, over the changelog's record limit {budget:,}"
            )
        return value

    def held(self) -> dict[int, tuple[int, int, int]]:
        """Partition -> (orphans pending, records the commit is held back by, oldest age ms).

        The age is in event time, against the partition's item clock (what the expiry
        bound ``pending_max_age_ms`` is compared with).
        """
        out: dict[int, tuple[int, int, int]] = {}
        for p, prog in self.progress.items():
            pending = self.pending.offsets(p)
            oldest = self.pending.oldest_time(p)
            age = 0 if oldest is None else max(0, prog.items_time - oldest)
            out[p] = (len(pending), prog.held(pending), age)
        return out

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.items_in_state.set(len(self.store))
            self.metrics.pending.set(len(self.pending))


def _features(task: ItemTask) -> ItemFeatures:
    return ItemFeatures(task.item_id, *task.side_features())
