"""Ranking and classification metrics, in numpy (no scikit-learn needed)."""

from __future__ import annotations

import numpy as np

# the one AUC (:mod:`emerg_stream.auc`), part of this module's metrics too
from emerg_stream.auc import roc_auc as roc_auc

#: The metrics of one phase, in table order: key of :func:`phase_metrics` -> column name.
#: Every table and plot of per-phase metrics (``reproduce``'s results.json and markdown,
#: the report, the stream evaluation) derives its columns from this.
PHASE_METRICS: dict[str, str] = {
    "auc": "AUC",
    "auc_within": "within-item AUC",
    "auc_between": "between-item AUC",
    "f1": "F1",
}


def f1_at_mean(labels: np.ndarray, scores: np.ndarray) -> float:
    """F1 with the threshold at the mean predicted score (the public code's convention)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    pred = s >= s.mean()
    tp = float(np.sum(pred & y))
    fp = float(np.sum(pred & ~y))
    fn = float(np.sum(~pred & y))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def within_item_auc(labels: np.ndarray, scores: np.ndarray, items: np.ndarray) -> float:
    """Within-item AUC: how well scores rank the users of one item, averaged over items.

    ``Σ_i n_i · AUC_i / Σ_i n_i`` over the items i whose rows hold both labels, where
    AUC_i is the AUC of item i's rows alone and n_i its number of rows. Items with one
    label only carry no within-item ranking and are left out. A per-item bias (any
    score shift that is constant within an item) leaves it unchanged.

    Args:
        labels: ``[N]`` 0/1.
        scores: ``[N]`` scores.
        items: ``[N]`` item of each row (any ids: integers or strings).

    Returns:
        The weighted mean AUC; NaN when no item has both labels.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    _, it = np.unique(np.asarray(items), return_inverse=True)
    order = np.argsort(it, kind="stable")
    bounds = np.flatnonzero(np.diff(it[order])) + 1
    total = weight = 0.0
    for idx in np.split(order, bounds):
        n_pos = int(y[idx].sum())
        if 0 < n_pos < len(idx):
            total += len(idx) * roc_auc(y[idx], s[idx])
            weight += len(idx)
    return total / weight if weight else float("nan")


def between_item_auc(labels: np.ndarray, scores: np.ndarray, items: np.ndarray) -> float:
    """Between-item AUC: the pooled AUC when each row scores its item's mean score.

    It measures only how items are ranked against each other (a model that ranks users
    within an item perfectly but gives every item the same mean scores 0.5).

    Args:
        labels: ``[N]`` 0/1.
        scores: ``[N]`` scores.
        items: ``[N]`` item of each row.

    Returns:
        AUC in [0, 1]; NaN when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64)
    _, inv = np.unique(np.asarray(items), return_inverse=True)
    means = np.bincount(inv, weights=s) / np.bincount(inv)
    return roc_auc(labels, means[inv])


def phase_metrics(labels: np.ndarray, scores: np.ndarray, items: np.ndarray) -> dict[str, float]:
    """One phase's metrics, keyed as :data:`PHASE_METRICS` (AUC, within, between, F1)."""
    return {
        "auc": roc_auc(labels, scores),
        "auc_within": within_item_auc(labels, scores, items),
        "auc_between": between_item_auc(labels, scores, items),
        "f1": f1_at_mean(labels, scores),
    }
