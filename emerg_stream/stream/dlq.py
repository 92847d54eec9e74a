"""Dead letters: a record that cannot be processed becomes a value, never a crash.

Every dead letter keeps the source topic/partition/offset, the raw key and value (so it
can be replayed after a fix), a short machine-readable ``error_kind`` and a message.
"""

from __future__ import annotations

from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import DeadLetter
from emerg_stream.stream.envelope import Inbound, Outbound

__all__ = [
    "BAD_FEATURE",
    "BAD_LABEL",
    "DECODE",
    "ERROR_KINDS",
    "MISSING_FIELD",
    "NONFINITE_FEATURE",
    "NULL_VALUE",
    "SCHEMA_ID",
    "UNKNOWN_ITEM",
    "DeadLetters",
]

#: Bytes that are not a framed Avro value of the topic's record (truncated, corrupt,
#: written with another schema under the right id, missing required fields).
DECODE = "decode"
#: A framed value whose schema id is unknown or belongs to another record type.
SCHEMA_ID = "schema_id"
#: A null value (tombstone) on an input topic.
NULL_VALUE = "null_value"
#: A required id (item id, event id) is empty.
MISSING_FIELD = "missing_field"
#: A label other than 0 or 1.
BAD_LABEL = "bad_label"
#: A NaN or infinite numeric feature.
NONFINITE_FEATURE = "nonfinite_feature"
#: A feature sent in the map of another kind than the checkpoint's spec says.
BAD_FEATURE = "bad_feature"
#: An interaction whose item was never announced (pending buffer overflow or expiry).
UNKNOWN_ITEM = "unknown_item"

ERROR_KINDS: tuple[str, ...] = (
    DECODE,
    SCHEMA_ID,
    NULL_VALUE,
    MISSING_FIELD,
    BAD_LABEL,
    NONFINITE_FEATURE,
    BAD_FEATURE,
    UNKNOWN_ITEM,
)


class DeadLetters:
    """Builds framed ``DeadLetter`` records for the dead-letter topic.

    Args:
        topic: The dead-letter topic.
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.serde: AvroSerde[DeadLetter] = AvroSerde(DeadLetter, topic=topic)

    def record(self, msg: Inbound, kind: str, message: str, now_ms: int) -> Outbound:
        """The dead letter of ``msg`` (keyed like the source record)."""
        value = self.serde.encode(
            {
                "source_topic": msg.topic,
                "source_partition": msg.partition,
                "source_offset": msg.offset,
                "key": msg.key,
                "value": msg.value,
                "error_kind": kind,
                "message": message[:2000],
                "failed_time": now_ms,
            }
        )
        return Outbound(self.topic, msg.key, value)
