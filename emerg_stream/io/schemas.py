"""Where the Avro schemas live, and how a schema id maps to a schema.

Files (``schemas/`` at the repository root, the source of truth)::

    schemas/<Name>.avsc              the current schema of record <Name>
    schemas/history/<Name>.v<N>.avsc every version ever shipped, frozen (v<current> == current)
    schemas/ids.json                 the id manifest (below)

The manifest ``ids.json`` gives every (record, version) a schema id that is unique across
all records, so a framed value names its writer schema unambiguously::

    {
      "doc": "...",
      "records": {
        "ItemEvent": {
          "current": 1,
          "versions": [
            {"version": 1, "id": 10001, "file": "history/ItemEvent.v1.avsc",
             "fingerprint": "sha256:<hex of the Parsing Canonical Form>"}
          ]
        },
        ...
      }
    }

Evolving a schema: edit ``<Name>.avsc`` (new fields need a default), copy it to
``history/<Name>.v<N+1>.avsc``, append a version entry with a fresh id (the largest id in
the manifest + 1) and its fingerprint (:func:`fingerprint`), and set ``current``. The unit
tests fail until the manifest and the history agree, and fail for good if data written by
an older version no longer decodes with the new one.

Packaging: ``schemas/`` is the one folder. The build hook in ``setup.py`` copies it into the
wheel as package data, ``emerg_stream/schemas/`` (same layout), so an installed package
finds its schemas without the repository; the source tree holds no copy. Lookup order of
:func:`schema_dir`: ``$EMERG_SCHEMA_DIR``, then the package data (an installed wheel), then
``schemas/`` at the root of the checkout this module lives in (a source checkout or an
editable install).

Schema ids come from the manifest (:class:`ManifestSchemaIds`) unless a Confluent Schema
Registry is configured (``$EMERG_SCHEMA_REGISTRY_URL``, :class:`RegistrySchemaIds`), in
which case the current schema of each record is registered under ``<topic>-value``. The two
id spaces are distinct (the manifest's ids start at 10001), so a value framed in one mode
read in the other fails with "unknown schema id" instead of decoding garbage.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from fastavro.schema import fingerprint as _avro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from emerg_stream.errors import ConfigError, EmergError, SchemaError, TransientError
from emerg_stream.topic_roles import RECORD_NAMES

__all__ = [
    "NAMESPACE",
    "RECORD_NAMES",
    "REGISTRY_TIMEOUT_S",
    "REGISTRY_URL_ENV",
    "SCHEMA_DIR_ENV",
    "ConfluentRegistryClient",
    "Manifest",
    "ManifestSchemaIds",
    "RecordEntry",
    "RegistryClient",
    "RegistrySchemaIds",
    "SchemaIds",
    "VersionEntry",
    "WriterSchema",
    "default_schema_ids",
    "fingerprint",
    "load_manifest",
    "load_schema",
    "packaged_schema_dir",
    "schema_dir",
]

#: Avro namespace of every record.
NAMESPACE = "emerg_stream"
#: Environment variable naming a schema folder (overrides the lookup).
SCHEMA_DIR_ENV = "EMERG_SCHEMA_DIR"
#: Environment variable naming a Confluent Schema Registry (switches ids to the registry).
REGISTRY_URL_ENV = "EMERG_SCHEMA_REGISTRY_URL"
#: Seconds one schema-registry request may take (connect, send, read) before it fails.
REGISTRY_TIMEOUT_S = 5.0

_MANIFEST = "ids.json"


def packaged_schema_dir() -> Path:
    """Return where a wheel carries ``schemas/`` (package data; absent in a checkout)."""
    return Path(__file__).resolve().parents[1] / "schemas"


def schema_dir() -> Path:
    """Return the folder holding the ``.avsc`` files and ``ids.json``.

    Order: ``$EMERG_SCHEMA_DIR``; the package data ``emerg_stream/schemas`` of an installed
    wheel; ``schemas/`` at the root of the checkout this module lives in.

    Raises:
        ConfigError: ``$EMERG_SCHEMA_DIR`` is set but holds no ``ids.json``, or no
            candidate folder exists.
    """
    env = os.environ.get(SCHEMA_DIR_ENV)
    if env:
        path = Path(env)
        if not (path / _MANIFEST).is_file():
            raise ConfigError(f"${SCHEMA_DIR_ENV}={env} holds no {_MANIFEST}")
        return path
    packaged = packaged_schema_dir()
    if (packaged / _MANIFEST).is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[2]
    repo = checkout / "schemas"
    if (checkout / "pyproject.toml").is_file() and (repo / _MANIFEST).is_file():
        return repo  # a source checkout (editable install); not site-packages/schemas
    raise ConfigError(
        f"no schema folder found: set ${SCHEMA_DIR_ENV}, or reinstall emerg-stream "
        f"(expected {repo} or {packaged})"
    )


def fingerprint(schema: dict[str, Any]) -> str:
    """Return ``"sha256:<hex>"`` of the schema's Avro Parsing Canonical Form.

    The canonical form ignores docs, defaults and field order of JSON attributes, so two
    schemas with the same fingerprint have the same wire format.
    """
    canonical = to_parsing_canonical_form(schema)
    return "sha256:" + str(_avro_fingerprint(canonical, "SHA-256"))


@dataclass(frozen=True)
class VersionEntry:
    """One shipped version of a record's schema.

    Args:
        version: 1, 2, ... per record.
        schema_id: Id framed in front of values written with this version.
        file: Path of the frozen schema, relative to the schema folder.
        fingerprint: :func:`fingerprint` of that schema.
    """

    version: int
    schema_id: int
    file: str
    fingerprint: str


@dataclass(frozen=True)
class RecordEntry:
    """The versions of one record and which one is current."""

    name: str
    current: int
    versions: dict[int, VersionEntry]

    @property
    def current_entry(self) -> VersionEntry:
        """The entry of the current version."""
        return self.versions[self.current]


@dataclass(frozen=True)
class Manifest:
    """The parsed ``ids.json``: records by name, and every id back to its version."""

    root: Path
    records: dict[str, RecordEntry]
    by_id: dict[int, tuple[str, VersionEntry]]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def load_manifest(root: Path | None = None) -> Manifest:
    """Read and check ``ids.json`` of a schema folder (default: :func:`schema_dir`).

    Raises:
        ConfigError: The file is unreadable, malformed, has duplicate ids, a missing
            current version, or lacks one of :data:`RECORD_NAMES`.
    """
    root = schema_dir() if root is None else root
    raw = _read_json(root / _MANIFEST)
    try:
        records_raw: dict[str, Any] = raw["records"]
        records: dict[str, RecordEntry] = {}
        by_id: dict[int, tuple[str, VersionEntry]] = {}
        for name, rec in records_raw.items():
            versions: dict[int, VersionEntry] = {}
            for v in rec["versions"]:
                entry = VersionEntry(
                    version=int(v["version"]),
                    schema_id=int(v["id"]),
                    file=str(v["file"]),
                    fingerprint=str(v["fingerprint"]),
                )
                if entry.version in versions:
                    raise ConfigError(f"{name}: version {entry.version} listed twice")
                if entry.schema_id in by_id:
                    other = by_id[entry.schema_id][0]
                    raise ConfigError(f"schema id {entry.schema_id} used by {other} and {name}")
                versions[entry.version] = entry
                by_id[entry.schema_id] = (name, entry)
            current = int(rec["current"])
            if current not in versions:
                raise ConfigError(f"{name}: current version {current} is not listed")
            records[name] = RecordEntry(name=name, current=current, versions=versions)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{root / _MANIFEST} is malformed: {exc!r}") from exc
    missing = [n for n in RECORD_NAMES if n not in records]
    if missing:
        raise ConfigError(f"{root / _MANIFEST} lacks records {missing}")
    return Manifest(root=root, records=records, by_id=by_id)


def load_schema(name: str, version: int | None = None, root: Path | None = None) -> dict[str, Any]:
    """Return a record's schema as JSON (a dict), current or a historical version.

    Args:
        name: Record name, e.g. ``"ItemParams"``.
        version: A historical version number; ``None`` reads ``<Name>.avsc``.
        root: Schema folder (default: :func:`schema_dir`).

    Raises:
        ConfigError: Unknown record or version, or an unreadable file.
    """
    root = schema_dir() if root is None else root
    if name not in RECORD_NAMES:
        raise ConfigError(f"unknown record {name!r}; known: {', '.join(RECORD_NAMES)}")
    path = (
        root / f"{name}.avsc" if version is None else root / "history" / f"{name}.v{version}.avsc"
    )
    if not path.is_file():
        raise ConfigError(f"no schema file {path}")
    schema: dict[str, Any] = _read_json(path)
    return schema


@dataclass(frozen=True)
class WriterSchema:
    """The schema a framed value was written with.

    Args:
        record: Short record name (``"ItemEvent"``), or the full name for a foreign record.
        schema: The schema JSON.
        current: Whether it is the current version (no schema resolution needed).
    """

    record: str
    schema: dict[str, Any]
    current: bool


class SchemaIds(Protocol):
    """Maps records to the id they are written with, and ids back to writer schemas."""

    def writer_id(self, record: str, topic: str | None) -> int:
        """Return the id of ``record``'s current schema (registering it if needed)."""
        ...

    def writer_schema(self, schema_id: int) -> WriterSchema:
        """Return the schema behind ``schema_id``; raise :class:`SchemaError` if unknown."""
        ...


