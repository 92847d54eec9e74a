"""The item states a worker holds, grouped by input partition.

Items and interactions are keyed and co-partitioned by item id, so an item lives in the
partition (number) its records arrive on; a revoked partition's items are dropped in one
step and restored in one step from the changelog partition with the same number.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from emerg_stream.state.item import ItemTask


@dataclass
class PartitionItems:
    """The items of one partition and which of them changed since the last checkpoint."""

    items: dict[str, ItemTask] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)

    def touch(self, item_id: str) -> None:
        """Mark an item as changed (it goes to the changelog at the next checkpoint)."""
        self.dirty.add(item_id)

    def take_dirty(self) -> list[ItemTask]:
        """The changed items (in id order), forgetting that they changed."""
        out = [self.items[i] for i in sorted(self.dirty) if i in self.items]
        self.dirty.clear()
        return out


class StateStore:
    """Item states of every partition this worker owns."""

    def __init__(self) -> None:
        self._parts: dict[int, PartitionItems] = {}

    def partition(self, p: int) -> PartitionItems:
        """The items of partition ``p``.

        Raises:
            KeyError: The partition is not held.
        """
        return self._parts[p]

    def add_partition(self, p: int, items: dict[str, ItemTask] | None = None) -> PartitionItems:
        """Start holding partition ``p`` (e.g. with its restored items)."""
        part = PartitionItems(items=dict(items or {}))
        self._parts[p] = part
        return part

    def drop_partition(self, p: int) -> int:
        """Forget partition ``p``; returns how many items it held."""
        part = self._parts.pop(p, None)
        return 0 if part is None else len(part.items)

    def get(self, p: int, item_id: str) -> ItemTask | None:
        """The item's state, or None if it is unknown (or the partition is not held)."""
        part = self._parts.get(p)
        return None if part is None else part.items.get(item_id)

    @property
    def partitions(self) -> list[int]:
        """Held partition numbers, ascending."""
        return sorted(self._parts)

    def __contains__(self, p: object) -> bool:
        return p in self._parts

    def __len__(self) -> int:
        """Items held over all partitions."""
        return sum(len(part.items) for part in self._parts.values())

    def __iter__(self) -> Iterator[ItemTask]:
        for part in self._parts.values():
            yield from part.items.values()
