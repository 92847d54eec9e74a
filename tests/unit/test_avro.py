"""The Avro codec: framing, round trips, validation, and every decode failure as SchemaError."""

from __future__ import annotations

import contextlib
import struct
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emerg_stream.errors import SchemaError, TransientError
from emerg_stream.io.avro import HEADER_SIZE, AvroSerde, frame, peek_schema_id
from emerg_stream.io.records import (
    DeadLetter,
    Interaction,
    ItemEvent,
    ItemParams,
    ItemState,
    Prediction,
)
from emerg_stream.io.schemas import ManifestSchemaIds, RegistrySchemaIds, load_schema

T0 = 1_700_000_000_123

ITEM_EVENT: ItemEvent = {
    "item_id": "movie-42",
    "categorical": {"year": "1995"},
    "multi": {"genres": ["Comedy", "Drama"], "title": ["toy", "story"]},
    "numeric": {"price": 9.5},
    "event_time": T0,
}
INTERACTION: Interaction = {
    "event_id": "e-1",
    "item_id": "movie-42",
    "user_id": "u-7",
    "categorical": {"gender": "F", "age": "25"},
    "multi": {},
    "numeric": {},
    "label": 1,
    "event_time": T0 + 5,
}
ITEM_PARAMS: ItemParams = {
    "item_id": "movie-42",
    "version": 3,
    "phase": "warm_b",
    "support_size": 40,
    "model_version": "emerg-ml1m-2026-11-26",
    "method": "emerg",
    "n_fields": 3,
    "adjacency": [0.5, 0.25, 1.0, 0.0, -0.75, 2.0, 0.125, 0.0, 1.5],
    "id_embedding": [0.25, -0.5, 0.0, 1.0],
    "source_offsets": [{"topic": "emerg.interactions", "partition": 2, "offset": 1234}],
    "produced_time": T0 + 10,
}
PREDICTION: Prediction = {
    "event_id": "e-1",
    "item_id": "movie-42",
    "user_id": "u-7",
    "score": 0.8125,
    "label": 1,
    "params_version": 2,
    "phase": "warm_a",
    "event_time": T0 + 5,
    "method": "deepfm",
    "shadow": True,
}
DEAD_LETTER: DeadLetter = {
    "source_topic": "emerg.interactions",
    "source_partition": 1,
    "source_offset": 99,
    "key": b"movie-42",
    "value": b"\x07garbage",
    "error_kind": "decode",
    "message": "wrong magic byte 0x07",
    "failed_time": T0 + 20,
    "truncated": False,
    "value_size": 9,
    "value_sha256": "0" * 64,
    "key_size": 8,
}
ITEM_STATE: ItemState = {
    "item_id": "movie-42",
    "categorical": {"year": "1995"},
    "multi": {"genres": ["Comedy"]},
    "numeric": {},
    "version": 3,
    "phase": "warm_b",
    "support_size": 40,
    "next_threshold": 60,
    "support": [
        {
            "event_id": "e-1",
            "user_id": "u-7",
            "categorical": {"gender": "F"},
            "multi": {},
            "numeric": {"age": 25.0},
            "label": 1,
            "event_time": T0 + 5,
        }
    ],
    "recent_event_ids": ["e-1"],
    "recent_event_hashes": bytes(range(8)),
    "recent_content_hashes": bytes(range(4)),
    "adjacency": [1.0, 0.5, 0.5, 1.0],
    "id_embedding": [0.5, 0.25],
    "n_fields": 2,
    "last_offsets": [{"topic": "emerg.interactions", "partition": 2, "offset": 1234}],
    "updated_time": T0 + 30,
    "shadow_adjacency": [],
    "shadow_id_embedding": [0.125, 0.5],
    "shadow_model_version": "b" * 16,
}

EXAMPLES: list[tuple[type[Any], dict[str, Any]]] = [
    (ItemEvent, dict(ITEM_EVENT)),
    (Interaction, dict(INTERACTION)),
    (ItemParams, dict(ITEM_PARAMS)),
    (Prediction, dict(PREDICTION)),
    (DeadLetter, dict(DEAD_LETTER)),
    (ItemState, dict(ITEM_STATE)),
]


