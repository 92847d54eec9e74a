"""Dead letters: a record that cannot be processed becomes a value, never a crash.

Every dead letter keeps the source topic/partition/offset, the raw key and value (so it
can be replayed after a fix), a short machine-readable ``error_kind`` and a message.
:func:`replay_dead_letters` (``emerg-stream dlq replay``) re-injects them: each dead
letter's raw value, with its key, goes back to its source topic and partition. Replay is
at-least-once like the rest of the pipeline: a replayed interaction already applied is
counted ``duplicate`` by event id, and one that fails again is dead-lettered again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog
from confluent_kafka import Producer

from emerg_stream.errors import TransientError
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import DeadLetter
from emerg_stream.stream.envelope import Inbound, Outbound
from emerg_stream.stream.reader import read_to_end

__all__ = [
    "BAD_EVENT_TIME",
    "BAD_FEATURE",
    "BAD_LABEL",
    "CONFLICTING_EVENT",
    "CONFLICTING_ITEM",
    "DECODE",
    "ERROR_KINDS",
    "KINDS",
    "MISSING_FIELD",
    "NONFINITE_FEATURE",
    "NULL_VALUE",
    "OVERSIZE",
    "OVERSIZE_FIELD",
    "POISON_PILL",
    "SCHEMA_ID",
    "UNKNOWN_ITEM",
    "DeadLetters",
    "ReplayReport",
    "kinds_markdown",
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
#: A record (key + value) over ``inputs.max_value_bytes``: not decoded at all.
OVERSIZE = "oversize"
#: An id, feature name or token over ``inputs.max_string_bytes``, or a support row over
#: ``inputs.max_support_row_bytes``.
OVERSIZE_FIELD = "oversize_field"
#: An event time too far ahead of wall time or of the partition's item clock.
BAD_EVENT_TIME = "bad_event_time"
#: A copy of a re-announced item with other features (outcome ``conflicting_item``).
CONFLICTING_ITEM = "conflicting_item"
#: A copy of an interaction that reuses an event id with other content (outcome
#: ``conflicting_event``).
CONFLICTING_EVENT = "conflicting_event"
#: A record of the batch during which the previous run crashed (the poison-pill guard).
POISON_PILL = "poison_pill"

#: Every ``error_kind`` with its meaning, for the users' docs (``docs/ERROR_KINDS.md`` is
#: generated from this table; a unit test keeps them equal) and ``dlq replay --kind``.
KINDS: Mapping[str, str] = {
    DECODE: "The value is not a framed Avro value of the topic's record: too short, wrong "
    "magic byte, truncated, trailing bytes, or written with another schema under the "
    "right id (required fields missing). Outcome `dead_lettered`.",
    SCHEMA_ID: "The value is framed, but its schema id is unknown to the worker (not in "
    "`schemas/ids.json`, nor in the registry when one is configured) or belongs to "
    "another record type. Outcome `dead_lettered`.",
    NULL_VALUE: "A null value (a tombstone) on an input topic. Outcome `dead_lettered`.",
    MISSING_FIELD: "A required id is empty: `item_id` (both topics) or `event_id`. "
    "Outcome `dead_lettered`.",
    BAD_LABEL: "An interaction's label is not 0 or 1. Outcome `dead_lettered`.",
    NONFINITE_FEATURE: "A numeric feature is NaN, infinite, or beyond ±1e15 (it would "
    "overflow the model's float32 inputs). Outcome `dead_lettered`.",
    BAD_FEATURE: "A feature the checkpoint knows was sent in the map of another kind "
    "(e.g. a numeric field in `categorical`). Outcome `dead_lettered`.",
    UNKNOWN_ITEM: "An interaction whose item was not announced within "
    "`EMERG_PENDING_MAX_AGE_MS` of event time (measured on the partition's item clock), "
    "or was evicted from the full pending buffer (`EMERG_PENDING_MAX`). Replay it after "
    "announcing the item. Outcome `dead_lettered`.",
    OVERSIZE: "The record (key + value) is larger than `EMERG_INPUTS__MAX_VALUE_BYTES`; it "
    "is not decoded. When the whole value would not fit the dead-letter topic, the dead "
    "letter carries its first bytes with `truncated` = true, `value_size` and "
    "`value_sha256`. Outcome `dead_lettered`.",
    OVERSIZE_FIELD: "An id (item, event, user), feature name or token is longer than "
    "`EMERG_INPUTS__MAX_STRING_BYTES` (UTF-8), or an interaction's support row is larger "
    "than `EMERG_INPUTS__MAX_SUPPORT_ROW_BYTES`. Outcome `dead_lettered`.",
    BAD_EVENT_TIME: "The event time is more than `EMERG_INPUTS__MAX_AHEAD_OF_WALL_MS` ahead "
    "of the worker's clock (e.g. stamped in microseconds), or an ItemEvent's is more than "
    "`EMERG_INPUTS__MAX_AHEAD_OF_CLOCK_MS` ahead of its partition's item clock. The "
    "record moves no clock. Outcome `dead_lettered`.",
    CONFLICTING_ITEM: "A copy of an ItemEvent that re-announces a known item with other "
    "side features. Outcome `conflicting_item` (not `dead_lettered`); what the worker did "
    "(`EMERG_INPUTS__ITEM_CONFLICT`: kept the first features, or replaced them) is in the "
    "message.",
    CONFLICTING_EVENT: "A copy of an interaction whose event id was already applied to the "
    "item with other content (user, label, features or time). The first one stays "
    "applied. Outcome `conflicting_event` (not `dead_lettered`).",
    POISON_PILL: "The record was in the batch being processed when the previous run "
    "crashed (the exception is in the message); on restart the worker dead-letters that "
    "batch instead of crashing on it again. Records of the batch other than the culprit "
    "can be replayed (`emerg-stream dlq replay --kind poison_pill`). Outcome "
    "`dead_lettered`.",
}
ERROR_KINDS: tuple[str, ...] = tuple(KINDS)
#: Room left in a dead letter for everything but the key and value (the metadata, the
#: record's Kafka key and the batch overhead).
_DEAD_LETTER_ROOM = 6_000
#: Longest ``message`` of a dead letter, in characters.
MESSAGE_CHARS = 2_000


def kinds_markdown() -> str:
    """``docs/ERROR_KINDS.md``: every ``error_kind`` and its meaning, from :data:`KINDS`."""
    lines = [
        "# Dead-letter error kinds",
        "",
        "<!-- generated by `emerg-stream dlq kinds > docs/ERROR_KINDS.md`; a unit test "
        "fails when it drifts from emerg_stream/stream/dlq.py -->",
        "",
        "Every record the worker cannot use goes to the dead-letter topic as a `DeadLetter` "
        "(schemas/DeadLetter.avsc) with its source topic, partition and offset, its raw key "
        "and value, one `error_kind` below and a human-readable `message`. The outcome each "
        "kind counts as is given; every input record gets exactly one outcome.",
        "",
        "| error_kind | meaning |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {v} |" for k, v in KINDS.items()]
    return "\n".join(lines) + "\n"


class DeadLetters:
    """Builds framed ``DeadLetter`` records for the dead-letter topic.

    A dead letter whose raw key and value would not fit ``max_bytes`` (the dead-letter
    topic's record limit) carries them cut to fit, with ``truncated`` set; ``value_size``,
    ``value_sha256`` and ``key_size`` always describe the whole originals. The Kafka key of
    the dead letter is the (possibly cut) source key.

    Args:
        topic: The dead-letter topic.
        max_bytes: Largest record (key + value) the topic and the producer take.
    """

    def __init__(self, topic: str, max_bytes: int = 1_000_000) -> None:
        self.topic = topic
        self.max_bytes = max_bytes
        self.serde: AvroSerde[DeadLetter] = AvroSerde(DeadLetter, topic=topic)

    def record(self, msg: Inbound, kind: str, message: str, now_ms: int) -> Outbound:
        """The dead letter of ``msg`` (keyed like the source record)."""
        key, value = msg.key, msg.value
        room = max(0, self.max_bytes - _DEAD_LETTER_ROOM)
        # the key travels twice (record key and payload), the value once
        truncated = 2 * len(key or b"") + len(value or b"") > room
        if truncated:
            if key is not None and 2 * len(key) > room // 2:
                key = key[: room // 4]
            if value is not None:
                value = value[: max(0, room - 2 * len(key or b""))]
        payload = self.serde.encode(
            {
                "source_topic": msg.topic,
                "source_partition": msg.partition,
                "source_offset": msg.offset,
                "key": key,
                "value": value,
                "error_kind": kind,
                "message": message[:MESSAGE_CHARS],
                "failed_time": now_ms,
                "truncated": truncated,
                "value_size": None if msg.value is None else len(msg.value),
                "value_sha256": (
                    None if msg.value is None else hashlib.sha256(msg.value).hexdigest()
                ),
                "key_size": None if msg.key is None else len(msg.key),
            }
        )
        return Outbound(self.topic, key, payload)


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
        if d.get("truncated"):  # only the first bytes are here: never re-inject a fragment
            report.skipped += 1
            log.warning(
                "dead_letter_not_replayable",
                source=f"{d['source_topic']}[{d['source_partition']}]@{d['source_offset']}",
                value_size=d.get("value_size"),
            )
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
