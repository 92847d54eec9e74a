"""The handler protocol: what the stream asks of the model (``serving`` implements it).

The stream never imports torch. It hands the model plain values (item side features,
interaction records, numpy arrays of φ) and gets numpy back. Everything is batched:
one cold-start call for all new items of a micro-batch, one scoring call per round and
one warm-up call per round for all items that crossed a threshold in it. A
:class:`BatchSession` keeps the φ of the batch's items on the model's device between
those calls, so only the params that get published cross back to the host.

Array conventions: I items, B rows, F fields, D = embedding size.

* adjacency: float32 ``[I, G*G]`` (row-major G x G, the raw generator output A_i; G = F
  for a method with an item graph, 0 without one: :class:`~emerg_stream.methods.PhiLayout`);
* id_embedding: float32 ``[I, D]``;
* slots: int64 ``[B]`` positions into the session's item list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from emerg_stream.io.records import SupportRow
from emerg_stream.methods import PhiLayout

__all__ = [
    "BatchSession",
    "FieldInfo",
    "ItemFeatures",
    "ParamsArrays",
    "WarmupHandler",
]


@dataclass(frozen=True, slots=True)
class ItemFeatures:
    """An item's id and side features, as the ``items`` topic carries them."""

    item_id: str
    categorical: Mapping[str, str]
    multi: Mapping[str, Sequence[str]]
    numeric: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """A feature column of the model, for validating records without the model.

    Args:
        name: Column name (the key in a record's feature maps).
        side: ``item`` or ``user``.
        kind: ``categorical``, ``multi`` or ``numeric`` (which map it travels in).
    """

    name: str
    side: Literal["item", "user"]
    kind: Literal["categorical", "multi", "numeric"]


@dataclass(frozen=True, slots=True)
class ParamsArrays:
    """φ of several items, in the stream's two slots (see :mod:`emerg_stream.methods`).

    Args:
        adjacency: float32 ``[I, G*G]`` (``[I, 0]`` for a method without an item graph).
        id_embedding: float32 ``[I, D]``.
    """

    adjacency: npt.NDArray[np.float32]
    id_embedding: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return int(self.adjacency.shape[0])

    @classmethod
    def zeros(cls, n: int, layout: PhiLayout) -> ParamsArrays:
        """Placeholders for ``n`` items (e.g. items whose φ the session computes)."""
        return cls(
            np.zeros((n, layout.adjacency_size), dtype=np.float32),
            np.zeros((n, layout.dim), dtype=np.float32),
        )


class BatchSession(Protocol):
    """φ of one micro-batch's items, on the model's device, for scoring and updating."""

    def score(
        self, slots: npt.NDArray[np.int64], rows: Sequence[SupportRow]
    ) -> npt.NDArray[np.float64]:
        """Click probabilities ``[B]`` of ``rows`` under the current φ of their items.

        Args:
            slots: ``[B]`` item of each row (position in the session's items).
            rows: ``[B]`` interactions (user id and user side features; labels unused).
        """
        ...

    def update(self, slots: npt.NDArray[np.int64], support: Sequence[Sequence[SupportRow]]) -> None:
        """One warm-up phase for several items at once, in place.

        Args:
            slots: ``[U]`` distinct items to update.
            support: ``[U]`` lists of each item's support rows (labels used).
        """
        ...

    def params(self, slots: npt.NDArray[np.int64]) -> ParamsArrays:
        """Current φ of ``slots`` copied to the host."""
        ...


class WarmupHandler(Protocol):
    """The model side of the worker (see the module docstring)."""

    @property
    def model_version(self) -> str:
        """Version of the checkpoint; published params carry it."""
        ...

    @property
    def n_fields(self) -> int:
        """F."""
        ...

    @property
    def layout(self) -> PhiLayout:
        """How the checkpoint's φ travels in the stream (its method, the slots' sizes)."""
        ...

    @property
    def dim(self) -> int:
        """D, the ID embedding size."""
        ...

    @property
    def k(self) -> int:
        """Rows per warm-up phase (the split's K the checkpoint was made for)."""
        ...

    @property
    def old_item_ids(self) -> frozenset[str]:
        """Items the checkpoint was trained on (scored with trained params, not warmed up)."""
        ...

    @property
    def fields(self) -> Sequence[FieldInfo]:
        """The feature columns, ids excluded."""
        ...

    def cold_start(self, items: Sequence[ItemFeatures]) -> ParamsArrays:
        """φ⁰ of new items in one batched call (depends only on id and side features)."""
        ...

    def open_batch(
        self,
        items: Sequence[ItemFeatures],
        params: ParamsArrays,
        trained: npt.NDArray[np.bool_],
    ) -> BatchSession:
        """Put the φ of a batch's items on the device.

        Args:
            items: ``[I]`` the items (their side features are part of every row).
            params: ``[I]`` current φ; rows where ``trained`` is set are ignored.
            trained: ``[I]`` items that use the checkpoint's trained params (old items).
        """
        ...
