"""The processor's state and the helpers every stage shares (see :mod:`.processor`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from emerg_stream.config import InputSettings, TopicSettings
from emerg_stream.errors import ModelError
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import Interaction, ItemParams, Prediction
from emerg_stream.phases import WarmupSchedule
from emerg_stream.state import ItemTask, StateStore
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.stream import dlq
from emerg_stream.stream.checkpointing import PartitionProgress, SuspectNote
from emerg_stream.stream.decode import RecordDecoder, Rejected
from emerg_stream.stream.envelope import Inbound, Outbound
from emerg_stream.stream.handler import ItemFeatures, WarmupHandler
from emerg_stream.stream.limits import OutputLimits
from emerg_stream.stream.metrics import (
    DEAD_LETTERED,
    OutcomeCounts,
    SlidingAUC,
    WorkerMetrics,
)
from emerg_stream.stream.pending import PendingBuffer
from emerg_stream.stream.shadow import PRIMARY, SHADOW, check_shadow
from emerg_stream.topic_roles import INPUT_ROLES

__all__ = ["BatchSummary", "Key", "ProcessorBase"]

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
    shadow_predictions: int = 0


@dataclass
class _Queued:
    msg: Inbound
    rec: Interaction


class ProcessorBase:
    """State, pending buffer, counters and shared helpers of :class:`.WarmupProcessor`."""

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
        shadow: WarmupHandler | None = None,
    ) -> None:
        if shadow is not None:
            check_shadow(handler, shadow)
        self.handler = handler
        #: The shadow method (:mod:`emerg_stream.stream.shadow`), or None.
        self.shadow = shadow
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
        #: The same for the shadow method's predictions (None without a shadow).
        self.shadow_auc = None if shadow is None else SlidingAUC(auc_window)
        #: Restored items whose shadow φ belonged to another shadow checkpoint (dropped).
        self.shadow_dropped = 0
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
        self._publish_auc()

    def use_limits(self, limits: OutputLimits) -> None:
        """Size dead letters and item states to the topics' record limits (read at start)."""
        self.limits = limits
        self.dead = dlq.DeadLetters(self.topics.dead_letter, limits.dead_letter)

    # -- shared helpers --------------------------------------------------------------

    @property
    def partitions(self) -> list[int]:
        """Partitions held."""
        return sorted(self.progress)

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
                "method": self.handler.layout.method,
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

    def _publish_auc(self) -> None:
        """The prequential AUC gauges, one per method (``role`` primary / shadow)."""
        if self.metrics is None:
            return
        self.metrics.set_auc(self.auc, method=self.handler.layout.method, role=PRIMARY)
        if self.shadow is not None and self.shadow_auc is not None:
            self.metrics.set_auc(self.shadow_auc, method=self.shadow.layout.method, role=SHADOW)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.items_in_state.set(len(self.store))
            self.metrics.pending.set(len(self.pending))


def _features(task: ItemTask) -> ItemFeatures:
    return ItemFeatures(task.item_id, *task.side_features())
