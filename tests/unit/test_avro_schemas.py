"""The schema files: manifest, frozen history, backward compatibility, docs, one folder.

The compatibility test is the guard against incompatible changes: data written with every
shipped version of a schema must decode with the current one (reader = current, writer =
historical, fastavro schema resolution), and the codec must read old framed values.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.utils import generate_many

from emerg_stream.errors import ConfigError
from emerg_stream.io import records
from emerg_stream.io.avro import AvroSerde, frame
from emerg_stream.io.schemas import (
    RECORD_NAMES,
    ManifestSchemaIds,
    fingerprint,
    load_manifest,
    load_schema,
    packaged_schema_dir,
    schema_dir,
)

REPO_SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
MANIFEST = load_manifest(REPO_SCHEMAS)
HISTORY = [
    (name, version) for name in RECORD_NAMES for version in sorted(MANIFEST.records[name].versions)
]


def _plain_times(node: Any) -> Any:
    """Drop timestamp logical types so generated and decoded times are plain ints."""
    if isinstance(node, dict):
        return {
            k: _plain_times(v)
            for k, v in node.items()
            if not (k == "logicalType" and str(v).startswith("timestamp-"))
        }
    if isinstance(node, list):
        return [_plain_times(v) for v in node]
    return node


def test_schema_dir_is_the_repository_folder_in_a_checkout() -> None:
    assert schema_dir() == REPO_SCHEMAS


def test_schema_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMERG_SCHEMA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"ids\.json"):
        schema_dir()
    (tmp_path / "ids.json").write_text("{}")
    assert schema_dir() == tmp_path
    with pytest.raises(ConfigError, match=r"malformed|lacks"):
        load_manifest()


@pytest.mark.parametrize("name", RECORD_NAMES)
def test_current_schema_is_registered_as_the_current_version(name: str) -> None:
    entry = MANIFEST.records[name].current_entry
    current = load_schema(name, root=REPO_SCHEMAS)
    assert fingerprint(current) == entry.fingerprint, (
        f"schemas/{name}.avsc changed its wire format without a new version: copy it to "
        f"history/{name}.v<N+1>.avsc and add that version (new id, fingerprint) to ids.json"
    )
    assert entry.file == f"history/{name}.v{entry.version}.avsc"
    assert load_schema(name, entry.version, root=REPO_SCHEMAS) == current


@pytest.mark.parametrize(("name", "version"), HISTORY)
def test_history_files_are_frozen(name: str, version: int) -> None:
    entry = MANIFEST.records[name].versions[version]
    assert (REPO_SCHEMAS / entry.file).is_file()
    assert fingerprint(load_schema(name, version, root=REPO_SCHEMAS)) == entry.fingerprint


def test_schema_ids_are_unique_and_fit_the_frame() -> None:
    all_ids = [v.schema_id for r in MANIFEST.records.values() for v in r.versions.values()]
    assert len(all_ids) == len(set(all_ids))
    assert all(0 < i < 2**31 for i in all_ids)


@pytest.mark.parametrize(("name", "version"), HISTORY)
def test_data_of_every_historical_version_decodes_with_the_current_schema(
    name: str, version: int
) -> None:
    writer = _plain_times(load_schema(name, version, root=REPO_SCHEMAS))
    reader = _plain_times(load_schema(name, root=REPO_SCHEMAS))
    parsed_writer = fastavro.parse_schema(writer, named_schemas={})
    parsed_reader = fastavro.parse_schema(reader, named_schemas={})
    reader_fields = {f["name"] for f in reader["fields"]}
    serde = AvroSerde(getattr(records, name), ids=ManifestSchemaIds(REPO_SCHEMAS))
    schema_id = MANIFEST.records[name].versions[version].schema_id
    for datum in generate_many(writer, 25):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed_writer, datum)
        payload = buf.getvalue()
        # 1. plain Avro schema resolution, writer = historical, reader = current
        resolved = fastavro.schemaless_reader(io.BytesIO(payload), parsed_writer, parsed_reader)
        assert set(resolved) == reader_fields
        # 2. the codec, given a value framed with the historical id
        assert serde.decode(frame(schema_id, payload)) == resolved


@pytest.mark.parametrize("name", RECORD_NAMES)
def test_every_record_and_field_is_documented(name: str) -> None:
    def walk(schema: Any, where: str) -> None:
        if isinstance(schema, dict) and schema.get("type") == "record":
            assert schema.get("doc"), f"{where}: record {schema['name']} has no doc"
            for field in schema["fields"]:
                assert field.get("doc"), f"{where}.{field['name']} has no doc"
                walk(field["type"], f"{where}.{field['name']}")
        elif isinstance(schema, dict):
            for key in ("items", "values"):
                if key in schema:
                    walk(schema[key], where)
        elif isinstance(schema, list):
            for branch in schema:
                walk(branch, where)

    schema = load_schema(name, root=REPO_SCHEMAS)
    assert schema["namespace"] == "emerg_stream"
    walk(schema, name)


@pytest.mark.parametrize("name", RECORD_NAMES)
def test_collection_and_nullable_fields_have_defaults_for_evolution(name: str) -> None:
    schema = load_schema(name, root=REPO_SCHEMAS)
    for field in schema["fields"]:
        t = field["type"]
        if isinstance(t, list) or (isinstance(t, dict) and t.get("type") == "map"):
            assert "default" in field, f"{name}.{field['name']} needs a default"


@pytest.mark.parametrize("name", RECORD_NAMES)
def test_typed_dicts_mirror_the_schemas(name: str) -> None:
    schema = load_schema(name, root=REPO_SCHEMAS)
    typed = getattr(records, name)
    assert list(typed.__annotations__) == [f["name"] for f in schema["fields"]]


def test_one_schema_folder_in_the_source_tree() -> None:
    # the wheel's package data is made from schemas/ at build time (setup.py); no copy here
    copies = sorted(
        str(p.relative_to(REPO_SCHEMAS.parent))
        for p in (REPO_SCHEMAS.parent / "emerg_stream").rglob("*")
        if p.suffix == ".avsc" or p.name == "ids.json"
    )
    assert not copies, f"a second copy of the schemas: {copies}"
    assert not packaged_schema_dir().exists()
    assert schema_dir() == REPO_SCHEMAS
