"""The processor's checkpoint: changed item states, partition marks, offsets to commit.

What the commit pipeline (:mod:`emerg_stream.stream.commit`) writes after the batch's
outputs: per changed partition its changed items' ``ItemState`` values (each made to fit
the changelog's record limit), then its mark, and the input offsets to commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from emerg_stream.errors import ModelError
from emerg_stream.state import ItemTask
from emerg_stream.state.item import SupportRows
from emerg_stream.stream.checkpointing import MARK_KEY, PartitionMark
from emerg_stream.stream.envelope import Outbound
from emerg_stream.stream.processor_base import ProcessorBase

__all__ = ["CheckpointRecords", "Checkpointing"]

log = structlog.get_logger(__name__)


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


class Checkpointing(ProcessorBase):
    """The checkpoint of the processor's state (what changed since the last one)."""

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
