"""Within- and between-item AUC reach every table: run_phases, results.json, markdown, stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emerg_stream.meta.evaluate import PHASES, NewItemData, predict, run_phases
from emerg_stream.meta.metrics import (
    PHASE_METRICS,
    between_item_auc,
    phase_metrics,
    roc_auc,
    within_item_auc,
)
from emerg_stream.meta.reproduce import PHASE_LABELS, markdown_table, summarize
from emerg_stream.meta.rows import ItemSet, Rows
from emerg_stream.meta.warmup import WarmupConfig
from emerg_stream.model import ModelConfig, build_model
from emerg_stream.serving.stream_eval import StreamEvaluation, comparison_table

F, T, V = 6, 2, 60


def per_seed_metrics(seed: int) -> dict[str, dict[str, float]]:
    """Every metric of every phase a different number, so a swapped column shows."""
    return {
        p: {
            "auc": 0.70 + 0.01 * i + 0.001 * seed,
            "auc_within": 0.60 + 0.01 * i + 0.002 * seed,
            "auc_between": 0.80 + 0.01 * i + 0.003 * seed,
            "f1": 0.50 + 0.01 * i + 0.004 * seed,
        }
        for i, p in enumerate(PHASES)
    }


def parse_tables(text: str) -> list[dict[str, dict[str, str]]]:
    """Markdown tables -> [{row name: {column header: cell}}]."""
    tables = []
    for block in text.strip().split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if not lines:
            continue
        head = [c.strip() for c in lines[0].strip("|").split("|")]
        rows = {}
        for ln in lines[2:]:
            cells = [c.strip() for c in ln.strip("|").split("|")]
            rows[cells[0]] = dict(zip(head[1:], cells[1:], strict=True))
        tables.append(rows)
    return tables


def test_phase_metrics_keys_are_the_table_columns_in_order():
    m = phase_metrics(
        np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.6]), np.array([0, 0, 1, 1])
    )
    assert list(m) == list(PHASE_METRICS)


def test_summary_and_markdown_hold_every_metric_from_its_own_values():
    per_seed = {s: per_seed_metrics(s) for s in range(3)}
    summary = summarize(per_seed)
    for p in PHASES:
        for metric in PHASE_METRICS:
            values = [per_seed[s][p][metric] for s in per_seed]
            assert summary[p][f"{metric}_mean"] == pytest.approx(np.mean(values))
            assert summary[p][f"{metric}_std"] == pytest.approx(np.std(values))
    tables = parse_tables(markdown_table({"methods": {"emerg": {"summary": summary}}}))
    cells = {k: v for t in tables for k, v in t["emerg"].items()}
    # every metric x phase is a column, and holds that metric's mean ± std in %
    assert len(cells) == len(PHASE_METRICS) * len(PHASES)
    for metric, name in PHASE_METRICS.items():
        for p in PHASES:
            s = summary[p]
            want = f"{100 * s[f'{metric}_mean']:.2f} ± {100 * s[f'{metric}_std']:.2f}"
            assert cells[f"{name} {PHASE_LABELS[p]}"] == want, (metric, p)


def test_markdown_of_a_run_without_the_new_metrics_shows_a_dash():
    old = {p: {"auc_mean": 0.7, "auc_std": 0.0, "f1_mean": 0.6, "f1_std": 0.0} for p in PHASES}
    tables = parse_tables(markdown_table({"methods": {"old": {"summary": old}}}))
    assert tables[0]["old"]["AUC C"] == "70.00 ± 0.00"
    assert tables[1]["old"]["within-item AUC C"] == "–"


def test_comparison_table_of_the_stream_has_within_and_between_and_their_difference():
    stream, offline = per_seed_metrics(0), per_seed_metrics(1)
    ev = StreamEvaluation(
        stream=stream,
        coverage={},
        missing_items=[],
        n_items=3,
        n_test_rows=9,
        model_version="v",
        params_records=3,
        offline=offline,
    )
    text = comparison_table(ev)
    tables = parse_tables(text)
    assert tables[1]["stream"]["within-item AUC A"] == (
        f"{100 * stream['warm_a']['auc_within']:.2f} ± 0.00"
    )
    assert tables[1]["offline"]["between-item AUC C"] == (
        f"{100 * offline['warm_c']['auc_between']:.2f} ± 0.00"
    )
    assert "within-item AUC stream - offline (points): cold -0.200" in text
    assert "AUC stream - offline (points): cold -0.100" in text


def test_run_phases_reports_the_split_of_the_scores_it_made():
    """Each phase's within/between AUC is computed from that phase's scores and items."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n_items, n = 10, 400
    item = torch.arange(n) % n_items
    tokens = torch.randint(1, V, (n, F, T), generator=g)
    tokens[:, 0, 0] = item + 1
    tokens[:, 1:3, :] = (item[:, None, None] * 3 + torch.arange(2)[None, :, None] + 20) % V + 1
    weights = torch.full((n, F, T), 0.5)
    # clicks depend on the item (bias) and on a user token (within-item signal)
    logit = (item.float() - 4.5) / 3 + (tokens[:, 3, 0].float() - V / 2) / 15
    labels = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
    rows = Rows(tokens, weights, labels, item)
    first = [int((item == i).nonzero()[0]) for i in range(n_items)]
    items = ItemSet([f"i{i}" for i in range(n_items)], tokens[first], weights[first])
    part = torch.arange(n) // (n // 4)
    data = NewItemData(
        items,
        {p: rows.select((part == k).nonzero().squeeze(1)) for k, p in enumerate(PHASES[1:])},
        rows.select((part == 3).nonzero().squeeze(1)),
    )
    cfg = ModelConfig(
        kind="deepfm", n_fields=F, n_item_fields=3, side_fields=(1, 2), vocab_size=V + 1, dim=8
    )
    model = build_model(cfg)
    cpu = torch.device("cpu")
    metrics, phis = run_phases(model, data, WarmupConfig(steps=5, lr=0.5), salt=0, device=cpu)
    y, it = data.test.labels.numpy(), data.test.item.numpy()
    for p in PHASES:
        scores = predict(model, data.test, phis[p], device=cpu)
        assert metrics[p]["auc"] == pytest.approx(roc_auc(y, scores))
        assert metrics[p]["auc_within"] == pytest.approx(within_item_auc(y, scores, it))
        assert metrics[p]["auc_between"] == pytest.approx(between_item_auc(y, scores, it))
    # warm-up changed the scores, so the numbers of the phases differ
    assert metrics["warm_c"]["auc_between"] != metrics["cold"]["auc_between"]
