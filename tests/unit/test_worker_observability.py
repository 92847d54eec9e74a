"""Worker observability without a broker: sliding prequential AUC, lag gauge, settings."""

from __future__ import annotations

import itertools
import urllib.request

import numpy as np
import pytest

from emerg_stream import cli
from emerg_stream.auc import roc_auc
from emerg_stream.config import WorkerSettings
from emerg_stream.meta.metrics import phase_metrics
from emerg_stream.stream.metrics import SlidingAUC, WorkerMetrics


def pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_sliding_auc_is_the_auc_of_the_latest_window_only():
    rng = np.random.default_rng(0)
    auc = SlidingAUC(window=50)
    assert auc.value() is None
    # 80 perfectly wrong predictions, then 50 random ones (with ties), in uneven chunks
    old_s = np.linspace(0, 1, 80)
    old_y = (old_s < 0.5).astype(int)
    new_s = rng.integers(0, 10, 50) / 10
    new_y = rng.integers(0, 2, 50)
    for chunk in np.array_split(np.arange(80), 7):
        auc.add(old_s[chunk], old_y[chunk])
    assert auc.value() == pytest.approx(0.0)
    for chunk in np.array_split(np.arange(50), 3):
        auc.add(new_s[chunk], new_y[chunk])
    assert len(auc) == 50
    assert auc.value() == pytest.approx(pairwise_auc(new_s, new_y))


def test_sliding_auc_undefined_with_one_label():
    auc = SlidingAUC(window=10)
    auc.add([0.1, 0.9], [1, 1])
    assert auc.value() is None
    with pytest.raises(ValueError):
        SlidingAUC(window=1)


def test_the_stream_and_the_offline_tables_share_one_auc_bit_for_bit():
    # tie-heavy scores: the window's AUC is exactly (==) the offline tables' AUC
    rng = np.random.default_rng(3)
    s = rng.integers(0, 5, 200) / 4
    y = rng.integers(0, 2, 200)
    auc = SlidingAUC(window=200)
    auc.add(s, y)
    offline = phase_metrics(y, s, np.zeros(200, dtype=np.int64))["auc"]
    assert auc.value() == roc_auc(y, s) == offline
    assert auc.value() == pytest.approx(pairwise_auc(s, y), abs=1e-12)


def test_sliding_auc_undefined_while_a_score_is_not_finite():
    auc = SlidingAUC(window=3)
    auc.add([0.2, float("nan"), 0.8], [0, 1, 1])
    assert auc.value() is None
    auc.add([0.1, 0.9], [0, 1])  # the NaN drops out of the window
    assert auc.value() == pytest.approx(1.0)


def scrape(metrics: WorkerMetrics) -> str:
    port = metrics.serve(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            return str(resp.read().decode())
    finally:
        metrics.close()


def test_lag_gauge_drops_revoked_partitions_and_auc_is_published():
    metrics = WorkerMetrics()
    metrics.set_lag({("inter", 0): 7, ("inter", 1): 3})
    metrics.set_lag({("inter", 1): 0})
    auc = SlidingAUC(4)
    auc.add([0.2, 0.8, 0.6, 0.4], [0, 1, 1, 0])
    metrics.set_auc(auc, method="emerg")
    text = scrape(metrics)
    assert 'emerg_worker_consumer_lag{partition="1",topic="inter"} 0.0' in text
    assert 'partition="0"' not in text
    assert 'emerg_worker_prequential_auc{method="emerg",role="primary"} 1.0' in text
    assert 'emerg_worker_prequential_window{method="emerg",role="primary"} 4.0' in text


def test_metrics_host_and_checkpoint_come_from_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("EMERG_METRICS_HOST", "0.0.0.0")
    assert WorkerSettings().metrics_host == "0.0.0.0"
    assert WorkerSettings(_env_file=None).auc_window == 10_000
    missing = tmp_path / "no-such-checkpoint"
    monkeypatch.setenv("EMERG_CHECKPOINT", str(missing))
    args = cli.build_parser().parse_args(["worker"])
    assert args.checkpoint is None  # the flag is optional now
    code = cli.main(["worker", "--device", "cpu"])
    assert code == 2
    assert "no-such-checkpoint" in capsys.readouterr().err
