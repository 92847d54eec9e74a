"""The report's figures (matplotlib, Agg backend), each written to a PNG."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from emerg_stream.meta.metrics import PHASE_METRICS
from emerg_stream.phases import PHASE_LABELS, PHASE_TITLES, PHASES
from emerg_stream.report.predictions import PrequentialCurve

__all__ = [
    "MIN_DELTA_SPAN",
    "PHASES",
    "PHASE_LABELS",
    "plot_item_graphs",
    "plot_phase_metrics",
    "plot_prequential",
]

#: Smallest scale of the change column of :func:`plot_item_graphs` (edge weights are in [0, 1]).
MIN_DELTA_SPAN = 0.05
#: Panel titles of :func:`plot_phase_metrics` (default: the metric's column name).
METRIC_TITLES = {
    "auc": "AUC (pooled over all test rows)",
    "auc_within": "within-item AUC (users of one item, row-weighted mean)",
    "auc_between": "between-item AUC (items by their mean score)",
    "f1": "F1 (threshold = mean score)",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_phase_metrics(methods: dict[str, Any], out: Path) -> Path:
    """Each metric per phase, one line per method, error bars = std over seeds.

    One panel per metric of :data:`~emerg_stream.meta.metrics.PHASE_METRICS`: pooled
    AUC, within-item AUC, between-item AUC, F1. A metric that no method's summary holds
    (a run written before it existed) gets a panel that says so.

    Args:
        methods: ``results.json``'s ``methods`` (each with ``summary`` and ``seeds``).
        out: PNG path.

    Returns:
        ``out``.
    """
    plt = _pyplot()
    cols = 2
    rows = -(-len(PHASE_METRICS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 4.0 * rows), squeeze=False)
    x = np.arange(len(PHASES), dtype=float)
    n = len(methods)
    spread = 0.06 * (n - 1)
    offsets = np.linspace(-spread, spread, n) if n > 1 else np.zeros(1)
    for ax, (metric, title) in zip(axes.flat, PHASE_METRICS.items(), strict=False):
        drawn = 0
        for (method, res), dx in zip(methods.items(), offsets, strict=True):
            s = res["summary"]
            if not all(f"{metric}_mean" in s.get(p, {}) for p in PHASES):
                continue
            mean = np.array([100 * s[p][f"{metric}_mean"] for p in PHASES])
            std = np.array([100 * s[p][f"{metric}_std"] for p in PHASES])
            seeds = len(res.get("seeds", {}))
            label = f"{method} ({seeds} seed{'' if seeds == 1 else 's'})"
            ax.errorbar(x + dx, mean, yerr=std, marker="o", capsize=4, label=label)
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "not in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(x, [PHASE_LABELS[p] for p in PHASES])
        ax.set_xlabel("phase (test rows scored with the params after it)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(METRIC_TITLES.get(metric, title))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(PHASE_METRICS) :]:
        ax.set_visible(False)
    fig.suptitle("New items: per-phase metrics, mean ± std over seeds", fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_prequential(curve: PrequentialCurve, out: Path) -> Path:
    """Prequential AUC over stream (event) time: per window and cumulative.

    Args:
        curve: From :func:`~emerg_stream.report.predictions.prequential_curve`.
        out: PNG path.

    Returns:
        ``out``.
    """
    plt = _pyplot()
    import matplotlib.dates as mdates

    when = [datetime.fromtimestamp(t / 1000, tz=UTC) for t in curve.window_end]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.plot(
        when,
        100 * curve.window_auc,
        marker="o",
        linestyle=":",
        alpha=0.8,
        label=f"per window (~{curve.window_rows} rows)",
    )
    ax.plot(when, 100 * curve.cumulative_auc, linewidth=2, label="cumulative, all items")
    if curve.cumulative_auc_new is not None:
        ax.plot(when, 100 * curve.cumulative_auc_new, linewidth=2, label="cumulative, new items")
    ax.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylabel("AUC (%)")
    ax.set_xlabel("event time (UTC), end of window")
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Prequential AUC: each interaction scored before it was learned from")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_item_graphs(
    item: str,
    names: list[str],
    graphs: dict[str, np.ndarray],
    out: Path,
    *,
    title: str = "",
    delta_span: float | None = None,
) -> Path:
    """One item's refined graphs: a column per phase, a row per order, then the change.

    The last column is the last phase minus cold start, on a diverging scale, so what
    warm-up changed stands out even when it is small.

    Args:
        item: Item id (for the title).
        names: Field names, ``[F]``.
        graphs: Phase -> refined graphs ``[L, F, F]`` (from
            :func:`emerg_stream.meta.explain.item_graphs`).
        out: PNG path.
        title: Extra text after the item id.
        delta_span: The change column's scale is ``±delta_span``; share one across items
            so their changes compare (default: this item's largest change). Never below
            :data:`MIN_DELTA_SPAN`, so float noise does not look like a change.

    Returns:
        ``out``.
    """
    plt = _pyplot()
    phases = [p for p in PHASES if p in graphs]
    layers = graphs[phases[0]].shape[0]
    size = 0.32 * len(names) + 1.2
    cols = len(phases) + 1
    fig, axes = plt.subplots(
        layers,
        cols,
        figsize=(size * cols + 2.2, size * layers + 0.8),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    ticks = range(len(names))
    delta = graphs[phases[-1]] - graphs[phases[0]]
    span = max(delta_span or float(np.abs(delta).max()), MIN_DELTA_SPAN)
    im = im_delta = None
    for r in range(layers):
        for c in range(cols):
            ax = axes[r][c]
            if c < len(phases):
                phase = phases[c]
                im = ax.imshow(graphs[phase][r], vmin=0.0, vmax=1.0, cmap="viridis")
                head = PHASE_TITLES[phase]
            else:
                im_delta = ax.imshow(delta[r], vmin=-span, vmax=span, cmap="RdBu_r")
                head = f"change: {PHASE_LABELS[phases[-1]]} − cold"
            if r == 0:
                ax.set_title(head, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"order {r + 2} (Â_{r + 1})", fontsize=9)
            ax.set_xticks(ticks, names, rotation=90, fontsize=7)
            ax.set_yticks(ticks, names, fontsize=7)
            ax.tick_params(labelbottom=r == layers - 1, labelleft=c == 0)
    fig.colorbar(im, ax=axes[:, : len(phases)], shrink=0.8, label="edge weight")
    fig.colorbar(im_delta, ax=axes[:, -1], shrink=0.8, label="change")
    fig.suptitle(f"item {item}{': ' + title if title else ''}", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
