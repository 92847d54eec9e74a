"""Outcome counters (every input record ends in exactly one) and Prometheus metrics.

:class:`OutcomeCounts` is the plain dataclass the worker exposes and checkpoints; the
Prometheus side (:class:`WorkerMetrics`) mirrors it as ``emerg_worker_records_total``
with ``topic`` and ``outcome`` labels, plus the items-in-state gauge, batch-update and
checkpoint latency histograms and the params published per phase. Each worker gets its
own registry, so several workers can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = [
    "APPLIED",
    "DEAD_LETTERED",
    "DUPLICATE",
    "IGNORED_OLD_ITEM",
    "OUTCOMES",
    "ROLES",
    "OutcomeCounts",
    "WorkerMetrics",
]

APPLIED = "applied"
DUPLICATE = "duplicate"
DEAD_LETTERED = "dead_lettered"
IGNORED_OLD_ITEM = "ignored_old_item"
#: The outcomes of an input record; each record gets exactly one.
OUTCOMES: tuple[str, ...] = (APPLIED, DUPLICATE, DEAD_LETTERED, IGNORED_OLD_ITEM)
#: The input roles (topics) that are counted.
ROLES: tuple[str, ...] = ("items", "interactions")


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
            "Latency of a checkpoint (changelog produce + flush + offset commit).",
            registry=self.registry,
        )
        self.params_published = Counter(
            "emerg_worker_params_published",
            "ItemParams versions published, by phase.",
            ["phase"],
            registry=self.registry,
        )
        for role in ROLES:
            for outcome in OUTCOMES:
                self.records.labels(topic=role, outcome=outcome)

    def count(self, role: str, outcome: str, n: int = 1) -> None:
        """Mirror an outcome count."""
        self.records.labels(topic=role, outcome=outcome).inc(n)

    def serve(self, port: int) -> int:
        """Serve ``/metrics`` on ``127.0.0.1:port`` from a daemon thread.

        Returns:
            The port served (useful with ``port=0``).
        """
        server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop serving (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
