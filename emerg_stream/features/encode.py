"""Arrow tables and stream records -> the model's token/weight tensors.

The tensor contract (N rows, F fields, T = ``spec.max_tokens`` slots per field):

* ``tokens`` int64 [N, F, T]: global rows of the shared embedding table; 0 = padding.
* ``weights`` float32 [N, F, T]: the embedding of field j is
  ``sum_t weights[n, j, t] * E[tokens[n, j, t]]``.

Per field kind:

* categorical: slot 0 = ``offset + local index`` (unknown or null -> OOV, local 0),
  weight 1; other slots padding (token 0, weight 0).
* multi: the first ``max_len`` tokens, each weight ``1/m`` (the mean over the m kept
  tokens); an empty or null list -> the OOV token with weight 1.
* numeric: slot 0 = ``offset`` with weight ``(x - mean) / std``; null -> weight 0 (the mean).

A column absent from the input is all-null. Unknown categories never raise.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from emerg_stream.errors import DataError
from emerg_stream.features.spec import FeatureSpec, FieldInfo

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Encoded:
    """Encoded rows (numpy; see the module docstring for the contract).

    Args:
        tokens: int64 [N, F, T] global embedding rows (0 = padding).
        weights: float32 [N, F, T] per-token weights.
        item_ids: object [N] raw item ids (``str``; ``None`` where absent).
        labels: float32 [N] 0/1 labels (zeros without a label column).
        timestamps: int64 [N] (zeros without a timestamp column).
    """

    tokens: npt.NDArray[np.int64]
    weights: npt.NDArray[np.float32]
    item_ids: npt.NDArray[np.object_]
    labels: npt.NDArray[np.float32]
    timestamps: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, index: npt.ArrayLike) -> Encoded:
        """Rows ``index`` (an int array or boolean mask) as a new :class:`Encoded`."""
        idx = np.asarray(index)
        return Encoded(
            tokens=self.tokens[idx],
            weights=self.weights[idx],
            item_ids=self.item_ids[idx],
            labels=self.labels[idx],
            timestamps=self.timestamps[idx],
        )


@dataclass(frozen=True)
class EncodedTensors:
    """:class:`Encoded` on a torch device (``item_ids`` stay a numpy array).

    Args:
        tokens: long [N, F, T].
        weights: float32 [N, F, T].
        labels: float32 [N].
        timestamps: long [N].
        item_ids: object [N] raw item ids.
    """

    tokens: torch.Tensor
    weights: torch.Tensor
    labels: torch.Tensor
    timestamps: torch.Tensor
    item_ids: npt.NDArray[np.object_]


def encode(
    spec: FeatureSpec,
    table: pa.Table,
    *,
    allow_nonfinite: bool = False,
    fields: Collection[int] | None = None,
) -> Encoded:
    """Encode the rows of an arrow table.

    Args:
        spec: The fitted spec.
        table: Rows with (some of) the schema's columns; missing ones are all-null.
        allow_nonfinite: Map NaN/inf numeric values to weight 0 instead of raising.
        fields: Encode only these field positions; the others stay padding (token 0,
            weight 0). For callers that fill them from elsewhere (the worker copies an
            item's fields into its interactions' rows). ``None``: every field.

    Returns:
        The encoded rows (N = ``table.num_rows``).

    Raises:
        DataError: A numeric column holds NaN/inf (unless ``allow_nonfinite``), or a
            column's type does not fit its kind (e.g. a multi column that is not a list).
    """
    n = table.num_rows
    n_fields, n_slots = spec.n_fields, spec.max_tokens
    tokens = np.zeros((n, n_fields, n_slots), dtype=np.int64)
    weights = np.zeros((n, n_fields, n_slots), dtype=np.float32)
    present = set(table.column_names)
    for j, f in enumerate(spec.fields):
        if fields is not None and j not in fields:
            continue
        col = table.column(f.name) if f.name in present else None
        if f.kind == "numeric":
            tokens[:, j, 0] = f.offset
            if col is not None:
                weights[:, j, 0] = _numeric(spec, f, col, allow_nonfinite)
        elif f.kind == "categorical":
            tokens[:, j, 0] = f.offset + _local(spec, f, col, n)
            weights[:, j, 0] = 1.0
        else:
            _multi(spec, f, col, n, tokens[:, j, :], weights[:, j, :])

    schema = spec.schema
    if schema.item_id in present:
        ids = _as_text(table.column(schema.item_id), schema.item_id)
        item_ids = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)
    else:
        item_ids = np.full(n, None, dtype=object)
    return Encoded(
        tokens=tokens,
        weights=weights,
        item_ids=item_ids,
        labels=_column_or_zeros(table, schema.label, pa.float32(), np.float32),
        timestamps=_column_or_zeros(table, schema.timestamp, pa.int64(), np.int64),
    )


def encode_records(
    spec: FeatureSpec,
    records: Sequence[Mapping[str, Any]],
    *,
    allow_nonfinite: bool = False,
    fields: Collection[int] | None = None,
) -> Encoded:
    """Encode a list of records (column name -> value), e.g. decoded Avro records.

    Values: ids and categorical features any scalar (turned into ``str``); multi
    features a list of strings (a separator-joined string is rejected); numeric
    features numbers; ``None`` or an absent key means null.

    Args:
        spec: The fitted spec.
        records: The records, shape [N].
        allow_nonfinite: As in :func:`encode`.
        fields: As in :func:`encode` (the other fields' values are not read).

    Returns:
        The encoded rows.

    Raises:
        DataError: A value of the wrong type for its column, naming the column.
    """
    schema = spec.schema
    columns: dict[str, pa.Array] = {}
    for j, f in enumerate(spec.fields):
        if fields is not None and j not in fields and f.name != schema.item_id:
            continue
        values = [r.get(f.name) for r in records]
        if f.kind == "multi":
            columns[f.name] = _multi_values(f.name, values)
        elif f.kind == "numeric":
            columns[f.name] = _typed(f.name, values, pa.float64())
        else:
            columns[f.name] = _text_values(values)
    labels = [r.get(schema.label) for r in records]
    if any(v is not None for v in labels):
        columns[schema.label] = _typed(schema.label, labels, None)
    stamps = [r.get(schema.timestamp) for r in records]
    if any(v is not None for v in stamps):
        columns[schema.timestamp] = _typed(schema.timestamp, stamps, pa.int64())
    table = pa.table(columns) if columns else pa.table({"_": pa.nulls(len(records))})
    return encode(spec, table, allow_nonfinite=allow_nonfinite, fields=fields)


def item_side_index(spec: FeatureSpec) -> list[int]:
    """Field positions of the item side features (item fields except the id at 0).

    These are the hypernetwork's input: a new item's id embedding is meaningless.
    """
    return [j for j, f in enumerate(spec.fields) if f.side == "item" and j != 0]


def to_torch(encoded: Encoded, device: str | torch.device = "cpu") -> EncodedTensors:
    """Move encoded rows to torch tensors on ``device``.

    Args:
        encoded: The numpy form.
        device: Target device.

    Returns:
        tokens long [N, F, T], weights float32 [N, F, T], labels float32 [N],
        timestamps long [N] on ``device``; item ids unchanged.
    """
    import torch

    return EncodedTensors(
        tokens=torch.from_numpy(encoded.tokens).to(device),
        weights=torch.from_numpy(encoded.weights).to(device),
        labels=torch.from_numpy(encoded.labels).to(device),
        timestamps=torch.from_numpy(encoded.timestamps).to(device),
        item_ids=encoded.item_ids,
    )


# --- helpers -------------------------------------------------------------------------


def _as_text(col: pa.ChunkedArray | pa.Array, name: str) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_string(col.type):
        return col
    try:
        return pc.cast(col, pa.string())
    except pa.ArrowException as exc:
        raise DataError(f"column '{name}' ({col.type}) cannot be read as text") from exc


def _local(
    spec: FeatureSpec, f: FieldInfo, col: pa.ChunkedArray | None, n: int
) -> npt.NDArray[np.int64]:
    """Local vocabulary index of every row (0 = OOV, also for null and absent), shape [N]."""
    if col is None:
        return np.zeros(n, dtype=np.int64)
    idx = pc.index_in(_as_text(col, f.name), value_set=spec.lookup(f.name))
    return np.asarray(idx.fill_null(0), dtype=np.int64)


def _multi(
    spec: FeatureSpec,
    f: FieldInfo,
    col: pa.ChunkedArray | None,
    n: int,
    tokens: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float32],
) -> None:
    """Fill one multi field's slots in place: tokens/weights are views of shape [N, T]."""
    lengths = np.zeros(n, dtype=np.int64)
    if col is not None:
        col = col.combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
            raise DataError(f"multi column '{f.name}' must be a list column, got {col.type}")
        kept = pc.list_slice(col, 0, f.max_len)
        lengths = np.asarray(pc.list_value_length(kept).fill_null(0), dtype=np.int64)
        flat = _as_text(pc.list_flatten(kept), f.name)
        local = np.asarray(pc.index_in(flat, value_set=spec.lookup(f.name)).fill_null(0))
        rows = np.repeat(np.arange(n), lengths)
        starts = np.cumsum(lengths) - lengths
        pos = np.arange(rows.size) - np.repeat(starts, lengths)
        tokens[rows, pos] = f.offset + local
        inverse = np.zeros(n, dtype=np.float32)
        np.divide(1.0, lengths, out=inverse, where=lengths > 0)
        weights[rows, pos] = inverse[rows]
    empty = lengths == 0
    tokens[empty, 0] = f.offset
    weights[empty, 0] = 1.0


def _numeric(
    spec: FeatureSpec, f: FieldInfo, col: pa.ChunkedArray, allow_nonfinite: bool
) -> npt.NDArray[np.float32]:
    """Normalised values, 0 for null (and for NaN/inf when allowed), shape [N]."""
    try:
        arr = pc.cast(col.combine_chunks(), pa.float64())
    except pa.ArrowException as exc:
        raise DataError(
            f"numeric column '{f.name}' ({col.type}) cannot be read as numbers"
        ) from exc
    valid = np.asarray(arr.is_valid(), dtype=bool)
    values = np.asarray(arr.fill_null(0.0), dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        if not allow_nonfinite:
            bad = int(np.flatnonzero(~finite)[0])
            raise DataError(
                f"numeric column '{f.name}' holds NaN or infinite values "
                f"({int((~finite).sum())} rows, first at row {bad}: {values[bad]})"
            )
        valid &= finite
    mean, std = spec.numeric_stats[f.name]
    out = np.where(valid, (values - mean) / std, 0.0)
    return out.astype(np.float32)


def _column_or_zeros(table: pa.Table, name: str, typ: pa.DataType, dtype: type[np.generic]) -> Any:
    if name not in table.column_names:
        return np.zeros(table.num_rows, dtype=dtype)
    try:
        arr = pc.cast(table.column(name).combine_chunks(), typ)
    except pa.ArrowException as exc:
        raise DataError(f"column '{name}' ({table.column(name).type}) is not {typ}") from exc
    # A copy: arrow buffers are read-only, and torch.from_numpy wants writable memory.
    return np.array(arr.fill_null(0), dtype=dtype, copy=True)


def _text_values(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values, type=pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def _typed(name: str, values: list[Any], typ: pa.DataType | None) -> pa.Array:
    try:
        return pa.array(values, type=typ)
    except (pa.ArrowTypeError, pa.ArrowInvalid, OverflowError) as exc:
        want = "numbers" if typ is None else str(typ)
        raise DataError(f"column '{name}': values must be {want} or null: {exc}") from exc


def _multi_values(name: str, values: list[Any]) -> pa.Array:
    if any(isinstance(v, str | bytes) for v in values):
        raise DataError(f"multi column '{name}': values must be lists of strings, not strings")
    try:
        return pa.array(values, type=pa.list_(pa.string()))
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
        raise DataError(f"multi column '{name}': values must be lists of strings: {exc}") from exc
