"""Partition progress and the partition mark: what makes a checkpoint exact.

A checkpoint (see :mod:`emerg_stream.stream.commit` for the order) writes, per input
partition ``p`` that changed, the changed items' ``ItemState`` records and then one
**partition mark** to changelog partition ``p``. The mark is a small control record
under the reserved key :data:`MARK_KEY` (JSON; no item id starts with a NUL byte) that
says which input records the states before it reflect:

* ``positions``: the next offset to read on ``items`` ``p`` and ``interactions`` ``p``;
* ``pending``: offsets below that position that are *not* reflected yet (interactions
  still waiting for their item);
* ``counts``: the outcome counters of partition ``p`` since the beginning;
* ``items_time`` (the partition's item stream time, see :mod:`emerg_stream.stream.pending`)
  and the ``model_version`` the states belong to;
* ``pending_oldest_time``: the event time of the oldest pending interaction (absent or
  ``null``: none), so ``emerg-stream status`` can tell a committed offset held back by
  orphans waiting for their item from a group that is behind.

Restoring reads the changelog partition and keeps only the states up to the *last* mark
(states after it belong to a checkpoint that did not complete), then resumes reading
at the mark: ``items`` at its position, ``interactions`` at the first pending offset (or
the position), skipping the records below the position that are not pending. So the
state, the counters and the input position always agree, even when the process died
between the changelog flush and the offset commit: no record is applied or counted twice.
The group's committed offsets are written too (the same resume points) and are what a
partition without any mark starts from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from emerg_stream.errors import SchemaError
from emerg_stream.stream.metrics import ROLES, OutcomeCounts

__all__ = [
    "MARK_KEY",
    "MARK_VERSION",
    "SUSPECT_KEY",
    "PartitionMark",
    "PartitionProgress",
    "SuspectNote",
]

#: Changelog key of partition marks (never a valid item id).
MARK_KEY = b"\x00emerg:partition-mark"
MARK_VERSION = 1
#: Changelog key of the poison-pill guard's note (never a valid item id).
SUSPECT_KEY = b"\x00emerg:suspect"


@dataclass
class SuspectNote:
    """The records a run was processing when it crashed (the poison-pill guard).

    Written to changelog partition ``p`` (key :data:`SUSPECT_KEY`, JSON) by a worker whose
    batch processing raised, just before it exits; the latest note of a partition holds
    every offset still suspected there. The next owner dead-letters those records
    (``poison_pill``) when it reads them again instead of processing them, so no record
    makes the worker exit non-zero twice in a row at the same offset.
    """

    partition: int
    offsets: dict[str, frozenset[int]]
    error: str

    def merged(self, other: SuspectNote | None) -> SuspectNote:
        """This note with ``other``'s offsets added (the error of this one)."""
        if other is None:
            return self
        roles = set(self.offsets) | set(other.offsets)
        offsets = {
            r: self.offsets.get(r, frozenset()) | other.offsets.get(r, frozenset()) for r in roles
        }
        return SuspectNote(self.partition, offsets, self.error)

    def encode(self) -> bytes:
        """JSON bytes."""
        return json.dumps(
            {
                "v": 1,
                "partition": self.partition,
                "offsets": {r: sorted(o) for r, o in sorted(self.offsets.items())},
                "error": self.error,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> SuspectNote:
        """Parse a note.

        Raises:
            SchemaError: Not a note of a known version.
        """
        try:
            raw: Any = json.loads(data or b"")
            if raw.get("v") != 1:
                raise ValueError(f"unknown note version {raw.get('v')!r}")
            return cls(
                partition=int(raw["partition"]),
                offsets={str(r): frozenset(int(o) for o in v) for r, v in raw["offsets"].items()},
                error=str(raw["error"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SchemaError(f"invalid suspect note in the changelog: {exc}") from exc


@dataclass
class PartitionMark:
    """The control record ending a checkpoint of one partition (see the module docstring)."""

    partition: int
    model_version: str
    positions: dict[str, int]
    pending: list[int]
    items_time: int
    counts: OutcomeCounts
    written_time: int = 0
    pending_oldest_time: int | None = None

    def encode(self) -> bytes:
        """JSON bytes."""
        return json.dumps(
            {
                "v": MARK_VERSION,
                "partition": self.partition,
                "model_version": self.model_version,
                "positions": self.positions,
                "pending": self.pending,
                "items_time": self.items_time,
                "counts": self.counts.to_dict(),
                "written_time": self.written_time,
                "pending_oldest_time": self.pending_oldest_time,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> PartitionMark:
        """Parse a mark.

        Raises:
            SchemaError: Not a mark of a known version.
        """
        try:
            raw: Any = json.loads(data or b"")
            if raw.get("v") != MARK_VERSION:
                raise ValueError(f"unknown mark version {raw.get('v')!r}")
            return cls(
                partition=int(raw["partition"]),
                model_version=str(raw["model_version"]),
                positions={str(k): int(v) for k, v in raw["positions"].items()},
                pending=sorted(int(o) for o in raw["pending"]),
                items_time=int(raw["items_time"]),
                counts=OutcomeCounts.from_dict(raw["counts"]),
                written_time=int(raw.get("written_time", 0)),
                pending_oldest_time=(
                    None
                    if raw.get("pending_oldest_time") is None
                    else int(raw["pending_oldest_time"])
                ),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SchemaError(f"invalid partition mark in the changelog: {exc}") from exc


@dataclass
class PartitionProgress:
    """Where one input partition stands (both topics), and its counters.

    Args:
        partition: The partition number.
        positions: Role -> next offset to read (absent until known).
        items_time: Largest event time of the ItemEvents read from the partition (ms):
            the clock that expires pending interactions.
        counts: Outcome counters since the beginning (restored from the last mark).
        skip_until: Interactions below this offset were already applied ...
        skip_keep: ... except these (pending at the last mark): they are read again.
        dirty: Something changed since the last mark.
    """

    partition: int
    positions: dict[str, int] = field(default_factory=dict)
    items_time: int = 0
    counts: OutcomeCounts = field(default_factory=OutcomeCounts)
    skip_until: int = 0
    skip_keep: frozenset[int] = frozenset()
    dirty: bool = False

    @classmethod
    def from_mark(cls, mark: PartitionMark) -> PartitionProgress:
        """Progress resumed from a restored mark."""
        positions = dict(mark.positions)
        if mark.pending:
            positions["interactions"] = mark.pending[0]
        return cls(
            partition=mark.partition,
            positions=positions,
            items_time=mark.items_time,
            counts=mark.counts,
            skip_until=mark.positions.get("interactions", 0),
            skip_keep=frozenset(mark.pending),
        )

    def start_offsets(self) -> dict[str, int | None]:
        """Role -> offset to resume reading at (``None``: the group's committed offset)."""
        return {role: self.positions.get(role) for role in ROLES}

    def skips(self, offset: int) -> bool:
        """Whether an interaction at ``offset`` was applied before the restore."""
        return offset < self.skip_until and offset not in self.skip_keep

    def advance(self, role: str, offset: int) -> None:
        """Record that ``offset`` of ``role`` was read."""
        if offset + 1 > self.positions.get(role, 0):
            self.positions[role] = offset + 1
        self.dirty = True

    def observe_item_time(self, event_time: int) -> None:
        """Advance the item stream time (with an ItemEvent's event time)."""
        if event_time > self.items_time:
            self.items_time = event_time

    def unresolved(self, pending: list[int]) -> list[int]:
        """Offsets not reflected in the state yet.

        Those waiting in the buffer now, and those pending at the restore that were not
        read again yet.
        """
        pos = self.positions.get("interactions", 0)
        again = [o for o in self.skip_keep if o >= pos]
        return sorted(set(pending) | set(again))

    def held(self, pending: list[int]) -> int:
        """Records the committed offset stays behind the position by, for pending orphans."""
        unresolved = self.unresolved(pending)
        if not unresolved:
            return 0
        pos = max(self.positions.get("interactions", 0), self.skip_until)
        return max(0, pos - unresolved[0])

    def mark(
        self,
        model_version: str,
        pending: list[int],
        now_ms: int,
        pending_oldest_time: int | None = None,
    ) -> PartitionMark:
        """The mark of the current progress (``pending``: offsets waiting in the buffer)."""
        positions = dict(self.positions)
        if "interactions" in positions or self.skip_until:
            positions["interactions"] = max(positions.get("interactions", 0), self.skip_until)
        return PartitionMark(
            partition=self.partition,
            model_version=model_version,
            positions=positions,
            pending=self.unresolved(pending),
            items_time=self.items_time,
            counts=OutcomeCounts.from_dict(self.counts.to_dict()),
            written_time=now_ms,
            pending_oldest_time=pending_oldest_time,
        )

    def commit_offsets(self, pending: list[int]) -> dict[str, int]:
        """Role -> offset to commit for the group (the resume point of each topic)."""
        out: dict[str, int] = {}
        if "items" in self.positions:
            out["items"] = self.positions["items"]
        unresolved = self.unresolved(pending)
        pos = max(self.positions.get("interactions", 0), self.skip_until)
        if unresolved:
            out["interactions"] = min(unresolved[0], pos)
        elif "interactions" in self.positions or self.skip_until:
            out["interactions"] = pos
        return out
