"""Records in and out of the worker, as plain values (no Kafka objects).

The worker turns each consumed message into an :class:`Inbound` and produces each
:class:`Outbound`; everything in between (decode, state, rounds, checkpoint records) is
plain Python that the unit tests drive without a broker.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Inbound:
    """A consumed record.

    Args:
        topic: Source topic.
        partition: Source partition.
        offset: Source offset.
        key: Raw key bytes (``None`` if absent).
        value: Raw value bytes (``None`` for a tombstone).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class Outbound:
    """A record to produce.

    Args:
        topic: Target topic.
        key: Key bytes.
        value: Value bytes (``None`` = tombstone).
        partition: Explicit partition (the changelog), or ``None`` for the partitioner.
    """

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