class ManifestSchemaIds:
    """Schema ids from the checked-in manifest ``ids.json`` (no network).

    Args:
        root: Schema folder (default: :func:`schema_dir`).
    """

    def __init__(self, root: Path | None = None) -> None:
        self._manifest = load_manifest(root)

    @property
    def manifest(self) -> Manifest:
        """The parsed manifest."""
        return self._manifest

    def writer_id(self, record: str, topic: str | None) -> int:
        """Return the manifest id of ``record``'s current version (``topic`` is unused)."""
        entry = self._manifest.records.get(record)
        if entry is None:
            raise ConfigError(f"record {record!r} is not in {self._manifest.root / _MANIFEST}")
        return entry.current_entry.schema_id

    def writer_schema(self, schema_id: int) -> WriterSchema:
        """Return the (historical or current) schema of a manifest id."""
        hit = self._manifest.by_id.get(schema_id)
        if hit is None:
            raise SchemaError(
                f"unknown schema id {schema_id}: not in {self._manifest.root / _MANIFEST} "
                f"(written by a newer emerg-stream, or through a schema registry?)"
            )
        name, entry = hit
        rec = self._manifest.records[name]
        schema = _load_cached(str(self._manifest.root / entry.file))
        return WriterSchema(record=name, schema=schema, current=entry.version == rec.current)


