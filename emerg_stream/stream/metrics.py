"""Outcome counters (every input record ends in exactly one) and Prometheus metrics.

:class:`OutcomeCounts` is the plain dataclass the worker exposes and checkpoints; the
Prometheus side (:class:`WorkerMetrics`) mirrors it as ``emerg_worker_records_total``
with ``topic`` and ``outcome`` labels, plus the items-in-state gauge, batch-update and
checkpoint latency histograms and the params published per phase, the consumer lag per
input partition and the prequential AUC over a sliding window of the latest labelled
predictions (:class:`SlidingAUC`, numpy only). Each worker gets its own registry, so
several workers can live in one process (tests).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from emerg_stream.auc import roc_auc
from emerg_stream.topic_roles import INPUT_ROLES

__all__ = [
    "APPLIED",
    "CONFLICTING_EVENT",
    "CONFLICTING_ITEM",
    "DEAD_LETTERED",
    "DUPLICATE",
    "IGNORED_OLD_ITEM",
    "OUTCOMES",
    "ROLES",
    "OutcomeCounts",
    "SlidingAUC",
    "WorkerMetrics",
]

APPLIED = "applied"
DUPLICATE = "duplicate"
DEAD_LETTERED = "dead_lettered"
IGNORED_OLD_ITEM = "ignored_old_item"
#: An ItemEvent re-announcing a known item with other side features (docs/ERROR_KINDS.md).
CONFLICTING_ITEM = "conflicting_item"
#: An interaction reusing an applied event id with other content.
CONFLICTING_EVENT = "conflicting_event"
#: The outcomes of an input record; each record gets exactly one.
OUTCOMES: tuple[str, ...] = (
    APPLIED,
    DUPLICATE,
    DEAD_LETTERED,
    IGNORED_OLD_ITEM,
    CONFLICTING_ITEM,
    CONFLICTING_EVENT,
)
#: The input roles (topics) that are counted (from the role table).
ROLES: tuple[str, ...] = INPUT_ROLES


def _zero() -> dict[str, int]:
    return dict.fromkeys(OUTCOMES, 0)


@dataclass
class OutcomeCounts:
    """Records per input role and outcome.

    Args:
        items: Outcome -> count for the items topic.
        interactions: Outcome -> count for the interactions topic.
    """

    items: dict[str, int] = field(default_factory=_zero)
    interactions: dict[str, int] = field(default_factory=_zero)

    def add(self, role: str, outcome: str, n: int = 1) -> None:
        """Count ``n`` records of ``role`` with ``outcome``.

        Raises:
            ValueError: Unknown role or outcome.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.of(role)[outcome] += n

    def of(self, role: str) -> dict[str, int]:
        """The counts of one role.

        Raises:
            ValueError: Unknown role.
        """
        if role == "items":
            return self.items
        if role == "interactions":
            return self.interactions
        raise ValueError(f"unknown role {role!r}")

    def total(self, role: str) -> int:
        """Records of ``role`` counted, all outcomes."""
        return sum(self.of(role).values())

    def merge(self, other: OutcomeCounts) -> None:
        """Add ``other``'s counts to these."""
        for role in ROLES:
            for k, v in other.of(role).items():
                self.of(role)[k] += v

    def to_dict(self) -> dict[str, dict[str, int]]:
        """JSON form."""
        return {"items": dict(self.items), "interactions": dict(self.interactions)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutcomeCounts:
        """Inverse of :meth:`to_dict` (missing outcomes count 0; unknown ones raise)."""
        out = cls()
        for role in ROLES:
            for k, v in dict(d.get(role, {})).items():
                out.add(role, str(k), int(v))
        return out


class SlidingAUC:
    """ROC AUC of the latest ``window`` labelled predictions (a ring buffer, numpy only).

    Prequential: each prediction was made with the params in force *before* its
    interaction was applied, so this is the quality a ranker saw. ``value()`` sorts the
    window once (``O(w log w)``, about a millisecond for 10,000); call it once per batch.

    Args:
        window: Predictions kept (the oldest drop out first).
    """

    def __init__(self, window: int = 10_000) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2, got {window}")
        self.window = window
        self._scores = np.zeros(window, dtype=np.float64)
        self._labels = np.zeros(window, dtype=np.bool_)
        self._next = 0
        self._filled = 0

    def __len__(self) -> int:
        return self._filled

    def add(self, scores: ArrayLike, labels: ArrayLike) -> None:
        """Append predictions (``scores[i]`` for a record labelled ``labels[i]`` in {0, 1})."""
        s = np.asarray(scores, dtype=np.float64).ravel()[-self.window :]
        y = np.asarray(labels).ravel()[-self.window :] > 0
        if s.shape != y.shape:
            raise ValueError(f"{s.size} scores but {y.size} labels")
        idx = (self._next + np.arange(s.size)) % self.window
        self._scores[idx] = s
        self._labels[idx] = y
        self._next = (self._next + s.size) % self.window
        self._filled = min(self.window, self._filled + s.size)

    def value(self) -> float | None:
        """AUC of the window (:func:`~emerg_stream.auc.roc_auc`, ties count one half).

        ``None`` without both labels, or while a non-finite score is in the window.
        """
        auc = roc_auc(self._labels[: self._filled], self._scores[: self._filled])
        return None if math.isnan(auc) else auc


class WorkerMetrics:
    """The worker's Prometheus metrics in a registry of its own.

    Args:
        registry: Where to register (default: a fresh one).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._server: Any = None
        self.records = Counter(
            "emerg_worker_records",
            "Input records by topic role and outcome (each record exactly one outcome).",
            ["topic", "outcome"],
            registry=self.registry,
        )
        self.items_in_state = Gauge(
            "emerg_worker_items_in_state", "Items held in the state store.", registry=self.registry
        )
        self.pending = Gauge(
            "emerg_worker_pending_interactions",
            "Interactions waiting for their item's announcement.",
            registry=self.registry,
        )
        self.batch_update = Histogram(
            "emerg_worker_batch_update_seconds",
            "Latency of one batched warm-up update (all items crossing in a round).",
            registry=self.registry,
        )
        self.checkpoint = Histogram(
            "emerg_worker_checkpoint_seconds",
            "Time a batch waits in a checkpoint stage: the flush of what was produced "
            "before it, the offset commit and the changelog produce (the broker's "
            "acknowledgements mostly arrived while the batch was processed).",
            registry=self.registry,
        )
        self.params_published = Counter(
            "emerg_worker_params_published",
            "ItemParams versions published, by phase.",
            ["phase"],
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "emerg_worker_consumer_lag",
            "Records not yet consumed per assigned input partition (fetched high watermark "
            "minus position), updated once per batch: how far the worker is *behind*. "
            "Pending orphans never count here (the position moves past them); what they "
            "hold back of the committed offset is emerg_worker_pending_held_records.",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.prequential_auc = Gauge(
            "emerg_worker_prequential_auc",
            "ROC AUC of the latest labelled predictions (sliding window; NaN until both "
            "labels were seen), updated once per batch; per method: role primary, and "
            "role shadow for a shadow method's predictions (docs/DEPLOYMENT.md).",
            ["method", "role"],
            registry=self.registry,
        )
        self.prequential_window = Gauge(
            "emerg_worker_prequential_window",
            "Labelled predictions in the prequential AUC window, per method and role.",
            ["method", "role"],
            registry=self.registry,
        )
        self.pending_held = Gauge(
            "emerg_worker_pending_held",
            "Interactions waiting for their item's announcement, per input partition: they "
            "hold the partition's committed offset back (by design) without the worker "
            "being behind.",
            ["partition"],
            registry=self.registry,
        )
        self.pending_held_records = Gauge(
            "emerg_worker_pending_held_records",
            "Records between the committed offset and the worker's position of an "
            "interactions partition, held back by pending orphans (the part of the group's "
            "committed-offset lag that is waiting, not being behind).",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.pending_oldest_age = Gauge(
            "emerg_worker_pending_oldest_age_seconds",
            "Event-time age of the oldest pending orphan of a partition, against its item "
            "clock (it expires at EMERG_PENDING_MAX_AGE_MS).",
            ["partition"],
            registry=self.registry,
        )
        self._held_labels: set[str] = set()
        self.rows_dropped = Counter(
            "emerg_worker_support_rows_dropped",
            "Oldest support rows dropped to keep an item state within the changelog's record "
            "size limit (0 unless a topic limit was lowered under a running configuration).",
            registry=self.registry,
        )
        self.outputs_refused = Counter(
            "emerg_worker_outputs_refused",
            "Output records the producer or broker refused for good (e.g. too large), by "
            "topic and error; the worker logs each and goes on.",
            ["topic", "error"],
            registry=self.registry,
        )
        self.commit_retries = Counter(
            "emerg_worker_commit_retries",
            "Partitions whose offset commit failed and was retried.",
            registry=self.registry,
        )
        self._lag_labels: set[tuple[str, str]] = set()
        for role in ROLES:
            for outcome in OUTCOMES:
                self.records.labels(topic=role, outcome=outcome)

    def count(self, role: str, outcome: str, n: int = 1) -> None:
        """Mirror an outcome count."""
        self.records.labels(topic=role, outcome=outcome).inc(n)

    def set_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """Set the lag of each ``(topic, partition)``; partitions no longer held are removed."""
        now = set()
        for (topic, p), lag in lags.items():
            labels = (topic, str(p))
            now.add(labels)
            self.consumer_lag.labels(*labels).set(lag)
        for labels in self._lag_labels - now:
            self.consumer_lag.remove(*labels)
        self._lag_labels = now

    def set_held(self, topic: str, held: Mapping[int, tuple[int, int, int]]) -> None:
        """Set the pending-orphan gauges of every partition (others are removed).

        ``held``: partition -> (orphans pending, records held back, oldest age in ms), as
        :meth:`~emerg_stream.stream.processor.WarmupProcessor.held` returns it.
        """
        now = set()
        for p, (n, records, age_ms) in held.items():
            label = str(p)
            now.add(label)
            self.pending_held.labels(label).set(n)
            self.pending_held_records.labels(topic, label).set(records)
            self.pending_oldest_age.labels(label).set(age_ms / 1000)
        for label in self._held_labels - now:
            self.pending_held.remove(label)
            self.pending_held_records.remove(topic, label)
            self.pending_oldest_age.remove(label)
        self._held_labels = now

    def set_auc(self, auc: SlidingAUC, *, method: str, role: str = "primary") -> None:
        """Publish a method's window AUC (NaN while undefined) and size.

        Args:
            auc: The window.
            method: The checkpoint's method (``emerg``, ``deepfm`` ...).
            role: ``primary``, or ``shadow`` for the shadow method's predictions.
        """
        value = auc.value()
        self.prequential_auc.labels(method=method, role=role).set(
            float("nan") if value is None else value
        )
        self.prequential_window.labels(method=method, role=role).set(len(auc))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread.

        Args:
            port: TCP port (0 picks a free one).
            host: Address to bind (``0.0.0.0`` inside a container, where a proxy or the
                pod network must reach it).

        Returns:
            The port served (useful with ``port=0``).
        """
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop serving (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
