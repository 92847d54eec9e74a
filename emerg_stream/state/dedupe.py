"""A bounded set of recent event ids, oldest evicted first (per-item de-duplication)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator


class RecentIds:
    """The last ``window`` distinct event ids seen, with O(1) membership.

    Args:
        window: How many ids are remembered; the oldest is forgotten beyond it.
        ids: Initial ids, oldest first (e.g. restored from the changelog).

    Raises:
        ValueError: ``window`` is not positive.
    """

    __slots__ = ("_order", "_set", "window")

    def __init__(self, window: int, ids: Iterable[str] = ()) -> None:
        if window < 1:
            raise ValueError(f"dedupe window must be positive, got {window}")
        self.window = window
        self._order: deque[str] = deque()
        self._set: set[str] = set()
        for i in ids:
            self.add(i)

    def add(self, event_id: str) -> bool:
        """Remember ``event_id``; returns False if it was already remembered (a duplicate)."""
        if event_id in self._set:
            return False
        self._order.append(event_id)
        self._set.add(event_id)
        if len(self._order) > self.window:
            self._set.discard(self._order.popleft())
        return True

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._set

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)