@cache
def _load_cached(path: str) -> dict[str, Any]:
    schema: dict[str, Any] = _read_json(Path(path))
    return schema


class RegistryClient(Protocol):
    """The two registry calls the codec needs (adapter over Confluent's client).

    Implementations raise :class:`SchemaError` for an id or subject the registry refuses,
    :class:`TransientError` when it cannot be reached.
    """

    def register(self, subject: str, schema_str: str) -> int:
        """Register an Avro schema under ``subject`` (idempotent); return its id."""
        ...

    def schema_str(self, schema_id: int) -> str:
        """Return the Avro schema text of ``schema_id``."""
        ...


class ConfluentRegistryClient:
    """:class:`RegistryClient` over ``confluent_kafka.schema_registry.SchemaRegistryClient``.

    Registry failures are sorted the way the stream needs them: an id or subject the
    registry does not know is a :class:`SchemaError` (the record is dead-lettered), any
    other failure (connection, HTTP 5xx, no answer) a :class:`TransientError` (retry, don't
    drop). Each request times out after :data:`REGISTRY_TIMEOUT_S` (the client's own default
    is no timeout: a frozen registry held the caller until it thawed); with the client's
    3 retries a registry that does not answer fails a call in about half a minute.

    Args:
        url: Registry URL, e.g. ``http://127.0.0.1:8081``.
        conf: Extra client settings (``basic.auth.user.info``, ``ssl.ca.location``,
            ``timeout``, ...).

    Raises:
        ConfigError: The registry extra of confluent-kafka is not installed.
    """

    def __init__(self, url: str, conf: dict[str, str] | None = None) -> None:
        try:
            from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
            from confluent_kafka.schema_registry.error import SchemaRegistryError
        except ImportError as exc:
            raise ConfigError(
                f"${REGISTRY_URL_ENV} is set but the schema-registry client cannot be "
                f"imported ({exc}); install it with: pip install 'confluent-kafka[schemaregistry]'"
            ) from exc
        # typed loosely: the class's stub differs between confluent-kafka releases
        self._schema_cls: Any = Schema
        self._error_cls: type[Exception] = SchemaRegistryError
        settings: dict[str, object] = {"url": url, "timeout": REGISTRY_TIMEOUT_S}
        self._client = SchemaRegistryClient({**settings, **(conf or {})})

    def _wrap(self, what: str, exc: Exception) -> EmergError:
        status = getattr(exc, "http_status_code", None)
        if isinstance(exc, self._error_cls) and status is not None and 400 <= status < 500:
            return SchemaError(f"{what}: schema registry refused ({status}): {exc}")
        return TransientError(f"{what}: schema registry unavailable: {exc}")

    def register(self, subject: str, schema_str: str) -> int:
        """Register ``schema_str`` under ``subject`` and return its id."""
        try:
            schema_id: int = self._client.register_schema(
                subject, self._schema_cls(schema_str, schema_type="AVRO")
            )
        except Exception as exc:  # the client raises its own and transport errors
            raise self._wrap(f"register {subject}", exc) from exc
        return schema_id

    def schema_str(self, schema_id: int) -> str:
        """Fetch the schema text of ``schema_id``."""
        try:
            text = self._client.get_schema(schema_id).schema_str
        except Exception as exc:  # the client raises its own and transport errors
            raise self._wrap(f"schema id {schema_id}", exc) from exc
        if not text:
            raise SchemaError(f"schema id {schema_id}: the registry returned no schema text")
        return str(text)


