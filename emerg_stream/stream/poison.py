"""The poison-pill guard's note: the offsets of the batch the worker crashed on.

When processing a batch raises an unexpected exception (a bug a record finds), the
worker writes a :class:`~emerg_stream.stream.checkpointing.SuspectNote` per input
partition to the changelog before it exits; the next owner of the partition dead-letters
those records (``poison_pill``) instead of crashing on them again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import structlog
from confluent_kafka import KafkaException, Producer

from emerg_stream.config import WorkerSettings
from emerg_stream.stream.checkpointing import SUSPECT_KEY, SuspectNote
from emerg_stream.stream.clients import producer_conf
from emerg_stream.stream.envelope import Inbound
from emerg_stream.topic_roles import INPUT_ROLES

__all__ = ["write_suspect_notes"]

log = structlog.get_logger(__name__)


def write_suspect_notes(
    settings: WorkerSettings,
    batch: Sequence[Inbound],
    exc: BaseException,
    suspects: Mapping[int, SuspectNote],
) -> None:
    """Note the batch's offsets in the changelog (merged with the partitions' earlier notes).

    Best effort (the process is going down): the note goes through a producer of its
    own (plain, idempotent; the worker's may be transactional or broken by then),
    flushed for up to 10 s, and a failure to write it is logged, not raised over the
    original error.
    """
    error = f"{type(exc).__name__}: {exc}"[:500]
    by_partition: dict[int, dict[str, set[int]]] = {}
    roles = {settings.topics.name(role): role for role in INPUT_ROLES}
    for m in batch:
        role = roles.get(m.topic)
        if role is not None:
            by_partition.setdefault(m.partition, {}).setdefault(role, set()).add(m.offset)
    log.error("poison_suspected", error=error, partitions=sorted(by_partition))
    try:
        producer = Producer(producer_conf(settings))
        for p, offsets in sorted(by_partition.items()):
            note = SuspectNote(p, {r: frozenset(o) for r, o in offsets.items()}, error)
            note = note.merged(suspects.get(p))
            producer.produce(settings.topics.changelog, note.encode(), SUSPECT_KEY, p)
        left = producer.flush(10.0)
        if left:
            log.error("poison_note_not_written", undelivered=left)
    except (KafkaException, BufferError) as err:
        log.error("poison_note_not_written", error=str(err))
