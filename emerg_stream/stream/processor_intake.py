"""Intake of a batch: screening, item announcements and routing of interactions.

Steps 2 and 3 of :mod:`emerg_stream.stream.processor`: records refused before decoding
(poison pills, oversize), bad event times, new / old / re-announced items with their
batched cold start, and interactions routed to their item's queue (de-duplicated), to
the old items' scoring, or to the pending buffer.
"""

from __future__ import annotations

import structlog

from emerg_stream.io.records import Interaction, ItemEvent
from emerg_stream.phases import COLD, OLD
from emerg_stream.state import ItemTask, RecentIds, dedupe
from emerg_stream.state.item import encode_side
from emerg_stream.stream import dlq
from emerg_stream.stream.decode import Rejected
from emerg_stream.stream.envelope import Inbound, Outbound
from emerg_stream.stream.metrics import (
    APPLIED,
    CONFLICTING_EVENT,
    CONFLICTING_ITEM,
    DUPLICATE,
    IGNORED_OLD_ITEM,
)
from emerg_stream.stream.pending import PendingEntry
from emerg_stream.stream.processor_base import BatchSummary, Key, ProcessorBase, _features, _Queued

__all__ = ["Intake"]

log = structlog.get_logger(__name__)


class Intake(ProcessorBase):
    """Screening, items and routing (steps 2 and 3 of the batch)."""

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
            features = [_features(t) for t in tasks]
            params = self.handler.cold_start(features)
            if self.shadow is not None:  # the shadow's φ⁰ (published nowhere, kept in state)
                shadow = self.shadow.cold_start(features)
                for i, task in enumerate(tasks):
                    task.set_shadow_params(
                        shadow.adjacency[i], shadow.id_embedding[i], self.shadow.model_version
                    )
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
                    self._event_conflict(p, msg, rec, task, out, summary)
                    continue
                part.touch(task.item_id)
                queues.setdefault(key, []).append(_Queued(msg, rec))
        return queues, old_rows

    def _event_conflict(
        self,
        p: int,
        msg: Inbound,
        rec: Interaction,
        task: ItemTask,
        out: list[Outbound],
        summary: BatchSummary,
    ) -> None:
        """An event id already applied to the item with other content: dead-lettered."""
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
