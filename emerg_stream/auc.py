"""The one ROC AUC of the project, in numpy: the offline tables and the live stream share it.

Numpy only (no torch, no Kafka), so both the model side (:mod:`emerg_stream.meta.metrics`,
the report, the stream evaluation) and the stream side (the worker's sliding-window
prequential AUC, :class:`emerg_stream.stream.metrics.SlidingAUC`) import it.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["roc_auc"]


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores averaged).

    A tie between a positive and a negative counts one half: tied scores share the mean
    of their 1-based ranks.

    Args:
        labels: ``[N]`` 0/1 (or bool).
        scores: ``[N]`` any real scores.

    Returns:
        AUC in [0, 1]; NaN when only one class is present or a score is not finite (a
        diverged model ranks nothing).
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0 or not np.isfinite(s).all():
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over ties
    _, start, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
