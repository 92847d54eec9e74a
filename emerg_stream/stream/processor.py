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

from collections.abc import Mapping, Sequence

from emerg_stream.errors import ModelError
from emerg_stream.state import ItemTask
from emerg_stream.stream import dlq
from emerg_stream.stream.checkpointing import PartitionMark, PartitionProgress, SuspectNote
from emerg_stream.stream.decode import Rejected
from emerg_stream.stream.envelope import Inbound, Outbound
from emerg_stream.stream.metrics import OutcomeCounts
from emerg_stream.stream.processor_base import BatchSummary
from emerg_stream.stream.processor_checkpoint import Checkpointing, CheckpointRecords
from emerg_stream.stream.processor_intake import Intake
from emerg_stream.stream.processor_rounds import Rounds

__all__ = ["BatchSummary", "CheckpointRecords", "WarmupProcessor"]


class WarmupProcessor(Intake, Rounds, Checkpointing):
    """State, pending buffer, counters and the batch logic (see the module docstring).

    The stages live in rooms of their own and are composed here: the state and shared
    helpers in :mod:`.processor_base`, screening, items and routing in
    :mod:`.processor_intake`, the prequential rounds in :mod:`.processor_rounds`, the
    checkpoint in :mod:`.processor_checkpoint`.

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
        shadow: A second checkpoint scored on the same clicks (see
            :mod:`emerg_stream.stream.shadow`); refused at construction
            (:class:`~emerg_stream.errors.ConfigError`) if it does not fit ``handler``.
    """

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
        """Refuse a restored item of another model shape, or one past its threshold.

        Shadow φ of another shadow checkpoint than this worker's (or of a shadow no
        longer run) is dropped, not refused: the primary's state is valid either way.
        """
        if task.has_shadow:
            shadow, adj, emb = self.shadow, task.shadow_adjacency, task.shadow_id_embedding
            if (
                shadow is None
                or adj is None
                or emb is None
                or task.shadow_model_version != shadow.model_version
                or not shadow.layout.fits(adj.size, emb.size)
            ):
                task.clear_shadow()
                self.shadow_dropped += 1
        adjacency, id_embedding = task.adjacency, task.id_embedding
        if adjacency is not None and (
            id_embedding is None or not self.handler.layout.fits(adjacency.size, id_embedding.size)
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

    def totals(self) -> OutcomeCounts:
        """Counters summed over the held partitions (since their beginning)."""
        out = OutcomeCounts()
        for prog in self.progress.values():
            out.merge(prog.counts)
        return out

    # -- the batch -------------------------------------------------------------------

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
        if summary.predictions:
            self._publish_auc()
        return out, summary
