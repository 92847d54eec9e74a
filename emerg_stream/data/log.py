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
from typing import Literal, cast

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


def schema_to_dict(schema: LogSchema) -> dict[str, object]:
    """A :class:`LogSchema` as plain JSON-able values (for manifests and checkpoints).

    Args:
        schema: The schema to serialise.

    Returns:
        A dict of str/int/list values that :func:`schema_from_dict` turns back.
    """

    def cols(specs: tuple[ColumnSpec, ...]) -> list[dict[str, object]]:
        return [
            {"name": c.name, "kind": c.kind, "side": c.side, "max_len": c.max_len} for c in specs
        ]

    return {
        "item_id": schema.item_id,
        "user_id": schema.user_id,
        "label": schema.label,
        "timestamp": schema.timestamp,
        "item_features": cols(schema.item_features),
        "user_features": cols(schema.user_features),
    }


def schema_from_dict(data: object) -> LogSchema:
    """Rebuild a :class:`LogSchema` written by :func:`schema_to_dict`.

    Args:
        data: The dict (e.g. read from JSON or from a checkpoint).

    Returns:
        The schema.

    Raises:
        ValueError: ``data`` is not a valid serialised schema (callers wrap it in the
            error of their context: a manifest, a checkpoint).
    """
    if not isinstance(data, dict):
        raise ValueError(f"a log schema must be a dict, got {type(data).__name__}")
    roles: dict[str, str] = {}
    for key in ("item_id", "user_id", "label", "timestamp"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"log schema: '{key}' must be a non-empty string, got {value!r}")
        roles[key] = value

    def cols(key: str, side: str) -> tuple[ColumnSpec, ...]:
        raw = data.get(key, [])
        if not isinstance(raw, list):
            raise ValueError(f"log schema: '{key}' must be a list")
        out: list[ColumnSpec] = []
        for i, c in enumerate(raw):
            if not isinstance(c, dict):
                raise ValueError(f"log schema: {key}[{i}] must be a dict")
            name, kind, c_side, max_len = (
                c.get("name"),
                c.get("kind"),
                c.get("side"),
                c.get("max_len"),
            )
            if not isinstance(name, str) or not name:
                raise ValueError(f"log schema: {key}[{i}].name must be a non-empty string")
            if kind not in ("categorical", "multi", "numeric"):
                raise ValueError(f"log schema: {key}[{i}].kind {kind!r} is not a feature kind")
            if c_side != side:
                raise ValueError(f"log schema: {key}[{i}].side must be {side!r}, got {c_side!r}")
            if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
                raise ValueError(f"log schema: {key}[{i}].max_len must be an int >= 1")
            out.append(
                ColumnSpec(
                    name=name,
                    kind=cast(FeatureKind, kind),
                    side=cast(Side, side),
                    max_len=max_len,
                )
            )
        return tuple(out)

    return LogSchema(
        item_id=roles["item_id"],
        user_id=roles["user_id"],
        label=roles["label"],
        timestamp=roles["timestamp"],
        item_features=cols("item_features", "item"),
        user_features=cols("user_features", "user"),
    )
