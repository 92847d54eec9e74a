"""FeatureSpec: the fields of the model, their vocabularies and one shared index space.

Field order (the model's order; the model never sees column names):

* field 0: the item id (categorical, side ``item``);
* then the item features, in schema order;
* then the user id (categorical, side ``user``);
* then the user features, in schema order.

All fields share ONE embedding table of ``total_size`` rows. Global row 0 is padding.
Field ``j`` owns rows ``[offset_j, offset_j + size_j)``; offsets start at 1.
A categorical or multi field's size is its vocabulary length, whose local index 0 is
the out-of-vocabulary token ``"<oov>"``; a numeric field has size 1 (one learned vector
``v_j``, scaled by the normalised value).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from emerg_stream.data.log import (
    FeatureKind,
    LogSchema,
    Side,
    schema_from_dict,
    schema_to_dict,
)
from emerg_stream.errors import DataError, ModelError

OOV = "<oov>"
#: Smallest std used to normalise a numeric field (a constant column stays finite).
STD_FLOOR = 1e-6
SPEC_VERSION = 1


@dataclass(frozen=True)
class FieldInfo:
    """One field of the model.

    Args:
        name: The column it reads.
        kind: ``categorical``, ``multi`` or ``numeric``.
        side: ``item`` or ``user``.
        offset: First global row of the shared embedding table owned by the field.
        size: Rows owned (vocabulary length with OOV for categorical/multi; 1 for numeric).
        max_len: Tokens kept per row (1 unless ``multi``).
    """

    name: str
    kind: FeatureKind
    side: Side
    offset: int
    size: int
    max_len: int = 1


@dataclass(frozen=True)
class FeatureSpec:
    """The model's fields, vocabularies and numeric statistics (see the module docstring).

    Args:
        fields: All fields, in model order.
        vocabs: Field name -> local index -> token (index 0 is ``"<oov>"``); for every
            categorical and multi field.
        numeric_stats: Field name -> ``(mean, std)``; for every numeric field.
        schema: The column roles, so records can be encoded by column name.
    """

    fields: tuple[FieldInfo, ...]
    vocabs: dict[str, list[str]]
    numeric_stats: dict[str, tuple[float, float]]
    schema: LogSchema

    @property
    def n_fields(self) -> int:
        """F: the number of fields."""
        return len(self.fields)

    @property
    def n_item_fields(self) -> int:
        """Item fields, the item id included (they come first)."""
        return sum(1 for f in self.fields if f.side == "item")

    @property
    def total_size(self) -> int:
        """Rows of the shared embedding table (padding row 0 included)."""
        last = self.fields[-1]
        return last.offset + last.size

    @property
    def max_tokens(self) -> int:
        """T: the token slots per field (max ``max_len``, at least 1)."""
        return max([1, *(f.max_len for f in self.fields)])

    @cached_property
    def _lookups(self) -> dict[str, pa.Array]:
        """Field name -> arrow vocabulary (for vectorised ``index_in``)."""
        return {name: pa.array(tokens, pa.string()) for name, tokens in self.vocabs.items()}

    def lookup(self, name: str) -> pa.Array:
        """The vocabulary of a categorical/multi field as an arrow string array."""
        return self._lookups[name]

    @classmethod
    def fit(cls, schema: LogSchema, table: pa.Table, min_count: int = 1) -> FeatureSpec:
        """Build vocabularies and numeric statistics from training rows.

        Tokens are ordered by descending frequency, then by token (codepoint order), so
        the same table always gives the same spec. Tokens seen fewer than ``min_count``
        times, and tokens past a multi field's ``max_len``, get no entry (they encode as
        OOV).

        Args:
            schema: The column roles.
            table: Training rows only (the old items' rows): nothing about new items may
                leak into the vocabularies.
            min_count: Minimum occurrences for a token to get its own index.

        Returns:
            The spec.

        Raises:
            DataError: A schema column is missing from ``table`` or has the wrong type, or
                a numeric column holds NaN/inf.
        """
        if min_count < 1:
            raise DataError(f"min_count must be >= 1, got {min_count}")
        layout = _layout(schema)
        names = [name for name, *_ in layout]
        if len(set(names)) != len(names):
            raise DataError(f"the schema names a column twice: {names}")
        vocabs: dict[str, list[str]] = {}
        stats: dict[str, tuple[float, float]] = {}
        fields: list[FieldInfo] = []
        offset = 1
        for name, kind, side, max_len in layout:
            if name not in table.column_names:
                raise DataError(f"cannot fit the feature spec: the table has no column '{name}'")
            col = table.column(name)
            if kind == "numeric":
                stats[name] = _numeric_stats(name, col)
                size = 1
            else:
                vocabs[name] = _vocabulary(name, kind, col, max_len, min_count)
                size = len(vocabs[name])
            fields.append(FieldInfo(name, kind, side, offset, size, max_len))
            offset += size
        return cls(tuple(fields), vocabs, stats, schema)

    def to_dict(self) -> dict[str, Any]:
        """Plain str/int/float/list/dict values (safe for ``torch.load(weights_only=True)``)."""
        return {
            "version": SPEC_VERSION,
            "fields": [
                {
                    "name": f.name,
                    "kind": f.kind,
                    "side": f.side,
                    "offset": f.offset,
                    "size": f.size,
                    "max_len": f.max_len,
                }
                for f in self.fields
            ],
            "vocabs": {name: list(tokens) for name, tokens in self.vocabs.items()},
            "numeric_stats": {name: [m, s] for name, (m, s) in self.numeric_stats.items()},
            "schema": schema_to_dict(self.schema),
        }

    @classmethod
    def from_dict(cls, data: Any) -> FeatureSpec:
        """Rebuild (and check) a spec written by :meth:`to_dict`.

        Args:
            data: The dict, e.g. from a checkpoint (untrusted input).

        Returns:
            The spec.

        Raises:
            ModelError: ``data`` is not a consistent spec of a known version.
        """
        try:
            return _from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"invalid feature spec: {exc}") from exc


def _layout(schema: LogSchema) -> list[tuple[str, FeatureKind, Side, int]]:
    """(column, kind, side, max_len) of every field, in model order."""
    out: list[tuple[str, FeatureKind, Side, int]] = [(schema.item_id, "categorical", "item", 1)]
    out += [
        (c.name, c.kind, "item", c.max_len if c.kind == "multi" else 1)
        for c in schema.item_features
    ]
    out.append((schema.user_id, "categorical", "user", 1))
    out += [
        (c.name, c.kind, "user", c.max_len if c.kind == "multi" else 1)
        for c in schema.user_features
    ]
    return out


def _vocabulary(
    name: str, kind: FeatureKind, col: pa.ChunkedArray, max_len: int, min_count: int
) -> list[str]:
    if kind == "multi":
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
            raise DataError(f"multi column '{name}' must be a list column, got {col.type}")
        values = pc.list_flatten(pc.list_slice(col, 0, max_len))
    else:
        values = col
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        try:
            values = pc.cast(values, pa.string())
        except pa.ArrowException as exc:
            raise DataError(f"column '{name}' ({col.type}) cannot be read as text") from exc
    counted = pc.value_counts(pc.drop_null(values))
    tokens = np.asarray(counted.field("values").to_pylist(), dtype=str)
    counts = np.asarray(counted.field("counts"), dtype=np.int64)
    keep = (counts >= min_count) & (tokens != OOV)
    tokens, counts = tokens[keep], counts[keep]
    order = np.lexsort((tokens, -counts))
    return [OOV, *tokens[order].tolist()]


def _numeric_stats(name: str, col: pa.ChunkedArray) -> tuple[float, float]:
    try:
        values = pc.cast(pc.drop_null(col), pa.float64()).to_numpy()
    except pa.ArrowException as exc:
        raise DataError(f"numeric column '{name}' ({col.type}) cannot be read as numbers") from exc
    if not np.all(np.isfinite(values)):
        raise DataError(f"numeric column '{name}' holds NaN or infinite values")
    if values.size == 0:
        return 0.0, 1.0
    return float(values.mean()), max(float(values.std()), STD_FLOOR)


def _from_dict(data: Any) -> FeatureSpec:
    if not isinstance(data, dict):
        raise TypeError(f"expected a dict, got {type(data).__name__}")
    if data.get("version") != SPEC_VERSION:
        raise ValueError(f"unknown spec version {data.get('version')!r} (known: {SPEC_VERSION})")
    schema = schema_from_dict(data["schema"])
    vocabs = {str(k): [str(t) for t in v] for k, v in dict(data["vocabs"]).items()}
    stats = {str(k): (float(v[0]), float(v[1])) for k, v in dict(data["numeric_stats"]).items()}
    fields = tuple(
        FieldInfo(
            name=str(f["name"]),
            kind=f["kind"],
            side=f["side"],
            offset=int(f["offset"]),
            size=int(f["size"]),
            max_len=int(f["max_len"]),
        )
        for f in data["fields"]
    )
    expected = _layout(schema)
    if [(f.name, f.kind, f.side, f.max_len) for f in fields] != expected:
        raise ValueError("fields do not match the schema's layout")
    offset = 1
    for f in fields:
        if f.offset != offset:
            raise ValueError(f"field '{f.name}' offset {f.offset}, expected {offset}")
        if f.kind == "numeric":
            if f.size != 1 or f.name not in stats:
                raise ValueError(f"numeric field '{f.name}' needs size 1 and numeric_stats")
            if not (np.isfinite(stats[f.name][0]) and stats[f.name][1] >= STD_FLOOR):
                raise ValueError(f"numeric field '{f.name}' has bad stats {stats[f.name]}")
        else:
            vocab = vocabs.get(f.name)
            if vocab is None or len(vocab) != f.size or not vocab or vocab[0] != OOV:
                raise ValueError(f"field '{f.name}': vocabulary does not match size {f.size}")
        offset += f.size
    return FeatureSpec(fields, vocabs, stats, schema)