class RegistrySchemaIds:
    """Schema ids from a Confluent Schema Registry.

    The current schema of a record is registered under the subject ``<topic>-value``
    (TopicNameStrategy); without a topic, under the record's full name
    (RecordNameStrategy, e.g. ``emerg_stream.ItemEvent``). Ids seen on the wire are
    fetched once and cached; a thread-safe cache, since a serde may be shared.

    Args:
        client: The registry (see :class:`ConfluentRegistryClient`).
        root: Schema folder holding the current ``.avsc`` files.
    """

    def __init__(self, client: RegistryClient, root: Path | None = None) -> None:
        self._client = client
        self._root = schema_dir() if root is None else root
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._schemas: dict[int, WriterSchema] = {}
        self._current_fp = {n: fingerprint(load_schema(n, root=self._root)) for n in RECORD_NAMES}

    def writer_id(self, record: str, topic: str | None) -> int:
        """Register (once per subject) ``record``'s current schema and return its id."""
        subject = f"{topic}-value" if topic else f"{NAMESPACE}.{record}"
        with self._lock:
            cached = self._ids.get(subject)
        if cached is not None:
            return cached
        schema = load_schema(record, root=self._root)
        schema_id = self._client.register(subject, json.dumps(schema))
        with self._lock:
            self._ids[subject] = schema_id
            self._schemas[schema_id] = WriterSchema(record=record, schema=schema, current=True)
        return schema_id

    def writer_schema(self, schema_id: int) -> WriterSchema:
        """Return the schema of ``schema_id``, fetching it from the registry once."""
        with self._lock:
            hit = self._schemas.get(schema_id)
        if hit is not None:
            return hit
        text = self._client.schema_str(schema_id)
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise SchemaError(f"schema id {schema_id}: registry returned invalid JSON") from exc
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise SchemaError(f"schema id {schema_id} is not an Avro record schema")
        namespace = schema.get("namespace", "")
        name = str(schema.get("name", ""))
        record = name if namespace == NAMESPACE else f"{namespace}.{name}"
        fp = fingerprint(schema)
        writer = WriterSchema(
            record=record, schema=schema, current=self._current_fp.get(record) == fp
        )
        with self._lock:
            self._schemas[schema_id] = writer
        return writer


def default_schema_ids(registry_url: str | None = None) -> SchemaIds:
    """Return registry ids if a registry URL is given or in ``$EMERG_SCHEMA_REGISTRY_URL``.

    Otherwise the manifest ids. The registry URL must come from the operator's settings;
    nothing here guesses one.
    """
    url = registry_url or os.environ.get(REGISTRY_URL_ENV)
    if url:
        return RegistrySchemaIds(ConfluentRegistryClient(url))
    return _manifest_ids(str(schema_dir()))


@cache
def _manifest_ids(root: str) -> ManifestSchemaIds:
    return ManifestSchemaIds(Path(root))
