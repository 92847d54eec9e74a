"""Decode and validate input records; a bad record becomes a :class:`Rejected` value.

What is rejected (each with its ``error_kind``, see :mod:`emerg_stream.stream.dlq`):
a null value, bytes that are not a framed Avro value of the topic's record (short,
wrong magic byte, truncated, trailing bytes, missing fields), an unknown schema id or
one of another record type, an empty item or event id, a label other than 0/1, a NaN,
infinite or absurdly large (beyond ``MAX_ABS_NUMERIC``) numeric feature, and a feature
sent in the map of a kind the checkpoint's spec contradicts (e.g. a numeric field in the
``categorical`` map), and an id, feature name or token longer than ``max_string_bytes``
(UTF-8; ``oversize_field``). Fields the spec does not know are ignored, and unknown
*values* of known categorical fields are not errors: the encoder maps them to
out-of-vocabulary. Record sizes and event times are checked by the processor (before
decoding and against its clocks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emerg_stream.errors import SchemaError
from emerg_stream.io.avro import AvroSerde, peek_schema_id
from emerg_stream.io.records import Interaction, ItemEvent
from emerg_stream.stream import dlq
from emerg_stream.stream.envelope import Inbound
from emerg_stream.stream.handler import FieldInfo

__all__ = ["RecordDecoder", "Rejected"]

_KINDS = ("categorical", "multi", "numeric")
#: Largest accepted numeric feature magnitude: beyond it the normalised value, in
#: float32 through the model, overflows to inf and the item's params become NaN (found
#: by the fuzz test with 1e308).
MAX_ABS_NUMERIC = 1e15


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a record cannot be processed."""

    kind: str
    message: str


class RecordDecoder:
    """Decoder + validator of the two input topics.

    Args:
        fields: The checkpoint's feature columns (side and kind of each).
        items_topic: Name of the items topic (schema registry subject).
        interactions_topic: Name of the interactions topic.
        max_string_bytes: Longest id, feature name or token (UTF-8 bytes).
    """

    def __init__(
        self,
        fields: Sequence[FieldInfo],
        *,
        items_topic: str,
        interactions_topic: str,
        max_string_bytes: int = 4_096,
    ) -> None:
        self.max_string_bytes = max_string_bytes
        self.items: AvroSerde[ItemEvent] = AvroSerde(ItemEvent, topic=items_topic)
        self.interactions: AvroSerde[Interaction] = AvroSerde(Interaction, topic=interactions_topic)
        self._kinds: dict[str, dict[str, str]] = {"item": {}, "user": {}}
        for f in fields:
            self._kinds[f.side][f.name] = f.kind

    @staticmethod
    def _decode(serde: AvroSerde[Any], msg: Inbound) -> Any:
        if msg.value is None:
            return Rejected(dlq.NULL_VALUE, "null value (tombstone) on an input topic")
        try:
            schema_id = peek_schema_id(msg.value)
        except SchemaError as exc:
            return Rejected(dlq.DECODE, str(exc))
        try:
            return serde.decode(msg.value)
        except SchemaError as exc:
            kind = dlq.DECODE if schema_id == serde.schema_id else dlq.SCHEMA_ID
            return Rejected(kind, str(exc))

    def _too_long(self, text: str) -> bool:
        cap = self.max_string_bytes
        return len(text) > cap // 4 and len(text.encode("utf-8")) > cap

    def _long_string(
        self, side: str, rec: Mapping[str, Any], ids: Sequence[str]
    ) -> Rejected | None:
        """The first id, feature name or token over ``max_string_bytes``, as a rejection."""
        what: str | None = None
        for name in ids:
            if self._too_long(rec[name]):
                what = name
                break
        else:
            for kind in _KINDS:
                for name, value in rec[kind].items():
                    if self._too_long(name):
                        what = f"a {side} feature name ({len(name)} characters)"
                    elif kind == "categorical" and self._too_long(value):
                        what = f"{side} feature {name[:64]!r}"
                    elif kind == "multi" and any(self._too_long(v) for v in value):
                        what = f"a token of {side} feature {name[:64]!r}"
                    if what is not None:
                        break
                if what is not None:
                    break
        if what is None:
            return None
        return Rejected(
            dlq.OVERSIZE_FIELD, f"{what} is longer than {self.max_string_bytes} bytes (UTF-8)"
        )

    def _features(self, side: str, rec: Mapping[str, Any]) -> Rejected | None:
        kinds = self._kinds[side]
        for kind in _KINDS:
            for name, value in rec[kind].items():
                want = kinds.get(name)
                if want is not None and want != kind:
                    return Rejected(
                        dlq.BAD_FEATURE,
                        f"{side} feature {name!r} is {want} in the checkpoint's spec but was "
                        f"sent in the {kind!r} map",
                    )
                if kind == "numeric" and not math.isfinite(value):
                    return Rejected(dlq.NONFINITE_FEATURE, f"numeric feature {name!r} is {value!r}")
                if kind == "numeric" and abs(value) > MAX_ABS_NUMERIC:
                    return Rejected(
                        dlq.NONFINITE_FEATURE,
                        f"numeric feature {name!r} is {value!r}, beyond ±{MAX_ABS_NUMERIC:g} "
                        f"(it would overflow the model's float32 inputs)",
                    )
        return None

    def item(self, msg: Inbound) -> ItemEvent | Rejected:
        """The ``ItemEvent`` of ``msg``, or why it is rejected."""
        rec = self._decode(self.items, msg)
        if isinstance(rec, Rejected):
            return rec
        if not rec["item_id"]:
            return Rejected(dlq.MISSING_FIELD, "empty item_id")
        bad = self._long_string("item", rec, ("item_id",)) or self._features("item", rec)
        return rec if bad is None else bad

    def interaction(self, msg: Inbound) -> Interaction | Rejected:
        """The ``Interaction`` of ``msg``, or why it is rejected."""
        rec = self._decode(self.interactions, msg)
        if isinstance(rec, Rejected):
            return rec
        for name in ("item_id", "event_id"):
            if not rec[name]:
                return Rejected(dlq.MISSING_FIELD, f"empty {name}")
        if rec["label"] not in (0, 1):
            return Rejected(dlq.BAD_LABEL, f"label must be 0 or 1, got {rec['label']}")
        bad = self._long_string("user", rec, ("item_id", "event_id", "user_id"))
        bad = bad or self._features("user", rec)
        return rec if bad is None else bad
