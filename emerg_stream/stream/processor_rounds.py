"""Prequential rounds: score with the params in force, apply, run the batched updates.

Step 4 of :mod:`emerg_stream.stream.processor`: each round takes, for every item, its
queued interactions up to its next threshold (:class:`~emerg_stream.phases.WarmupSchedule`);
ONE scoring call scores all of them; they are appended to the support buffers; ONE
``update`` call runs the warm-up of every item that reached its threshold. With a shadow
method (:mod:`emerg_stream.stream.shadow`) its session scores the same rows before they
are applied and updates the same items at the same thresholds, one call each as well.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from emerg_stream.errors import ModelError
from emerg_stream.io.records import Interaction
from emerg_stream.phases import OLD
from emerg_stream.state import ItemTask
from emerg_stream.stream.envelope import Outbound
from emerg_stream.stream.handler import BatchSession, ItemFeatures, ParamsArrays
from emerg_stream.stream.metrics import APPLIED, IGNORED_OLD_ITEM
from emerg_stream.stream.processor_base import BatchSummary, Key, ProcessorBase, _features, _Queued

__all__ = ["Rounds"]


@dataclass(frozen=True, slots=True)
class _Shadow:
    """The shadow method's session over a batch's items, and the slots it covers."""

    session: BatchSession
    covered: npt.NDArray[np.bool_]


class Rounds(ProcessorBase):
    """The prequential rounds of a batch (step 4)."""

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
        params = ParamsArrays.zeros(n_all, self.handler.layout)
        for j, task in enumerate(tasks):
            if task.adjacency is None or task.id_embedding is None:
                raise ModelError(f"item {task.item_id!r} has no params")
            params.adjacency[j] = task.adjacency
            params.id_embedding[j] = task.id_embedding
        trained = np.zeros(n_all, dtype=np.bool_)
        trained[n_new:] = True
        session = self.handler.open_batch(features, params, trained)
        shadow = self._open_shadow(features, tasks, trained)
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
            self._score_and_apply(session, shadow, slots, rows, tasks, out, summary)
            if crossing:
                self._update(session, shadow, crossing, tasks, out, summary)

    def _open_shadow(
        self, features: list[ItemFeatures], tasks: list[ItemTask], trained: npt.NDArray[np.bool_]
    ) -> _Shadow | None:
        """The shadow's session over the same items (None: no shadow, or nothing to score).

        Items without shadow φ (announced before the shadow started) are left out:
        ``covered`` says which slots the shadow scores and updates.
        """
        if self.shadow is None:
            return None
        covered = trained.copy()  # old items: the shadow's trained params
        params = ParamsArrays.zeros(len(features), self.shadow.layout)
        for j, task in enumerate(tasks):
            adj, emb = task.shadow_adjacency, task.shadow_id_embedding
            if adj is not None and emb is not None:
                params.adjacency[j] = adj
                params.id_embedding[j] = emb
                covered[j] = True
        if not covered.any():
            return None
        return _Shadow(self.shadow.open_batch(features, params, trained), covered)

    def _score_and_apply(
        self,
        session: BatchSession,
        shadow: _Shadow | None,
        slots: list[int],
        rows: list[_Queued],
        tasks: list[ItemTask],
        out: list[Outbound],
        summary: BatchSummary,
    ) -> None:
        at = np.asarray(slots, dtype=np.int64)
        recs = [q.rec for q in rows]
        scores = session.score(at, recs)
        self.auc.add(scores, [r["label"] for r in recs])
        # the shadow scores the same rows before anything is applied (its φ in force)
        shadow_scores: list[float | None] = [None] * len(rows)
        if shadow is not None and self.shadow_auc is not None:
            mine = np.flatnonzero(shadow.covered[at])
            if mine.size:
                got = shadow.session.score(at[mine], [recs[i] for i in mine.tolist()])
                self.shadow_auc.add(got, [recs[i]["label"] for i in mine.tolist()])
                for i, value in zip(mine.tolist(), got.tolist(), strict=True):
                    shadow_scores[i] = value
        now = self._now()
        n_new = len(tasks)
        for slot, q, score, other in zip(slots, rows, scores.tolist(), shadow_scores, strict=True):
            rec, p = q.rec, q.msg.partition
            task = tasks[slot] if slot < n_new else None
            out.append(self._prediction(rec, task, float(score), shadow=False))
            summary.predictions += 1
            if other is not None:
                out.append(self._prediction(rec, task, other, shadow=True))
                summary.shadow_predictions += 1
            if task is None:
                self._count(p, "interactions", IGNORED_OLD_ITEM, summary)
                continue
            task.support.append(self.codec.encode_row(rec))
            task.support_size += 1
            task.last_offsets[(q.msg.topic, p)] = q.msg.offset
            task.updated_time = now
            self._count(p, "interactions", APPLIED, summary)

    def _prediction(
        self, rec: Interaction, task: ItemTask | None, score: float, *, shadow: bool
    ) -> Outbound:
        """A ``Prediction`` record (the primary's, or the shadow's, marked)."""
        handler = self.shadow if shadow and self.shadow is not None else self.handler
        value = self.pred_serde.encode(
            {
                "event_id": rec["event_id"],
                "item_id": rec["item_id"],
                "user_id": rec["user_id"],
                "score": score,
                "label": rec["label"],
                "params_version": 0 if task is None else task.version,
                "phase": OLD if task is None else task.phase,
                "event_time": rec["event_time"],
                "method": handler.layout.method,
                "shadow": shadow,
            }
        )
        return Outbound(self.topics.predictions, rec["item_id"].encode(), value)

    def _update(
        self,
        session: BatchSession,
        shadow: _Shadow | None,
        crossing: list[int],
        tasks: list[ItemTask],
        out: list[Outbound],
        summary: BatchSummary,
    ) -> None:
        slots = np.asarray(crossing, dtype=np.int64)
        support = [self.codec.decode_rows(tasks[j].support) for j in crossing]
        t0 = time.perf_counter()
        session.update(slots, support)
        shadow_slots = np.zeros(0, dtype=np.int64)
        if shadow is not None:  # the same thresholds, the same support rows
            mine = np.flatnonzero(shadow.covered[slots])
            shadow_slots = slots[mine]
            if mine.size:
                shadow.session.update(shadow_slots, [support[i] for i in mine.tolist()])
        if self.on_update is not None:
            self.on_update()
        params = session.params(slots)
        if shadow is not None and shadow_slots.size and self.shadow is not None:
            got = shadow.session.params(shadow_slots)
            version = self.shadow.model_version
            for i, j in enumerate(shadow_slots.tolist()):
                tasks[j].set_shadow_params(got.adjacency[i], got.id_embedding[i], version)
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
