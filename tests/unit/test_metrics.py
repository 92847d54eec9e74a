import numpy as np
import pytest

from emerg_stream.meta.metrics import between_item_auc, phase_metrics, roc_auc, within_item_auc


def test_within_item_auc_by_hand():
    # item 7: 2 rows, ranked right (AUC 1); item 3: 3 rows, pos in the middle (AUC 0.5)
    # item 9: one label only, left out. Weighted by rows: (2*1 + 3*0.5) / 5 = 0.7
    labels = np.array([1, 0, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.5, 0.8, 0.3, 0.4])
    items = np.array([7, 7, 3, 3, 3, 9, 9])
    assert within_item_auc(labels, scores, items) == pytest.approx(0.7)


def test_within_item_auc_ignores_a_per_item_bias_and_between_sees_only_it():
    rng = np.random.default_rng(0)
    items = rng.integers(0, 40, 4000)
    bias = rng.normal(0, 2, 40)
    taste = rng.normal(0, 1, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-(bias[items] + taste)))).astype(int)
    full = bias[items] + taste
    bias_only = bias[items] + 1e-9 * rng.random(4000)
    taste_only = taste
    # a per-item shift changes pooled and between-item AUC, not within-item AUC
    assert within_item_auc(labels, full, items) == pytest.approx(
        within_item_auc(labels, taste_only, items)
    )
    assert roc_auc(labels, full) != pytest.approx(roc_auc(labels, taste_only))
    # a score that only knows the item: within-item at chance, between-item high
    assert abs(within_item_auc(labels, bias_only, items) - 0.5) < 0.05
    assert between_item_auc(labels, bias_only, items) > 0.75
    # a score that only knows the user: within-item high, between-item near chance
    assert within_item_auc(labels, taste_only, items) > 0.65
    assert abs(between_item_auc(labels, taste_only, items) - 0.5) < 0.1


def test_phase_metrics_keys_and_nan_without_both_labels():
    m = phase_metrics(np.array([1, 1, 0]), np.array([0.2, 0.3, 0.1]), np.array([0, 0, 1]))
    assert set(m) == {"auc", "f1", "auc_within", "auc_between"}
    assert np.isnan(m["auc_within"])  # no item has both labels


def test_auc_of_diverged_scores_is_nan():
    assert np.isnan(roc_auc(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.3])))


def test_within_and_between_item_auc_take_string_item_ids():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 20, 500)
    labels, scores = rng.integers(0, 2, 500), rng.random(500)
    names = np.array([f"item{c}" for c in codes])  # sorts differently from the codes
    within = within_item_auc(labels, scores, codes)
    assert within_item_auc(labels, scores, names) == pytest.approx(within, abs=1e-12)
    assert between_item_auc(labels, scores, names) == between_item_auc(labels, scores, codes)
