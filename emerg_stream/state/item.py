"""The state of one item: what the worker needs to score it and to warm it up.

Kept compact, because a worker holds one per item of its partitions (the target is at
most 4 KiB per item at 10^5 items): the side features are one ``bytes``, their Avro
encoding as in ``ItemState`` (decoded when read: :meth:`ItemTask.side_features`), the
support buffer is one ``bytes`` of packed schemaless Avro rows (:class:`SupportRows`), φ
is one ``bytes`` of float32 values (``adjacency`` and ``id_embedding`` are read-only views
of it), the de-duplication window holds 64-bit hashes
(:class:`~emerg_stream.state.dedupe.RecentIds`), and the object has ``__slots__``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from functools import cache
from typing import Any

import fastavro
import numpy as np
import numpy.typing as npt

from emerg_stream.io.schemas import load_schema
from emerg_stream.phases import COLD, OLD
from emerg_stream.state.dedupe import RecentIds

__all__ = [
    "SIDE_FIELDS",
    "Float32Array",
    "ItemTask",
    "SupportRows",
    "encode_side",
    "side_schema",
]

Float32Array = npt.NDArray[np.float32]
_F32 = np.dtype("<f4")
#: The side-feature fields of ``ItemState``, consecutive and in this order.
SIDE_FIELDS: tuple[str, str, str] = ("categorical", "multi", "numeric")

Categorical = dict[str, str]
Multi = dict[str, list[str]]
Numeric = dict[str, float]


@cache
def side_schema() -> Any:
    """The parsed Avro record of the side-feature fields, cut out of ``ItemState``."""
    fields = [f for f in load_schema("ItemState")["fields"] if f["name"] in SIDE_FIELDS]
    if tuple(f["name"] for f in fields) != SIDE_FIELDS:
        raise ValueError(f"ItemState side-feature fields changed: {[f['name'] for f in fields]}")
    record = {"type": "record", "name": "ItemSide", "namespace": "emerg_stream", "fields": fields}
    return fastavro.parse_schema(record, named_schemas={})


def encode_side(categorical: Categorical, multi: Multi, numeric: Numeric) -> bytes:
    """The Avro encoding of the three side-feature maps (as inside ``ItemState``)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(
        buf, side_schema(), {"categorical": categorical, "multi": multi, "numeric": numeric}
    )
    return buf.getvalue()


_EMPTY_SIDE = b"\x00\x00\x00"  # three empty maps


class SupportRows:
    """An item's support buffer: rows as schemaless Avro ``SupportRow``, concatenated.

    ``data`` is exactly the body of the Avro array the ``ItemState`` record stores (the
    row encodings back to back, without the block count and the terminating zero), so
    encoding and decoding a state never touch the rows one by one. The rows are decoded
    together, for an update (:meth:`ItemStateCodec.decode_rows
    <emerg_stream.state.codec.ItemStateCodec.decode_rows>`).

    Args:
        rows: Initial row encodings, oldest first.
    """

    __slots__ = ("count", "data")

    def __init__(self, rows: Iterable[bytes] = ()) -> None:
        rows = list(rows)
        self.count = len(rows)
        self.data = b"".join(rows)

    @classmethod
    def packed(cls, count: int, data: bytes) -> SupportRows:
        """Rows already concatenated (``count`` of them in ``data``)."""
        out = cls()
        out.count, out.data = count, data
        return out

    def append(self, row: bytes) -> None:
        """Add one row's encoding (the newest)."""
        self.data += row
        self.count += 1

    def clear(self) -> None:
        """Forget every row (after an update used them)."""
        self.count, self.data = 0, b""

    def __len__(self) -> int:
        return self.count

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SupportRows):
            return NotImplemented
        return self.count == other.count and self.data == other.data

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"SupportRows(count={self.count}, bytes={len(self.data)})"


def _graph_view(packed: bytes | None, n_fields: int) -> Float32Array | None:
    """The graph part (``F*F`` floats) of a packed φ (:meth:`ItemTask._pack`)."""
    return None if packed is None else np.frombuffer(packed, dtype=_F32, count=n_fields**2)


