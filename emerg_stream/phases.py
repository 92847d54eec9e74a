"""The warm-up phases and the schedule that triggers them: the one owner (DESIGN.md §3, §4).

A new item starts ``cold`` with φ⁰. When its applied support reaches K rows it is
updated on exactly those K rows (``warm_a``); at 2K on the next K (``warm_b``), at 3K
on the next K (``warm_c``), each update continuing from the previous φ. After that every
K more rows give one more update (``common``) on the rows since the previous threshold,
so the support buffer never holds more than K rows.

The offline protocol is the same schedule cut at 3K: the public split gives a new item's
time-ordered rows ``[0, K)`` to ``warm_a``, ``[K, 2K)`` to ``warm_b``, ``[2K, 3K)`` to
``warm_c`` and the rest to the test rows, and
:func:`emerg_stream.meta.evaluate.run_phases` runs the three updates in that order.

Every room reads the phase names and the arithmetic from here: the worker's processor,
the split, the offline evaluation, the replay plan, ``explain`` and the report. No
imports beyond numpy: every layer (``stream`` without torch, ``meta`` without Kafka) may
import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "COLD",
    "COMMON",
    "OLD",
    "PHASES",
    "PHASE_LABELS",
    "PHASE_TITLES",
    "STREAM_PHASES",
    "WARM_PHASES",
    "WarmupSchedule",
]

COLD = "cold"
#: The protocol's updates, in order: at K, 2K and 3K support rows.
WARM_PHASES: tuple[str, str, str] = ("warm_a", "warm_b", "warm_c")
#: Every update after the protocol's three (the stream only).
COMMON = "common"
#: Items the checkpoint was trained on: scored with trained params, never warmed up.
OLD = "old"
#: The protocol's phases in order (the columns of every offline table and report).
PHASES: tuple[str, ...] = (COLD, *WARM_PHASES)
#: Every phase a new item goes through in the stream, in order.
STREAM_PHASES: tuple[str, ...] = (*PHASES, COMMON)
#: Short labels of the protocol's phases (table headers).
PHASE_LABELS: Mapping[str, str] = {COLD: "cold", "warm_a": "A", "warm_b": "B", "warm_c": "C"}
#: Titles of the protocol's phases (figure panels).
PHASE_TITLES: Mapping[str, str] = {
    COLD: "cold start",
    "warm_a": "after A",
    "warm_b": "after B",
    "warm_c": "after C",
}


@dataclass(frozen=True)
class WarmupSchedule:
    """Which support count triggers which update (the module docstring).

    Args:
        k: Rows per phase (the split's K).

    Raises:
        ValueError: ``k`` is not positive.
    """

    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"K must be positive, got {self.k}")

    @property
    def first_threshold(self) -> int:
        """Support size of a new item's first update."""
        return self.k

    @property
    def max_support_rows(self) -> int:
        """Rows the support buffer holds at most (it is cleared by every update)."""
        return self.k

    @property
    def protocol_rows(self) -> int:
        """Rows a new item needs for the protocol's three updates (3K)."""
        return len(WARM_PHASES) * self.k

    def _check(self, threshold: int) -> None:
        if threshold < self.k or threshold % self.k:
            raise ValueError(f"threshold {threshold} is not a positive multiple of K={self.k}")

    def phase_at(self, threshold: int) -> str:
        """Phase of the params an update at support size ``threshold`` produces.

        Returns:
            ``warm_a`` at K, ``warm_b`` at 2K, ``warm_c`` at 3K, ``common`` from 4K on.

        Raises:
            ValueError: ``threshold`` is not a positive multiple of K.
        """
        self._check(threshold)
        n = threshold // self.k
        return WARM_PHASES[n - 1] if n <= len(WARM_PHASES) else COMMON

    def next_threshold(self, threshold: int) -> int:
        """Support size of the update after the one at ``threshold``.

        Raises:
            ValueError: ``threshold`` is not a positive multiple of K.
        """
        self._check(threshold)
        return threshold + self.k

    def phase_after(self, rows: int) -> str:
        """Phase of an item's params after ``rows`` applied support rows."""
        if rows < 0:
            raise ValueError(f"rows must not be negative, got {rows}")
        if rows < self.k:
            return COLD
        return self.phase_at(rows - rows % self.k)

    def updates(self, rows: int) -> list[tuple[int, str]]:
        """Every update ``(threshold, phase)`` an item with ``rows`` support rows has had."""
        return [(t, self.phase_at(t)) for t in range(self.k, rows + 1, self.k)]

    def protocol_part(self, rank: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Where the offline split puts a new item's rows, by their time rank in the item.

        Args:
            rank: 0-based position of each row among its item's rows, ``[R]``.

        Returns:
            ``[R]``: index into ``WARM_PHASES`` of the update the row feeds, or
            ``len(WARM_PHASES)`` for a test row (past 3K).
        """
        return np.minimum(rank // self.k, len(WARM_PHASES)).astype(np.int64)
