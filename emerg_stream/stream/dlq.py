"""Dead letters: a record that cannot be processed becomes a value, never a crash.

Every dead letter keeps the source topic/partition/offset, the raw key and value (so it
can be replayed after a fix), a short machine-readable ``error_kind`` and a message.
:func:`replay_dead_letters` (``emerg-stream dlq replay``) re-injects them: each dead
letter's raw value, with its key, goes back to its source topic and partition. Replay is
at-least-once like the rest of the pipeline: a replayed interaction already applied is
counted ``duplicate`` by event id, and one that fails again is dead-lettered again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog
from confluent_kafka import Producer

from emerg_stream.errors import TransientError
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import DeadLetter
from emerg_stream.stream.envelope import Inbound, Outbound
from emerg_stream.stream.replay import read_to_end

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
    "ReplayReport",
    "replay_dead_letters",
]

log = structlog.get_logger(__name__)

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


@dataclass
class ReplayReport:
    """What :func:`replay_dead_letters` did.

    Args:
        read: Dead letters read.
        replayed: Re-injected, per source topic.
        skipped: Not replayed (another kind, past the limit, or a null value).
    """

    read: int = 0
    replayed: dict[str, int] = field(default_factory=dict)
    skipped: int = 0


def replay_dead_letters(
    kafka_conf: Mapping[str, str],
    dead_letter_topic: str,
    *,
    kinds: set[str] | None = None,
    limit: int | None = None,
    timeout_s: float = 60.0,
) -> ReplayReport:
    """Re-inject dead letters into their source topics (raw value, key, partition).

    Args:
        kafka_conf: librdkafka settings of the cluster.
        dead_letter_topic: The dead-letter topic (read from the beginning to its end).
        kinds: Replay only these ``error_kind`` values (``None``: all).
        limit: Replay at most this many.
        timeout_s: Deadline of the read and of the final flush.

    Raises:
        SchemaError: A dead letter that cannot be decoded.
        TransientError: The read or the delivery did not complete in time.
    """
    serde: AvroSerde[DeadLetter] = AvroSerde(DeadLetter, topic=dead_letter_topic)
    report = ReplayReport()
    failed: list[str] = []

    def on_delivery(err: object, msg: object) -> None:
        if err is not None:
            failed.append(str(err))

    conf = {k: v for k, v in kafka_conf.items() if k != "partition.assignment.strategy"}
    producer = Producer({**conf, "enable.idempotence": "true", "acks": "all"})
    for msg in read_to_end(kafka_conf, dead_letter_topic, timeout_s=timeout_s):
        raw = msg.value()
        if raw is None:
            continue
        report.read += 1
        d = serde.decode(raw)
        full = limit is not None and sum(report.replayed.values()) >= limit
        if full or (kinds is not None and d["error_kind"] not in kinds) or d["value"] is None:
            report.skipped += 1
            continue
        topic = d["source_topic"]
        producer.produce(
            topic, d["value"], d["key"], d["source_partition"], on_delivery=on_delivery
        )
        producer.poll(0)
        report.replayed[topic] = report.replayed.get(topic, 0) + 1
    left = producer.flush(timeout_s)
    if left or failed:
        raise TransientError(
            f"dead-letter replay: {left} records undelivered, {len(failed)} failed "
            f"({failed[0] if failed else 'timeout'})"
        )
    log.info("dead_letters_replayed", read=report.read, replayed=report.replayed)
    return report