def _embedding_view(packed: bytes | None, n_fields: int) -> Float32Array | None:
    """The ID-embedding part of a packed φ (after its ``F*F`` graph floats)."""
    return None if packed is None else np.frombuffer(packed, dtype=_F32, offset=4 * n_fields**2)


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
        support: The rows applied since the last threshold, oldest first (at most K), as
            :class:`SupportRows` or row encodings (decoded only for an update).
        recent: Recent event ids, for de-duplication (default: a window of 1,000).
        adjacency: Raw graph A_i, ``[G*G]`` row-major (``None`` for old items; empty,
            G = 0, for a method without an item graph: DeepFM, MetaE).
        id_embedding: ID embedding e_i, ``[D]`` (``None`` for old items; required with
            ``adjacency``).
        last_offsets: ``(topic, partition)`` -> offset of the last input record applied.
        updated_time: Milliseconds since the epoch of the last change.

    The shadow method's φ (:meth:`set_shadow_params`; none by default) is kept beside the
    primary's, in the same compact form, with the ``model_version`` of the shadow
    checkpoint it belongs to: it travels in the changelog with the rest of the state, so
    the shadow survives restarts and rebalances exactly as the primary does. The primary's
    fields never depend on it.

    Raises:
        ValueError: Only one of ``adjacency`` and ``id_embedding`` is given, or the
            adjacency is not square.
    """

    __slots__ = (
        "_n_fields",
        "_phi",
        "_shadow",
        "_shadow_n_fields",
        "_side",
        "item_id",
        "last_offsets",
        "next_threshold",
        "phase",
        "recent",
        "shadow_model_version",
        "support",
        "support_size",
        "updated_time",
        "version",
    )

    def __init__(
        self,
        item_id: str,
        categorical: dict[str, str] | None = None,
        multi: dict[str, list[str]] | None = None,
        numeric: dict[str, float] | None = None,
        phase: str = COLD,
        version: int = 0,
        support_size: int = 0,
        next_threshold: int = 0,
        support: SupportRows | Iterable[bytes] = (),
        recent: RecentIds | None = None,
        adjacency: npt.ArrayLike | None = None,
        id_embedding: npt.ArrayLike | None = None,
        last_offsets: dict[tuple[str, int], int] | None = None,
        updated_time: int = 0,
    ) -> None:
        self.item_id = item_id
        if categorical or multi or numeric:
            self._side = encode_side(categorical or {}, multi or {}, numeric or {})
        else:
            self._side = _EMPTY_SIDE
        self.phase = phase
        self.version = version
        self.support_size = support_size
        self.next_threshold = next_threshold
        self.support = support if isinstance(support, SupportRows) else SupportRows(support)
        self.recent = RecentIds(1000) if recent is None else recent
        self.last_offsets = {} if last_offsets is None else last_offsets
        self.updated_time = updated_time
        self._phi: bytes | None = None
        self._n_fields = 0
        self._shadow: bytes | None = None
        self._shadow_n_fields = 0
        self.shadow_model_version = ""
        if adjacency is not None or id_embedding is not None:
            if adjacency is None or id_embedding is None:
                raise ValueError(f"item {item_id!r}: adjacency and id_embedding go together")
            self.set_params(adjacency, id_embedding)

    @classmethod
    def with_side_bytes(cls, item_id: str, side: bytes, **fields: Any) -> ItemTask:
        """A task whose side features are given already encoded (see :meth:`side_bytes`)."""
        task = cls(item_id, **fields)
        task._side = side
        return task

    def set_side(self, side: bytes) -> None:
        """Replace the side features (their encoding, see :func:`encode_side`)."""
        self._side = side

    @property
    def side_bytes(self) -> bytes:
        """The side features as stored: Avro ``categorical``, ``multi``, ``numeric``."""
        return self._side

    def side_features(self) -> tuple[Categorical, Multi, Numeric]:
        """The side features, decoded (fresh dicts): categorical, multi, numeric."""
        rec = fastavro.schemaless_reader(io.BytesIO(self._side), side_schema(), None)
        if not isinstance(rec, dict):
            raise TypeError(f"item {self.item_id!r}: side features decoded to {type(rec)}")
        return rec["categorical"], rec["multi"], rec["numeric"]

    @property
    def categorical(self) -> Categorical:
        """Item side categorical features (field -> token; decoded, a fresh dict)."""
        return self.side_features()[0]

    @property
    def multi(self) -> Multi:
        """Item side multi-valued features (field -> tokens; decoded, a fresh dict)."""
        return self.side_features()[1]

    @property
    def numeric(self) -> Numeric:
        """Item side numeric features (field -> value; decoded, a fresh dict)."""
        return self.side_features()[2]

    @property
    def is_old(self) -> bool:
        """Whether the item belongs to the checkpoint's training set."""
        return self.phase == OLD

    @property
    def n_fields(self) -> int:
        """F (0 without params)."""
        return self._n_fields

    @property
    def adjacency(self) -> Float32Array | None:
        """Raw graph A_i, float32 ``[F*F]`` row-major (a read-only view; None without φ)."""
        return _graph_view(self._phi, self._n_fields)

    @property
    def id_embedding(self) -> Float32Array | None:
        """ID embedding e_i, float32 ``[D]`` (a read-only view; None without φ)."""
        return _embedding_view(self._phi, self._n_fields)

    @property
    def phi_bytes(self) -> bytes | None:
        """φ as stored: A_i then e_i, float32 little-endian (None without φ)."""
        return self._phi

    def set_params(self, adjacency: npt.ArrayLike, id_embedding: npt.ArrayLike) -> None:
        """Store φ as float32 (``[F*F]`` and ``[D]``, any shape that flattens to them).

        Raises:
            ValueError: The adjacency is not square (``F*F`` values).
        """
        self._phi, self._n_fields = self._pack(adjacency, id_embedding)

    def _pack(self, adjacency: npt.ArrayLike, id_embedding: npt.ArrayLike) -> tuple[bytes, int]:
        a = np.asarray(adjacency, dtype=_F32).reshape(-1)
        e = np.asarray(id_embedding, dtype=_F32).reshape(-1)
        f = math.isqrt(a.size)
        if f * f != a.size:
            raise ValueError(f"item {self.item_id!r}: adjacency of {a.size} values is not F x F")
        return a.tobytes() + e.tobytes(), f

    # -- the shadow method's φ (see the class docstring) --------------------------------

    @property
    def has_shadow(self) -> bool:
        """Whether the item carries the shadow method's φ."""
        return self._shadow is not None

    @property
    def shadow_adjacency(self) -> Float32Array | None:
        """The shadow's A_i, float32 ``[G*G]`` (a read-only view; None without it)."""
        return _graph_view(self._shadow, self._shadow_n_fields)

    @property
    def shadow_id_embedding(self) -> Float32Array | None:
        """The shadow's e_i, float32 ``[D]`` (a read-only view; None without it)."""
        return _embedding_view(self._shadow, self._shadow_n_fields)

    @property
    def shadow_n_fields(self) -> int:
        """G of the shadow's φ (0 without it, or for a shadow without an item graph)."""
        return self._shadow_n_fields

    def set_shadow_params(
        self, adjacency: npt.ArrayLike, id_embedding: npt.ArrayLike, model_version: str
    ) -> None:
        """Store the shadow's φ (as :meth:`set_params`) and its checkpoint's version.

        Raises:
            ValueError: The adjacency is not square, or the id embedding is empty.
        """
        if np.asarray(id_embedding).size == 0:
            raise ValueError(f"item {self.item_id!r}: shadow params without an id embedding")
        self._shadow, self._shadow_n_fields = self._pack(adjacency, id_embedding)
        self.shadow_model_version = model_version

    def clear_shadow(self) -> None:
        """Forget the shadow's φ (another shadow checkpoint, or none, runs now)."""
        self._shadow, self._shadow_n_fields, self.shadow_model_version = None, 0, ""

    def __repr__(self) -> str:
        return (
            f"ItemTask({self.item_id!r}, phase={self.phase}, version={self.version}, "
            f"support_size={self.support_size}, support={self.support.count} rows, "
            f"recent={len(self.recent)})"
        )
