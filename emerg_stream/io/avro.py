"""Avro values with Confluent framing: one typed serde per record type.

Wire format of every value (the Confluent wire format, readable by any Confluent
deserializer pointed at the same ids)::

    byte 0      magic, always 0
    bytes 1..4  schema id, unsigned 32-bit big-endian
    bytes 5..   the record, Avro binary (no container header)

Encoding validates the record against the current schema (types, missing fields without a
default, unknown fields) and frames it with the current schema id. Decoding reads the id,
looks up the schema the value was *written* with (current or historical, see
:mod:`emerg_stream.io.schemas`) and resolves it to the current schema, so old values keep
decoding after a compatible schema change. Every decode failure raises
:class:`~emerg_stream.errors.SchemaError` chained to its cause; the stream turns it into a
dead-letter record.

Times are ``int`` milliseconds on both sides: the ``timestamp-millis`` logical type stays in
the schema files (for other readers) but the codec reads it as a plain ``long``.
"""

from __future__ import annotations

import io
import json
import re
import struct
import threading
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Generic, TypeVar, cast

import fastavro
from fastavro.validation import ValidationError
from fastavro.validation import validate as _validate

from emerg_stream.errors import SchemaError
from emerg_stream.io.schemas import SchemaIds, WriterSchema, default_schema_ids, load_schema

__all__ = ["DECODE_ERRORS", "HEADER_SIZE", "MAGIC", "AvroSerde", "frame", "peek_schema_id"]

_OBJECT_REPR = re.compile(r" from <[^>]*>")

#: First byte of every framed value.
MAGIC = 0
_HEADER = struct.Struct(">BI")
#: Bytes before the Avro payload (magic + schema id).
HEADER_SIZE = _HEADER.size

T = TypeVar("T", bound=Mapping[str, Any])

# What fastavro raises on malformed input: short reads, bad varints, union or enum indexes
# out of range, invalid UTF-8, resolution failures (SchemaResolutionError is a ValueError
# in some versions and a plain Exception subclass in others, hence its own entry).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    EOFError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    OverflowError,
    MemoryError,
    struct.error,
    fastavro.read.SchemaResolutionError,
)
# What fastavro raises when writing a record it did not validate (non-strict paths).
_ENCODE_ERRORS: tuple[type[BaseException], ...] = (
    ValidationError,
    ValueError,
    TypeError,
    KeyError,
    OverflowError,
    AttributeError,
    struct.error,
)


def frame(schema_id: int, payload: bytes) -> bytes:
    """Prefix an Avro payload with the magic byte and ``schema_id``.

    Raises:
        SchemaError: ``schema_id`` does not fit an unsigned 32-bit integer.
    """
    if not 0 <= schema_id < 2**32:
        raise SchemaError(f"schema id {schema_id} out of range 0..2**32-1")
    return _HEADER.pack(MAGIC, schema_id) + payload


