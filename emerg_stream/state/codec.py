"""ItemTask <-> ``ItemState`` Avro record (the state changelog's values).

Encoding is the hot path of every checkpoint, so it avoids decoding the support rows
again: the task keeps each row as its schemaless Avro ``SupportRow`` encoding, and an
Avro record is the plain concatenation of its fields' encodings, so the value is
written as *head fields* + the ``support`` array spliced from the stored rows + *tail
fields*, with the head and tail written by fastavro from sub-schemas cut out of the
current ``ItemState`` schema. The bytes are exactly those :class:`AvroSerde` would write
(a unit test checks it), so any ItemState reader decodes them.

Decoding goes through :class:`AvroSerde` (it resolves older writer schemas) and then
re-encodes the support rows compactly.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, cast

import fastavro
import numpy as np

from emerg_stream.errors import ConfigError, SchemaError
from emerg_stream.io.avro import HEADER_SIZE, AvroSerde, frame
from emerg_stream.io.records import ItemState, SupportRow
from emerg_stream.io.schemas import SchemaIds, load_schema
from emerg_stream.state.dedupe import RecentIds
from emerg_stream.state.item import ItemTask

__all__ = ["ItemStateCodec"]

_HEAD: tuple[str, ...] = ("item_id", "categorical", "multi", "numeric", "version", "phase")
_HEAD += ("support_size", "next_threshold")
_TAIL: tuple[str, ...] = ("recent_event_ids", "adjacency", "id_embedding", "n_fields")
_TAIL += ("last_offsets", "updated_time")
_ROW = ("event_id", "user_id", "categorical", "multi", "numeric", "label", "event_time")


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


class ItemStateCodec:
    """Encode and decode item states (and their compact support rows).

    Args:
        dedupe_window: Event ids kept per item (restored states are cut to it).
        topic: The changelog topic (for a schema registry subject).
        ids: Schema ids (default: the codec's default, manifest or registry).

    Raises:
        ConfigError: The current ``ItemState`` schema has fields this codec does not know
            (update ``_HEAD`` / ``_TAIL`` after a schema change).
    """

    def __init__(
        self, *, dedupe_window: int, topic: str | None = None, ids: SchemaIds | None = None
    ) -> None:
        self.dedupe_window = dedupe_window
        self.serde: AvroSerde[ItemState] = AvroSerde(ItemState, topic=topic, ids=ids)
        schema = _plain_times(load_schema("ItemState"))
        names = [f["name"] for f in schema["fields"]]
        if tuple(names) != (*_HEAD, "support", *_TAIL):
            raise ConfigError(f"ItemState fields changed ({names}); update the state codec")
        cut = names.index("support")
        ns = schema.get("namespace", "emerg_stream")
        part = {"type": "record", "namespace": ns}
        self._head = fastavro.parse_schema(
            {**part, "name": "ItemStateHead", "fields": schema["fields"][:cut]}, named_schemas={}
        )
        self._tail = fastavro.parse_schema(
            {**part, "name": "ItemStateTail", "fields": schema["fields"][cut + 1 :]},
            named_schemas={},
        )
        self._row = fastavro.parse_schema(schema["fields"][cut]["type"]["items"], named_schemas={})
        self._prefix = frame(self.serde.schema_id, b"")

    # -- support rows ----------------------------------------------------------------

    def encode_row(self, row: Mapping[str, Any]) -> bytes:
        """Compact form of an interaction kept in the support set (extra keys ignored)."""
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self._row, {k: row[k] for k in _ROW})
        return buf.getvalue()

    def decode_row(self, data: bytes) -> SupportRow:
        """Inverse of :meth:`encode_row`."""
        return cast(SupportRow, fastavro.schemaless_reader(io.BytesIO(data), self._row, None))

    # -- item states -----------------------------------------------------------------

    def encode(self, task: ItemTask) -> bytes:
        """The framed ``ItemState`` value of ``task``."""
        buf = io.BytesIO()
        buf.write(self._prefix)
        fastavro.schemaless_writer(
            buf,
            self._head,
            {
                "item_id": task.item_id,
                "categorical": task.categorical,
                "multi": task.multi,
                "numeric": task.numeric,
                "version": task.version,
                "phase": task.phase,
                "support_size": task.support_size,
                "next_threshold": task.next_threshold,
            },
        )
        if task.support:
            buf.write(_long(len(task.support)))
            for row in task.support:
                buf.write(row)
        buf.write(b"\x00")
        fastavro.schemaless_writer(
            buf,
            self._tail,
            {
                "recent_event_ids": list(task.recent),
                "adjacency": [] if task.adjacency is None else task.adjacency.tolist(),
                "id_embedding": [] if task.id_embedding is None else task.id_embedding.tolist(),
                "n_fields": task.n_fields,
                "last_offsets": [
                    {"topic": t, "partition": p, "offset": o}
                    for (t, p), o in sorted(task.last_offsets.items())
                ],
                "updated_time": task.updated_time,
            },
        )
        return buf.getvalue()

    def decode(self, data: bytes) -> ItemTask:
        """Rebuild a task from a framed ``ItemState`` value (any known writer version).

        Raises:
            SchemaError: Not a valid ItemState value, or inconsistent parameter sizes.
        """
        rec = self.serde.decode(data)
        adjacency = np.asarray(rec["adjacency"], dtype=np.float32)
        id_embedding = np.asarray(rec["id_embedding"], dtype=np.float32)
        n_fields = rec["n_fields"]
        if adjacency.size != n_fields * n_fields:
            raise SchemaError(
                f"item state {rec['item_id']!r}: adjacency has {adjacency.size} values, "
                f"n_fields={n_fields}"
            )
        has_params = adjacency.size > 0
        return ItemTask(
            item_id=rec["item_id"],
            categorical=dict(rec["categorical"]),
            multi={k: list(v) for k, v in rec["multi"].items()},
            numeric=dict(rec["numeric"]),
            phase=rec["phase"],
            version=rec["version"],
            support_size=rec["support_size"],
            next_threshold=rec["next_threshold"],
            support=[self.encode_row(r) for r in rec["support"]],
            recent=RecentIds(self.dedupe_window, rec["recent_event_ids"]),
            adjacency=adjacency if has_params else None,
            id_embedding=id_embedding if has_params else None,
            last_offsets={(o["topic"], o["partition"]): o["offset"] for o in rec["last_offsets"]},
            updated_time=rec["updated_time"],
        )

    @staticmethod
    def payload_size(value: bytes) -> int:
        """Bytes of the Avro record without the 5-byte frame header."""
        return len(value) - HEADER_SIZE
