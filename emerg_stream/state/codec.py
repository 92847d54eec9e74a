"""ItemTask <-> ``ItemState`` Avro record (the state changelog's values).

An Avro record is the plain concatenation of its fields' encodings, and ``support`` is
the last field of ``ItemState`` (version 2), so a value is *front fields* (everything
but the support rows, written and read by fastavro with a sub-schema cut out of the
current schema) followed by the ``support`` array, whose body is kept in memory as it is
on the wire (:class:`~emerg_stream.state.item.SupportRows`). Encoding splices the stored
rows in, decoding slices them out: neither touches a row. The bytes are exactly those
:class:`AvroSerde` would write (a unit test checks it), so any ItemState reader decodes
them.

Values of an older version (an id other than the current one) go through
:class:`AvroSerde` (Avro schema resolution to the current schema): version 1 stored the
de-duplication window as event id strings (``recent_event_ids``), which are hashed as they
are read, and its support rows are re-encoded into the compact form. Version 4 adds the
shadow method's φ (``shadow_*``, empty by default: older values restore without it).

The side features (``categorical``, ``multi``, ``numeric``, right after ``item_id``) stay
Avro in memory too (:meth:`ItemTask.side_features` decodes them), so they are sliced out
and spliced in the same way. Decoded topics and phases are interned.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping
from typing import Any, cast

import fastavro

from emerg_stream.errors import ConfigError, SchemaError
from emerg_stream.io.avro import DECODE_ERRORS, HEADER_SIZE, AvroSerde, frame, peek_schema_id
from emerg_stream.io.records import ItemState, SupportRow
from emerg_stream.io.schemas import SchemaIds, default_schema_ids, load_schema
from emerg_stream.state.dedupe import RecentIds, event_digest
from emerg_stream.state.item import SIDE_FIELDS, ItemTask, SupportRows, encode_side

__all__ = ["ItemStateCodec"]

#: The current schema's fields, in order; ``support`` (the rows) must be the last.
_FRONT: tuple[str, ...] = ("item_id", "categorical", "multi", "numeric", "version", "phase")
_FRONT += ("support_size", "next_threshold", "recent_event_ids", "recent_event_hashes")
_FRONT += ("recent_content_hashes",)
_FRONT += ("adjacency", "id_embedding", "n_fields", "last_offsets", "updated_time")
_FRONT += ("shadow_adjacency", "shadow_id_embedding", "shadow_model_version")
_ROW = ("event_id", "user_id", "categorical", "multi", "numeric", "label", "event_time")

_intern = sys.intern


def _plain_times(node: Any) -> Any:
    """A schema copy without ``timestamp-*`` logical types (times stay ``int`` ms)."""
    if isinstance(node, dict):
        out = {k: _plain_times(v) for k, v in node.items()}
        if str(out.get("logicalType", "")).startswith("timestamp-"):
            del out["logicalType"]
        return out
    if isinstance(node, list):
        return [_plain_times(v) for v in node]
    return node


def _long(n: int) -> bytes:
    """Avro ``long``: zig-zag, then base-128 varint."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z & ~0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """Avro ``long`` at ``pos``: ``(value, position after it)``.

    Raises:
        SchemaError: The varint runs past the end or over 10 bytes.
    """
    z = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise SchemaError("ItemState: truncated or malformed varint")
        b = data[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if not b & 0x80:
            return (z >> 1) ^ -(z & 1), pos
        shift += 7


class ItemStateCodec:
    """Encode and decode item states (and their compact support rows).

    Args:
        dedupe_window: Event ids kept per item (restored windows are cut to it).
        topic: The changelog topic (for a schema registry subject).
        ids: Schema ids (default: the codec's default, manifest or registry).

    Raises:
        ConfigError: The current ``ItemState`` schema has fields this codec does not know
            (update ``_FRONT`` after a schema change; ``support`` stays the last field).
    """

    def __init__(
        self, *, dedupe_window: int, topic: str | None = None, ids: SchemaIds | None = None
    ) -> None:
        self.dedupe_window = dedupe_window
        self._ids = default_schema_ids() if ids is None else ids
        self.serde: AvroSerde[ItemState] = AvroSerde(ItemState, topic=topic, ids=self._ids)
        self._known_ids = {self.serde.schema_id}
        schema = _plain_times(load_schema("ItemState"))
        names = tuple(f["name"] for f in schema["fields"])
        if names != (*_FRONT, "support"):
            raise ConfigError(f"ItemState fields changed ({names}); update the state codec")
        ns = schema.get("namespace", "emerg_stream")

        def part(name: str, fields: list[Any]) -> Any:
            record = {"type": "record", "namespace": ns, "name": name, "fields": fields}
            return fastavro.parse_schema(record, named_schemas={})

        # item_id + the side features, then the rest up to (not with) the support rows
        cut = 1 + len(SIDE_FIELDS)
        self._head = part("ItemStateHead", schema["fields"][:cut])
        self._rest = part("ItemStateRest", schema["fields"][cut:-1])
        row = schema["fields"][-1]["type"]["items"]
        self._row = fastavro.parse_schema(row, named_schemas={})
        self._rows = fastavro.parse_schema({"type": "array", "items": row}, named_schemas={})
        self._prefix = frame(self.serde.schema_id, b"")
        self._offset_keys: dict[tuple[str, int], tuple[str, int]] = {}

    # -- support rows ----------------------------------------------------------------

    def encode_row(self, row: Mapping[str, Any]) -> bytes:
        """Compact form of an interaction kept in the support set (extra keys ignored)."""
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self._row, {k: row[k] for k in _ROW})
        return buf.getvalue()

    def decode_row(self, data: bytes) -> SupportRow:
        """Inverse of :meth:`encode_row`."""
        return cast(SupportRow, fastavro.schemaless_reader(io.BytesIO(data), self._row, None))

    def decode_rows(self, rows: SupportRows) -> list[SupportRow]:
        """Every row of a support buffer, oldest first.

        Raises:
            SchemaError: The buffer does not hold exactly ``rows.count`` rows.
        """
        if not rows.count:
            return []
        buf = io.BytesIO(_long(rows.count) + rows.data + b"\x00")
        try:
            out = fastavro.schemaless_reader(buf, self._rows, None)
        except DECODE_ERRORS as exc:
            raise SchemaError(f"support rows cannot be decoded: {exc}") from exc
        if buf.tell() != len(buf.getbuffer()):
            raise SchemaError("support rows: trailing bytes after the rows (corrupt state)")
        return cast(list[SupportRow], out)

    # -- item states -----------------------------------------------------------------

    def encode(self, task: ItemTask) -> bytes:
        """The framed ``ItemState`` value of ``task``."""
        buf = io.BytesIO()
        buf.write(self._prefix)
        item_id = task.item_id.encode("utf-8")
        buf.write(_long(len(item_id)))
        buf.write(item_id)
        buf.write(task.side_bytes)  # categorical, multi, numeric: already Avro
        adjacency, id_embedding = task.adjacency, task.id_embedding
        shadow_adj, shadow_emb = task.shadow_adjacency, task.shadow_id_embedding
        fastavro.schemaless_writer(
            buf,
            self._rest,
            {
                "version": task.version,
                "phase": task.phase,
                "support_size": task.support_size,
                "next_threshold": task.next_threshold,
                "recent_event_ids": [],
                "recent_event_hashes": task.recent.to_bytes(),
                "recent_content_hashes": task.recent.content_bytes(),
                "adjacency": [] if adjacency is None else adjacency.tolist(),
                "id_embedding": [] if id_embedding is None else id_embedding.tolist(),
                "n_fields": task.n_fields,
                "last_offsets": [
                    {"topic": t, "partition": p, "offset": o}
                    for (t, p), o in sorted(task.last_offsets.items())
                ],
                "updated_time": task.updated_time,
                "shadow_adjacency": [] if shadow_adj is None else shadow_adj.tolist(),
                "shadow_id_embedding": [] if shadow_emb is None else shadow_emb.tolist(),
                "shadow_model_version": task.shadow_model_version,
            },
        )
        rows = task.support
        if rows.count:
            buf.write(_long(rows.count))
            buf.write(rows.data)
        buf.write(b"\x00")
        return buf.getvalue()

    def is_current(self, value: bytes) -> bool:
        """Whether ``value`` is framed with the current schema id (the fast decode).

        Raises:
            SchemaError: Not a framed value.
        """
        return peek_schema_id(value) == self.serde.schema_id

    def decode(self, data: bytes, item_id: str | None = None) -> ItemTask:
        """Rebuild a task from a framed ``ItemState`` value (any known writer version).

        Args:
            data: The value.
            item_id: The id the value must hold (the record key), shared with the result.

        Raises:
            SchemaError: Not a valid ItemState value, another item's value, or
                inconsistent parameter sizes.
        """
        if self.is_current(data):
            rec, rows = self._decode_current(data)
        else:
            rec, rows = self._decode_older(data)
        if item_id is not None:
            if rec["item_id"] != item_id:
                raise SchemaError(f"the state of item {item_id!r} holds item {rec['item_id']!r}")
            rec["item_id"] = item_id
        return self._task(rec, rows)

    def load(self, item_id: str, value: bytes) -> ItemTask:
        """:meth:`decode` with the arguments of a :data:`~emerg_stream.state.store.Loader`."""
        return self.decode(value, item_id)

    def _decode_current(self, data: bytes) -> tuple[dict[str, Any], SupportRows]:
        """Fields by fastavro; the side features' and the support rows' bytes sliced out."""
        buf = io.BytesIO(memoryview(data)[HEADER_SIZE:])
        try:
            rec = fastavro.schemaless_reader(buf, self._head, None)
            side_end = HEADER_SIZE + buf.tell()
            rest = fastavro.schemaless_reader(buf, self._rest, None)
        except DECODE_ERRORS as exc:
            raise SchemaError(f"ItemState: corrupt or truncated value: {exc}") from exc
        if not isinstance(rec, dict) or not isinstance(rest, dict):
            raise SchemaError(f"ItemState: decoded a {type(rec).__name__}")
        n, side_start = _read_long(data, HEADER_SIZE)  # after the item id
        rec = {"item_id": rec["item_id"], "side": data[side_start + n : side_end], **rest}
        count, pos = _read_long(data, HEADER_SIZE + buf.tell())
        if count < 0:  # a block with its byte size: not written by this codec
            return self._decode_older(data)
        if count == 0:
            if pos != len(data):
                raise SchemaError(f"ItemState: {len(data) - pos} trailing bytes after the record")
            return rec, SupportRows()
        if data[-1] != 0:
            raise SchemaError("ItemState: the support rows do not end the value (corrupt value)")
        return rec, SupportRows.packed(count, data[pos:-1])

    def _decode_older(self, data: bytes) -> tuple[dict[str, Any], SupportRows]:
        """Any other writer schema, resolved to the current one by :class:`AvroSerde`."""
        rec = cast(dict[str, Any], self.serde.decode(data))
        rec["side"] = encode_side(rec["categorical"], rec["multi"], rec["numeric"])
        rows = SupportRows(self.encode_row(r) for r in rec["support"])
        return rec, rows

    def _task(self, rec: dict[str, Any], rows: SupportRows) -> ItemTask:
        adjacency = rec["adjacency"]
        id_embedding = rec["id_embedding"]
        n_fields = rec["n_fields"]
        if len(adjacency) != n_fields * n_fields:
            raise SchemaError(
                f"item state {rec['item_id']!r}: adjacency has {len(adjacency)} values, "
                f"n_fields={n_fields}"
            )
        if adjacency and not id_embedding:  # a method without a graph: id embedding only
            raise SchemaError(f"item state {rec['item_id']!r}: adjacency without id embedding")
        hashes, content = rec["recent_event_hashes"], rec["recent_content_hashes"]
        if isinstance(hashes, str):  # fastavro resolves the schema default ("") to a str
            hashes = hashes.encode("latin-1")
        if isinstance(content, str):
            content = content.encode("latin-1")
        try:
            recent = RecentIds.from_bytes(self.dedupe_window, hashes, content)
        except ValueError as exc:
            raise SchemaError(f"item state {rec['item_id']!r}: {exc}") from exc
        if rec["recent_event_ids"]:  # written by version 1: the window as strings
            old = b"".join(event_digest(i) for i in dict.fromkeys(rec["recent_event_ids"]))
            recent = RecentIds.from_bytes(self.dedupe_window, old + recent.to_bytes())
        keys = self._offset_keys
        last_offsets: dict[tuple[str, int], int] = {}
        for o in rec["last_offsets"]:
            key = (o["topic"], o["partition"])
            last_offsets[keys.setdefault(key, (_intern(key[0]), key[1]))] = o["offset"]
        task = ItemTask.with_side_bytes(
            rec["item_id"],
            rec["side"],
            phase=_intern(rec["phase"]),
            version=rec["version"],
            support_size=rec["support_size"],
            next_threshold=rec["next_threshold"],
            support=rows,
            recent=recent,
            last_offsets=last_offsets,
            updated_time=rec["updated_time"],
        )
        if id_embedding:
            task.set_params(adjacency, id_embedding)
        if rec["shadow_id_embedding"]:  # version 4: the shadow method's φ
            try:
                task.set_shadow_params(
                    rec["shadow_adjacency"], rec["shadow_id_embedding"], rec["shadow_model_version"]
                )
            except ValueError as exc:
                raise SchemaError(f"item state {rec['item_id']!r}: {exc}") from exc
        return task

    def key_matches(self, key: bytes, value: bytes) -> bool:
        """Whether ``value`` is an ItemState value of item ``key`` (without decoding it).

        ``item_id`` is the first field of every ItemState version: its length (a varint)
        and its UTF-8 bytes follow the frame header. The writer schema must be one of
        ``ItemState``'s.

        Raises:
            SchemaError: Not a framed value, or a schema id unknown or of another record.
        """
        n = len(key)
        if n < 64 and value.startswith(self._prefix) and len(value) > HEADER_SIZE:
            # the current schema and a one-byte length (the common case, no allocation)
            return value[HEADER_SIZE] == 2 * n and value.startswith(key, HEADER_SIZE + 1)
        schema_id = peek_schema_id(value)
        if schema_id not in self._known_ids:
            writer = self._ids.writer_schema(schema_id)
            if writer.record != "ItemState":
                raise SchemaError(f"schema id {schema_id} is of {writer.record}, not ItemState")
            self._known_ids.add(schema_id)
        length, pos = _read_long(value, HEADER_SIZE)
        return length == n and value[pos : pos + n] == key

    @staticmethod
    def payload_size(value: bytes) -> int:
        """Bytes of the Avro record without the 5-byte frame header."""
        return len(value) - HEADER_SIZE