def peek_schema_id(data: bytes | bytearray | memoryview) -> int:
    """Return the schema id of a framed value without decoding it.

    Raises:
        SchemaError: Too short to hold a header, or not starting with the magic byte.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        kind = "null value (a tombstone?)" if data is None else type(data).__name__
        raise SchemaError(f"cannot decode {kind}: expected bytes")
    if len(data) < HEADER_SIZE:
        raise SchemaError(
            f"short buffer: {len(data)} bytes, a framed value needs at least {HEADER_SIZE}"
        )
    magic, schema_id = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise SchemaError(
            f"wrong magic byte 0x{magic:02x} (expected 0x00): not a Confluent-framed Avro value"
        )
    return int(schema_id)


def _strip_logical_types(node: Any) -> Any:
    """Return a copy of a schema JSON without ``timestamp-*`` logical types (read as long)."""
    if isinstance(node, dict):
        out = {k: _strip_logical_types(v) for k, v in node.items()}
        if str(out.get("logicalType", "")).startswith(("timestamp-", "local-timestamp-")):
            del out["logicalType"]
        return out
    if isinstance(node, list):
        return [_strip_logical_types(v) for v in node]
    return node


@lru_cache(maxsize=256)
def _parse_cached(schema_json: str, plain_times: bool) -> Any:
    schema = json.loads(schema_json)
    if plain_times:
        schema = _strip_logical_types(schema)
    return fastavro.parse_schema(schema, named_schemas={})


def _parse(schema: dict[str, Any], *, plain_times: bool) -> Any:
    return _parse_cached(json.dumps(schema, sort_keys=True), plain_times)


class AvroSerde(Generic[T]):
    """Encoder/decoder of one record type, e.g. ``AvroSerde(ItemEvent, topic="emerg.items")``.

    Thread-safe after construction. Parsed schemas are cached per process, so building
    many serdes is cheap.

    Args:
        record_type: One of the ``TypedDict`` classes of :mod:`emerg_stream.io.records`;
            its name is the Avro record name.
        topic: The topic the values go to; with a schema registry, the subject is
            ``<topic>-value``. Ignored with the id manifest.
        ids: Where schema ids come from (default: :func:`default_schema_ids`, i.e. the
            registry if ``$EMERG_SCHEMA_REGISTRY_URL`` is set, else the manifest).
        validate: Validate records on :meth:`encode` (leave on outside benchmarks).

    Raises:
        ConfigError: Unknown record type, or the schemas/registry cannot be set up.
    """

    def __init__(
        self,
        record_type: type[T],
        *,
        topic: str | None = None,
        ids: SchemaIds | None = None,
        validate: bool = True,
    ) -> None:
        self.record_name: str = record_type.__name__
        self.topic = topic
        self._ids = default_schema_ids() if ids is None else ids
        self._validate = validate
        schema = load_schema(self.record_name)
        self._write_schema = _parse(schema, plain_times=False)
        self._read_schema = _parse(schema, plain_times=True)
        self._fullname = f"{schema.get('namespace', '')}.{schema['name']}".lstrip(".")
        self.schema_id: int = self._ids.writer_id(self.record_name, topic)
        self._lock = threading.Lock()
        self._writers: dict[int, Any] = {}

    def __repr__(self) -> str:
        return f"AvroSerde({self.record_name}, id={self.schema_id}, topic={self.topic!r})"

    def encode(self, record: T) -> bytes:
        """Validate ``record`` and return it framed with the current schema id.

        Raises:
            SchemaError: The record does not match the schema (the message names the
                offending field).
        """
        if not isinstance(record, Mapping):
            raise SchemaError(
                f"{self.record_name}: expected a mapping, got {type(record).__name__}"
            )
        buf = io.BytesIO()
        buf.write(_HEADER.pack(MAGIC, self.schema_id))
        try:
            if self._validate:
                _validate(record, self._write_schema, raise_errors=True)
            fastavro.schemaless_writer(
                buf,
                self._write_schema,
                dict(record),
                strict=False,  # strict=True would also refuse omitted fields with defaults
                strict_allow_default=self._validate,
            )
        except _ENCODE_ERRORS as exc:
            raise SchemaError(f"{self.record_name}: invalid record: {_one_line(exc)}") from exc
        return buf.getvalue()

    def decode(self, data: bytes | bytearray | memoryview) -> T:
        """Decode a framed value into a record of the current schema.

        Fields added since the value was written get their defaults.

        Raises:
            SchemaError: Null or short buffer, wrong magic byte, unknown schema id, a
                schema id of another record type, truncated or trailing bytes, or a
                writer schema that does not resolve to the current one.
        """
        schema_id = peek_schema_id(data)
        writer_schema = self._writer(schema_id)
        view = memoryview(data)[HEADER_SIZE:]
        buf = io.BytesIO(view)
        try:
            if writer_schema is None:
                record = fastavro.schemaless_reader(buf, self._read_schema, None)
            else:
                record = fastavro.schemaless_reader(buf, writer_schema, self._read_schema)
        except DECODE_ERRORS as exc:
            raise SchemaError(
                f"{self.record_name} (schema id {schema_id}): corrupt or truncated Avro "
                f"payload of {len(view)} bytes: {_one_line(exc)}"
            ) from exc
        rest = len(view) - buf.tell()
        if rest:
            raise SchemaError(
                f"{self.record_name} (schema id {schema_id}): {rest} trailing bytes after the "
                f"record (wrong schema id, or a corrupt value)"
            )
        if not isinstance(record, dict):
            raise SchemaError(f"{self.record_name}: decoded a {type(record).__name__}")
        return cast(T, record)

    def _writer(self, schema_id: int) -> Any | None:
        """Parsed writer schema of ``schema_id``; ``None`` when it is the current one."""
        if schema_id == self.schema_id:
            return None
        with self._lock:
            if schema_id in self._writers:
                return self._writers[schema_id]
        ws: WriterSchema = self._ids.writer_schema(schema_id)
        if ws.record != self.record_name:
            raise SchemaError(
                f"schema id {schema_id} belongs to record {ws.record}, expected "
                f"{self.record_name} (wrong topic?)"
            )
        parsed = None if ws.current else _parse(ws.schema, plain_times=True)
        with self._lock:
            self._writers[schema_id] = parsed
        return parsed


def _one_line(exc: BaseException) -> str:
    text = " ".join(_OBJECT_REPR.sub("", str(exc)).split())
    text = text or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
