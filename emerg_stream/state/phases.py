"""Phase thresholds of the warm-up protocol (DESIGN.md §3 and §4).

A new item starts ``cold`` with φ⁰. When its applied support reaches K rows it is
updated on exactly those K rows (``warm_a``); at 2K on the next K (``warm_b``), at 3K
on the next K (``warm_c``), each update continuing from the previous φ, exactly like the
offline :func:`emerg_stream.meta.evaluate.run_phases`. After that every K more rows give
one more update (``common``) on the rows since the previous threshold, so the support
buffer never holds more than K rows.
"""

from __future__ import annotations

COLD = "cold"
WARM_PHASES: tuple[str, str, str] = ("warm_a", "warm_b", "warm_c")
COMMON = "common"
#: Items the checkpoint was trained on: scored with trained params, never warmed up.
OLD = "old"
#: Every phase a new item goes through, in order.
PHASES: tuple[str, ...] = (COLD, *WARM_PHASES, COMMON)


def crossed_phase(threshold: int, k: int) -> str:
    """Phase of the params an update at support size ``threshold`` produces.

    Args:
        threshold: A multiple of ``k`` (the support size that triggered the update).
        k: Rows per phase.

    Returns:
        ``warm_a`` at K, ``warm_b`` at 2K, ``warm_c`` at 3K, ``common`` from 4K on.

    Raises:
        ValueError: ``k`` is not positive or ``threshold`` is not a positive multiple of it.
    """
    if k < 1:
        raise ValueError(f"K must be positive, got {k}")
    if threshold < k or threshold % k:
        raise ValueError(f"threshold {threshold} is not a positive multiple of K={k}")
    n = threshold // k
    return WARM_PHASES[n - 1] if n <= len(WARM_PHASES) else COMMON