@pytest.fixture(scope="module")
def ids() -> ManifestSchemaIds:
    return ManifestSchemaIds()


@pytest.mark.parametrize(
    ("record_type", "record"), EXAMPLES, ids=lambda v: getattr(v, "__name__", "")
)
def test_round_trip_every_record(
    record_type: type[Any], record: dict[str, Any], ids: ManifestSchemaIds
) -> None:
    serde = AvroSerde(record_type, ids=ids)
    data = serde.encode(record)
    assert data[0] == 0
    assert peek_schema_id(data) == serde.schema_id == ids.writer_id(record_type.__name__, None)
    assert serde.decode(data) == record  # the example floats are exact in float32


def test_floats_are_float32_on_the_wire(ids: ManifestSchemaIds) -> None:
    serde = AvroSerde(ItemParams, ids=ids)
    rec = {**ITEM_PARAMS, "adjacency": [0.1] * 9}
    out = serde.decode(serde.encode(rec))  # type: ignore[arg-type]
    assert out["adjacency"][0] == pytest.approx(0.1, rel=1e-7)
    assert out["adjacency"][0] != 0.1


def test_times_decode_as_int_milliseconds_and_encode_from_datetime(ids: ManifestSchemaIds) -> None:
    serde = AvroSerde(ItemEvent, ids=ids)
    when = datetime(2026, 11, 26, 12, 0, 0, 250_000, tzinfo=UTC)
    out = serde.decode(serde.encode({**ITEM_EVENT, "event_time": when}))  # type: ignore[typeddict-item]
    assert out["event_time"] == int(when.timestamp() * 1000)
    assert isinstance(out["event_time"], int)


def test_framing_is_confluent_wire_format(ids: ManifestSchemaIds) -> None:
    serde = AvroSerde(Prediction, ids=ids)
    data = serde.encode(PREDICTION)
    magic, schema_id = struct.unpack(">bI", data[:HEADER_SIZE])
    assert (magic, schema_id) == (0, serde.schema_id)
    assert frame(serde.schema_id, data[HEADER_SIZE:]) == data


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda r: {**r, "version": "three"}, "version"),
        (lambda r: {k: v for k, v in r.items() if k != "phase"}, "phase"),
        (lambda r: {**r, "surprise": 1}, "surprise"),
        (lambda r: {**r, "adjacency": [0.5, "x"]}, "adjacency"),
        (lambda r: {**r, "source_offsets": [{"topic": "t", "partition": 0}]}, "offset"),
        (lambda r: {**r, "support_size": 2**40}, "support_size"),
    ],
    ids=["wrong-type", "missing", "unknown-field", "bad-array-item", "bad-nested", "int-overflow"],
)
def test_encode_rejects_invalid_records(mutate: Any, fragment: str, ids: ManifestSchemaIds) -> None:
    serde = AvroSerde(ItemParams, ids=ids)
    with pytest.raises(SchemaError, match=fragment):
        serde.encode(mutate(dict(ITEM_PARAMS)))


def test_encode_fills_defaults_of_omitted_optional_fields(ids: ManifestSchemaIds) -> None:
    serde = AvroSerde(ItemEvent, ids=ids)
    out = serde.decode(serde.encode({"item_id": "i", "event_time": T0}))  # type: ignore[typeddict-item]
    assert out == {"item_id": "i", "categorical": {}, "multi": {}, "numeric": {}, "event_time": T0}


def test_decode_failures_are_schema_errors_with_a_reason(ids: ManifestSchemaIds) -> None:
    serde = AvroSerde(ItemParams, ids=ids)
    good = serde.encode(ITEM_PARAMS)
    other = AvroSerde(ItemEvent, ids=ids).encode(ITEM_EVENT)
    cases = {
        "short buffer": b"\x00\x00",
        "wrong magic": b"\x01" + good[1:],
        "unknown schema id": frame(4_000_000, good[HEADER_SIZE:]),
        "belongs to record ItemEvent": other,
        "truncated": good[:-3],
        "trailing bytes": good + b"\x00",
        "null value": None,
    }
    for reason, data in cases.items():
        with pytest.raises(SchemaError, match=reason if reason != "truncated" else "truncated"):
            serde.decode(data)  # type: ignore[arg-type]


