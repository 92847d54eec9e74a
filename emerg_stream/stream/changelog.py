"""Restore item states from the changelog (a separate, assigned consumer; no group).

On assign, the worker reads changelog partition ``p`` (the number of the input partition
it got) from the beginning to its end and keeps the item states up to the last
partition mark (see :mod:`emerg_stream.stream.checkpointing`); a tombstone deletes an
item. States written after the last mark belong to a checkpoint that did not complete
and are discarded: the input records they reflect are read again.

Restore is lazy: reading to the end keeps only each item's latest raw value (per
partition), and an item is decoded the first time the worker looks it up (see
:class:`~emerg_stream.state.ItemMap`), so a restore costs about the read of the changelog
and items never touched again cost only their raw bytes.

The end is found as in :func:`emerg_stream.stream.reader.read_assigned_to_end` (robust to
Tansu's short ``ListOffsets`` answers), but by a loop of its own that never waits for a
full batch: ``consume(n, timeout)`` returns only when ``n`` records arrived or the
timeout ran out, so the generic reader spends its whole 0.5 s timeout on the last,
partial batch of every read (measured: ~0.5 s of a 100,000-item restore). Here a batch
is what is fetched already (``timeout=0``), and only an empty queue waits, for one record.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from emerg_stream.errors import SchemaError, TransientError
from emerg_stream.state import ItemMap
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.stream.checkpointing import MARK_KEY, SUSPECT_KEY, PartitionMark, SuspectNote
from emerg_stream.stream.reader import read_assigned_to_end

__all__ = ["ChangelogFold", "Restored", "restore_partitions"]

log = structlog.get_logger(__name__)


@dataclass
class Restored:
    """One partition's restored state.

    Args:
        items: Item id -> state, as of the last mark (raw until first looked up).
        mark: The last mark (``None``: the partition was never checkpointed).
        records: Changelog records read.
        discarded: Item states after the last mark (an incomplete checkpoint).
        suspect: The poison-pill guard's latest note (records a run crashed on), if any.
    """

    items: ItemMap = field(default_factory=ItemMap)
    mark: PartitionMark | None = None
    suspect: SuspectNote | None = None
    records: int = 0
    discarded: int = 0


class ChangelogFold:
    """Folds changelog records into item states, keeping only what a mark completed.

    Args:
        partitions: The partitions being restored.
        codec: ItemState codec.
        topic: Changelog topic name (for messages).
    """

    def __init__(self, partitions: Sequence[int], codec: ItemStateCodec, topic: str = "") -> None:
        self.codec = codec
        self.topic = topic
        self.out = {p: Restored() for p in partitions}
        self._committed: dict[int, dict[bytes, bytes | None]] = {p: {} for p in partitions}
        self._tentative: dict[int, dict[bytes, bytes | None]] = {p: {} for p in partitions}

    def feed(self, p: int, key: bytes | None, value: bytes | None) -> None:
        """One changelog record of partition ``p``, in offset order.

        Raises:
            SchemaError: A mark that cannot be read or names another partition.
        """
        tentative = self._tentative.get(p)
        if tentative is None or key is None:
            return
        self.out[p].records += 1
        if key == SUSPECT_KEY:
            self.out[p].suspect = None if value is None else SuspectNote.decode(value)
        elif key != MARK_KEY:
            tentative[key] = value
        else:
            mark = PartitionMark.decode(value)
            if mark.partition != p:
                raise SchemaError(f"{self.topic}[{p}] holds a mark of partition {mark.partition}")
            self._committed[p].update(tentative)
            tentative.clear()
            self.out[p].mark = mark

    def result(self) -> dict[int, Restored]:
        """The restored partitions (states after the last mark discarded).

        The items stay raw values in an :class:`~emerg_stream.state.ItemMap`, decoded when
        first looked up; here each value is only checked to be an ``ItemState`` of the
        item its key names (a cheap look at its first field).

        Raises:
            SchemaError: A value that is not an ItemState, or a key that is not its id.
        """
        for p, restored in self.out.items():
            restored.discarded = len(self._tentative[p])
            raw: dict[str, bytes] = {}
            for key, value in self._committed[p].items():
                if value is None:
                    continue
                if not self.codec.key_matches(key, value):
                    raise SchemaError(f"{self.topic}[{p}]: key {key!r} holds another item")
                try:
                    raw[key.decode()] = value
                except UnicodeDecodeError as exc:
                    raise SchemaError(f"{self.topic}[{p}]: key {key!r} is not UTF-8") from exc
            restored.items = ItemMap(raw=raw, load=self.codec.load)
        return self.out


def restore_partitions(
    consumer: Consumer,
    topic: str,
    partitions: Sequence[int],
    codec: ItemStateCodec,
    *,
    timeout_s: float = 60.0,
) -> dict[int, Restored]:
    """Read changelog partitions to their end and rebuild their item states.

    Args:
        consumer: A consumer without group membership (``reader_conf`` settings); it is
            assigned the partitions and unassigned afterwards.
        topic: The changelog topic.
        partitions: Partition numbers to restore.
        codec: ItemState codec.
        timeout_s: Deadline of the whole read.

    Returns:
        Partition -> its restored state (every requested partition present).

    Raises:
        TransientError: The broker did not answer or the end was not reached in time.
        SchemaError: A record of the changelog cannot be decoded (the state would be wrong).
    """
    fold = ChangelogFold(partitions, codec, topic)
    if not partitions:
        return fold.result()
    t0 = time.monotonic()
    listed: dict[tuple[str, int], int] = {}
    for p in partitions:
        try:
            lo, hi = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout_s, cached=False
            )
        except KafkaException as exc:
            raise TransientError(f"cannot read the end of {topic}[{p}]: {exc}") from exc
        listed[(topic, p)] = int(hi) if hi > lo else 0
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    try:
        feed = fold.feed
        for msg in read_assigned_to_end(consumer, listed, timeout_s=timeout_s):
            part = msg.partition()
            if part is not None:
                feed(part, msg.key(), msg.value())
    finally:
        consumer.unassign()
    out = fold.result()
    log.info(
        "changelog_restored",
        topic=topic,
        partitions=list(partitions),
        records=sum(r.records for r in out.values()),
        items=sum(len(r.items) for r in out.values()),
        discarded=sum(r.discarded for r in out.values()),
        ms=round((time.monotonic() - t0) * 1000, 1),
    )
    return out
