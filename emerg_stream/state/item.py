"""The state of one item: what the worker needs to score it and to warm it up."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from emerg_stream.state.dedupe import RecentIds
from emerg_stream.state.phases import COLD, OLD

Float32Array = npt.NDArray[np.float32]


@dataclass(slots=True)
class ItemTask:
    """One item's task state (the in-memory form of an ``ItemState`` record).

    Args:
        item_id: The item id.
        categorical: Item side categorical features (field -> token).
        multi: Item side multi-valued features (field -> tokens).
        numeric: Item side numeric features (field -> value).
        phase: ``cold``, ``warm_a``, ``warm_b``, ``warm_c``, ``common``, or ``old`` (an
            item of the checkpoint's training set: scored with trained params, no φ here).
        version: Version of the latest published params (0 = none: old items).
        support_size: Interactions applied so far.
        next_threshold: Support size at which the next update runs.
        support: The rows applied since the last threshold, oldest first (at most K),
            each a schemaless Avro ``SupportRow`` (compact; decoded only for an update).
        recent: Recent event ids, for de-duplication.
        adjacency: Raw graph A_i, float32 ``[F*F]`` row-major (``None`` for old items).
        id_embedding: ID embedding e_i, float32 ``[D]`` (``None`` for old items).
        last_offsets: ``(topic, partition)`` -> offset of the last input record applied.
        updated_time: Milliseconds since the epoch of the last change.
    """

    item_id: str
    categorical: dict[str, str] = field(default_factory=dict)
    multi: dict[str, list[str]] = field(default_factory=dict)
    numeric: dict[str, float] = field(default_factory=dict)
    phase: str = COLD
    version: int = 0
    support_size: int = 0
    next_threshold: int = 0
    support: list[bytes] = field(default_factory=list)
    recent: RecentIds = field(default_factory=lambda: RecentIds(1000))
    adjacency: Float32Array | None = None
    id_embedding: Float32Array | None = None
    last_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    updated_time: int = 0

    @property
    def is_old(self) -> bool:
        """Whether the item belongs to the checkpoint's training set."""
        return self.phase == OLD

    @property
    def n_fields(self) -> int:
        """F, from the adjacency size (0 without params)."""
        if self.adjacency is None:
            return 0
        return round(float(np.sqrt(self.adjacency.size)))

    def set_params(self, adjacency: Float32Array, id_embedding: Float32Array) -> None:
        """Store φ as compact float32 copies (``[F*F]`` and ``[D]``)."""
        self.adjacency = np.ascontiguousarray(adjacency, dtype=np.float32).reshape(-1).copy()
        self.id_embedding = np.ascontiguousarray(id_embedding, dtype=np.float32).reshape(-1).copy()
