"""The in-memory form of an interaction log, shared by every dataset reader.

A reader turns its files into an :class:`InteractionLog`: one pyarrow table with one row
per interaction, the item and user feature columns already joined in, and a
:class:`LogSchema` that says which column is what. Everything downstream (the split,
the feature encoder, the replay job) reads only this form, so the model never sees a
dataset's own field names.

Column conventions of ``InteractionLog.table``:

* ``schema.item_id`` / ``schema.user_id``: ``string`` (ids are strings everywhere,
  also on the wire).
* ``schema.label``: ``int8`` 0/1.
* ``schema.timestamp``: ``int64`` seconds (or any monotone integer time); readers
  without real time (none of ours) would have to say so.
* a ``categorical`` feature: ``string`` (nullable; null means unknown).
* a ``multi`` feature: ``list<string>`` (already split; empty list or null = unknown).
* a ``numeric`` feature: ``float64`` (nullable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa

FeatureKind = Literal["categorical", "multi", "numeric"]
Side = Literal["item", "user"]


@dataclass(frozen=True)
class ColumnSpec:
    """One feature column of a log.

    Args:
        name: Column name in the table.
        kind: ``categorical``, ``multi`` (a list of tokens) or ``numeric``.
        side: ``item`` or ``user``.
        max_len: For ``multi``: tokens kept per row (the rest are dropped).
    """

    name: str
    kind: FeatureKind
    side: Side
    max_len: int = 1


@dataclass(frozen=True)
class LogSchema:
    """Which column of an interaction table plays which role.

    ``item_features`` and ``user_features`` exclude the id columns themselves: the
    feature encoder always puts the item id first and the user id first among the
    user fields.
    """

    item_id: str
    user_id: str
    label: str
    timestamp: str
    item_features: tuple[ColumnSpec, ...]
    user_features: tuple[ColumnSpec, ...]

    @property
    def features(self) -> tuple[ColumnSpec, ...]:
        """Item features first, then user features (the model's field order, ids aside)."""
        return self.item_features + self.user_features


@dataclass
class InteractionLog:
    """A whole dataset as one table plus its schema and provenance.

    Args:
        name: Dataset name, e.g. ``"ml-1m-u2999"``.
        table: One row per interaction (see the module docstring for column types).
        schema: The roles of the columns.
        n: The split's N (items with more than N rows are old items).
        k: The split's K (rows per warm-up phase).
        sources: Input file path -> sha256, for the split manifest.
    """

    name: str
    table: pa.Table
    schema: LogSchema
    n: int
    k: int
    sources: dict[str, str] = field(default_factory=dict)