def test_truncated_payload_chains_the_original_exception(ids: ManifestSchemaIds) -> None:
    serde = AvroSerde(ItemParams, ids=ids)
    with pytest.raises(SchemaError) as info:
        serde.decode(serde.encode(ITEM_PARAMS)[:20])
    assert isinstance(info.value.__cause__, EOFError)
    assert "object at 0x" not in str(info.value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=200))
def test_random_payload_decodes_or_raises_schema_error(payload: bytes) -> None:
    serde = AvroSerde(Interaction, ids=ManifestSchemaIds())
    try:
        rec = serde.decode(frame(serde.schema_id, payload))
    except SchemaError:
        return
    assert set(rec) == set(INTERACTION)


@settings(max_examples=100, deadline=None)
@given(
    cut=st.integers(min_value=0, max_value=400),
    flip=st.integers(min_value=0, max_value=255),
)
def test_corrupted_valid_value_decodes_or_raises_schema_error(cut: int, flip: int) -> None:
    serde = AvroSerde(ItemState, ids=ManifestSchemaIds())
    data = bytearray(serde.encode(ITEM_STATE))
    pos = HEADER_SIZE + cut % (len(data) - HEADER_SIZE)
    data[pos] ^= flip
    with contextlib.suppress(SchemaError):
        serde.decode(bytes(data))


class FakeRegistry:
    """An in-memory registry: ids from 1, one id per distinct schema text."""

    def __init__(self) -> None:
        self.subjects: dict[str, int] = {}
        self.texts: dict[int, str] = {}
        self.fetches = 0

    def register(self, subject: str, schema_str: str) -> int:
        for sid, text in self.texts.items():
            if text == schema_str:
                self.subjects[subject] = sid
                return sid
        sid = len(self.texts) + 1
        self.texts[sid] = schema_str
        self.subjects[subject] = sid
        return sid

    def schema_str(self, schema_id: int) -> str:
        self.fetches += 1
        if schema_id not in self.texts:
            raise SchemaError(f"schema id {schema_id}: schema registry refused (404)")
        return self.texts[schema_id]


def test_registry_ids_register_under_topic_value_subject() -> None:
    registry = FakeRegistry()
    ids = RegistrySchemaIds(registry)
    serde = AvroSerde(Interaction, topic="emerg.interactions", ids=ids)
    assert registry.subjects == {"emerg.interactions-value": serde.schema_id}
    data = serde.encode(INTERACTION)
    # a second process with a cold cache fetches the writer schema once, by id
    reader = AvroSerde(Interaction, topic="emerg.interactions", ids=RegistrySchemaIds(registry))
    assert reader.decode(data) == INTERACTION
    no_topic = AvroSerde(ItemEvent, ids=ids)
    assert "emerg_stream.ItemEvent" in registry.subjects
    assert no_topic.schema_id != serde.schema_id


def test_registry_decodes_an_older_writer_schema_and_rejects_unknown_ids() -> None:
    registry = FakeRegistry()
    old = load_schema("Interaction")
    old["fields"] = [f for f in old["fields"] if f["name"] != "numeric"]  # an older shape
    import io
    import json

    import fastavro

    old_id = registry.register("emerg.interactions-value", json.dumps(old))
    buf = io.BytesIO()
    fastavro.schemaless_writer(
        buf,
        fastavro.parse_schema(old),
        {k: v for k, v in INTERACTION.items() if k != "numeric"},
    )
    serde = AvroSerde(Interaction, topic="emerg.interactions", ids=RegistrySchemaIds(registry))
    assert serde.schema_id != old_id
    assert serde.decode(frame(old_id, buf.getvalue())) == {**INTERACTION, "numeric": {}}
    with pytest.raises(SchemaError, match="refused"):
        serde.decode(frame(999, buf.getvalue()))


def test_registry_outage_is_transient_not_a_poison_record() -> None:
    class Down(FakeRegistry):
        def schema_str(self, schema_id: int) -> str:
            raise TransientError("schema registry unavailable: connection refused")

    registry = Down()
    serde = AvroSerde(Interaction, topic="t", ids=RegistrySchemaIds(registry))
    with pytest.raises(TransientError):
        serde.decode(frame(serde.schema_id + 1, b""))
