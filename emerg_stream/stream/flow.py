"""Back-pressure between the two input topics: pause interactions that run ahead of items.

Both topics are read by one consumer, each partition at its own pace. With a backlog
(a replay, a restart) the fetcher may hand out thousands of interactions of partition
``p`` before the ``ItemEvent`` records of ``p`` that announce their items; they wait in
the pending buffer, which is bounded, and an overflow would dead-letter perfectly good
records. So when the interactions of ``p`` waiting for their item reach a high-water
mark, the worker *pauses* the interactions partition ``p`` (librdkafka stops fetching it
and drops what it had queued; resuming re-fetches from the next offset, nothing lost
or repeated) and resumes it once the items of ``p`` caught up (the waiting count fell to
half the mark). If the items partition has been quiet for ``items_quiet_s`` there is
nothing to wait for: the partition is resumed (or not paused) and the pending bounds
apply (dead letters ``unknown_item``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["Backpressure"]


@dataclass
class Backpressure:
    """Which interactions partitions to pause or resume (pure decisions; see module doc).

    Args:
        pending_max: The pending buffer's total bound; each partition's high-water mark
            is ``pending_max / (2 * partitions held)`` (at least 1).
        items_quiet_s: An items partition without records for this long is quiet.
    """

    pending_max: int
    items_quiet_s: float = 5.0
    paused: set[int] = field(default_factory=set)
    #: Partition -> monotonic time the items partition last delivered (or was assigned).
    items_seen: dict[int, float] = field(default_factory=dict)

    def high_water(self, n_partitions: int) -> int:
        """Waiting interactions per partition that trigger a pause."""
        return max(1, self.pending_max // (2 * max(1, n_partitions)))

    def assigned(self, partitions: Iterable[int], now: float) -> None:
        """Partitions taken over: unpaused, their items clock starts now."""
        for p in partitions:
            self.paused.discard(p)
            self.items_seen[p] = now

    def revoked(self, partitions: Iterable[int]) -> None:
        """Partitions given up."""
        for p in partitions:
            self.paused.discard(p)
            self.items_seen.pop(p, None)

    def items_delivered(self, partitions: Iterable[int], now: float) -> None:
        """The items partitions that delivered records in the last batch."""
        for p in partitions:
            self.items_seen[p] = now

    def decide(self, waiting: Mapping[int, int], now: float) -> tuple[list[int], list[int]]:
        """Partitions to pause and to resume now.

        Args:
            waiting: Held partition -> interactions waiting for their item.
            now: Monotonic time.

        Returns:
            ``(pause, resume)``, each sorted; :attr:`paused` is updated.
        """
        high = self.high_water(len(waiting))
        pause, resume = [], []
        for p in sorted(waiting):
            quiet = now - self.items_seen.get(p, now) >= self.items_quiet_s
            if p in self.paused:
                if waiting[p] <= high // 2 or quiet:
                    self.paused.discard(p)
                    resume.append(p)
            elif waiting[p] >= high and not quiet:
                self.paused.add(p)
                pause.append(p)
        return pause, resume
