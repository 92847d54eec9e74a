"""``emerg-stream report``: one HTML page with the plots of a reproduce run.

:func:`write_report` reads a run directory written by ``emerg-stream reproduce``::

    RUN/results.json             per-method, per-phase metrics over seeds (required)
    RUN/phis-<method>.npz        each new item's params after every phase (for heatmaps)
    RUN/checkpoints/<method>-seed0/  the checkpoint that refines those params into graphs

and writes ``RUN/report.html`` (self-contained: the PNGs are embedded) plus the PNGs
themselves under ``RUN/report/``. Sections whose inputs are missing say so in the page
instead of failing the report. With a stream predictions file (format:
:mod:`emerg_stream.report.predictions`) it adds the prequential AUC over stream time.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from emerg_stream.errors import ConfigError, EmergError
from emerg_stream.meta.metrics import PHASE_METRICS
from emerg_stream.report.plots import (
    PHASE_LABELS,
    PHASES,
    plot_item_graphs,
    plot_phase_metrics,
    plot_prequential,
)
from emerg_stream.report.predictions import (
    PrequentialCurve,
    StreamPredictions,
    prequential_curve,
    read_predictions,
)

__all__ = ["Report", "load_results", "pick_items", "write_report"]

log = structlog.get_logger(__name__)

REPORT_FILE = "report.html"
FIGURES_DIR = "report"


@dataclass
class Report:
    """What :func:`write_report` wrote.

    Args:
        html: The page.
        figures: PNG files, in page order.
        items: Items whose graphs were drawn.
        notes: Sections left out, with the reason.
    """

    html: Path
    figures: list[Path] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_results(run: Path) -> dict[str, Any]:
    """Read and check ``RUN/results.json``.

    The pooled AUC and F1 of every phase are required; the within- and between-item
    AUC are optional (runs written before they existed lack them; the report then says
    so instead of failing).

    Raises:
        ConfigError: No run there, or a file that lacks a method's per-phase summary.
    """
    path = run / "results.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: --run must be a directory written by `emerg-stream reproduce`"
        )
    try:
        results = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(results, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    methods = results.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{path} has no methods (an interrupted reproduce run?)")
    keys = ("auc_mean", "auc_std", "f1_mean", "f1_std")
    for method, res in methods.items():
        summary = res.get("summary", {}) if isinstance(res, dict) else {}
        for phase in PHASES:
            missing = [k for k in keys if k not in summary.get(phase, {})]
            if missing:
                raise ConfigError(f"{path}: method {method!r}, phase {phase!r} lacks {missing}")
    return results


def pick_items(run: Path, method: str = "emerg", count: int = 3) -> list[tuple[str, str]]:
    """Items spread over the range of how much warm-up changed their graphs.

    The change of an item is the mean absolute difference of its refined graphs
    (all orders) between cold start and the last phase. Picks run from the largest
    change to the smallest.

    Args:
        run: The run directory.
        method: A graph method with ``phis-<method>.npz`` and ``checkpoints/<method>-seed0``.
        count: How many items.

    Returns:
        ``(item id, why it was picked)`` pairs.

    Raises:
        ConfigError: Missing files, or a method without feature graphs.
        ModelError: A checkpoint that does not load.
    """
    import torch

    from emerg_stream.meta.checkpoint import load_checkpoint
    from emerg_stream.model.emerg import EmerG

    npz_path = run / f"phis-{method}.npz"
    if not npz_path.is_file():
        raise ConfigError(f"{npz_path.name} not found in the run")
    ck = load_checkpoint(run / "checkpoints" / f"{method}-seed0")
    if not isinstance(ck.model, EmerG):
        raise ConfigError(f"method {method!r} has no feature graph")
    with np.load(npz_path, allow_pickle=False) as data:
        ids = [str(i) for i in data["item_ids"]]
        with torch.no_grad():
            cold = ck.model.graphs(torch.from_numpy(data[f"{PHASES[0]}.adj"]))
            last = ck.model.graphs(torch.from_numpy(data[f"{PHASES[-1]}.adj"]))
    change = (last - cold).abs().mean(dim=(1, 2, 3)).numpy()
    order = np.argsort(-change, kind="stable")
    ranks = sorted({int(r) for r in np.linspace(0, len(ids) - 1, min(count, len(ids))).round()})
    picks = []
    for r in ranks:
        i = int(order[r])
        if r == 0:
            why = "largest change"
        elif r == len(ids) - 1:
            why = "smallest change"
        else:
            why = f"change rank {r + 1} of {len(ids)}"
        picks.append((ids[i], f"{why} (mean |Δ| = {change[i]:.3f})"))
    return picks


def write_report(
    run: Path,
    *,
    stream_predictions: Path | None = None,
    method: str = "emerg",
    items: list[str] | None = None,
    n_items: int = 3,
) -> Report:
    """Write ``RUN/report.html`` and its PNGs.

    Args:
        run: A ``reproduce`` run directory.
        stream_predictions: Optional stream predictions file (CSV / JSON Lines).
        method: Whose feature graphs to draw.
        items: Items to draw (default: :func:`pick_items` chooses ``n_items``).
        n_items: How many items to pick when ``items`` is not given.

    Returns:
        What was written.

    Raises:
        ConfigError: No usable ``results.json``.
        DataError: An unreadable stream predictions file (asked for, so it is an error).
    """
    from emerg_stream.meta.explain import item_graphs

    results = load_results(run)
    figdir = run / FIGURES_DIR
    figdir.mkdir(parents=True, exist_ok=True)
    report = Report(html=run / REPORT_FILE)
    sections: list[str] = []

    methods = results["methods"]
    png = plot_phase_metrics(methods, figdir / "phase-metrics.png")
    report.figures.append(png)
    sections.append(
        "<h2>Per-phase metrics</h2>"
        + _metrics_table(methods)
        + _img(png, "AUC, within-item AUC, between-item AUC and F1 per phase and method")
        + "<p class=note>Phase <i>cold</i>: test rows scored with the params generated from "
        "side features alone; <i>A</i>, <i>B</i>, <i>C</i>: after warm-up on each item's "
        "first K, 2K, 3K rows. AUC is pooled over all test rows of all new items; F1 "
        "thresholds at the mean score. <i>Within-item AUC</i> = Σ<sub>i</sub> n<sub>i</sub>"
        " AUC<sub>i</sub> / Σ<sub>i</sub> n<sub>i</sub> over the new items i whose test rows "
        "hold both labels, AUC<sub>i</sub> the AUC of item i's test rows alone and "
        "n<sub>i</sub> their number: how well the users of one item are ranked (a per-item "
        "bias leaves it unchanged). <i>Between-item AUC</i>: the pooled AUC when every row "
        "is scored with its item's mean score: how well items are ranked against each "
        "other. Error bars: standard deviation over seeds.</p>"
    )

    graphs: list[str] = ["<h2>Feature graphs of sample new items</h2>"]
    if method not in methods:
        report.notes.append(f"feature graphs: method {method!r} is not in this run")
    else:
        try:
            chosen = (
                [(i, "asked for") for i in items] if items else pick_items(run, method, n_items)
            )
            drawn = [(item, why, *item_graphs(run, item, method)) for item, why in chosen]
            # one scale for every item's change column, so the items compare
            span = max(float(np.abs(g[PHASES[-1]] - g[PHASES[0]]).max()) for _, _, _, g in drawn)
            for item, why, names, graphs_of in drawn:
                out = plot_item_graphs(
                    item,
                    names,
                    graphs_of,
                    figdir / f"graphs-{_safe(item)}.png",
                    title=why,
                    delta_span=span,
                )
                report.figures.append(out)
                report.items.append(item)
                graphs.append(
                    f"<h3>item {html.escape(item)} <small>({html.escape(why)})</small></h3>"
                    + _img(out, f"feature graphs of item {item}")
                )
            graphs.append(
                "<p class=note>Columns: cold start (the graph the hypernetwork generated from "
                "side features), then after warm-up phases A, B, C, and the change C − cold "
                "(red: edge strengthened, blue: weakened). Rows: the refined graph "
                "of each message-passing layer (layer l captures interactions of order l+1). "
                "Items are picked across the range of how much warm-up changed their graph. "
                "Drawn from seed 0.</p>"
            )
        except EmergError as exc:
            report.notes.append(f"feature graphs: {exc}")
    if len(graphs) > 1:
        sections.append("".join(graphs))

    if stream_predictions is not None:
        pred = read_predictions(stream_predictions)
        curve = prequential_curve(pred)
        png = plot_prequential(curve, figdir / "prequential-auc.png")
        report.figures.append(png)
        sections.append(_prequential_section(stream_predictions, pred, curve, png))

    if report.notes:
        items_html = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
        sections.append(f"<h2>Left out</h2><ul>{items_html}</ul>")
    report.html.write_text(_page(run, results, sections), encoding="utf-8")
    log.info(
        "report_written",
        path=str(report.html),
        figures=len(report.figures),
        items=report.items,
        notes=len(report.notes),
    )
    return report


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(path.parent.name + '/' + path.name)}</figcaption></figure>"
    )


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _metrics_table(methods: dict[str, Any]) -> str:
    """Two tables like ``reproduce``'s markdown: AUC and F1, then within/between-item AUC."""
    groups = (("auc", "f1"), tuple(m for m in PHASE_METRICS if m not in ("auc", "f1")))
    return "".join(_wide_table(methods, metrics) for metrics in groups) + (
        "<p class=note>In %, mean ± std over seeds; bold: the best of the phase (AUC columns); "
        "–: not in this run (written before the metric existed).</p>"
    )


def _wide_table(methods: dict[str, Any], metrics: tuple[str, ...]) -> str:
    head = "".join(
        f"<th>{PHASE_METRICS[m]} {PHASE_LABELS[p]}</th>" for m in metrics for p in PHASES
    )
    best: dict[tuple[str, str], float] = {}
    for m in metrics:
        for p in PHASES:
            values = [
                r["summary"][p][f"{m}_mean"]
                for r in methods.values()
                if f"{m}_mean" in r["summary"][p]
            ]
            if values and m != "f1":
                best[m, p] = max(values)
    rows = []
    for method, res in methods.items():
        s = res["summary"]
        cells = []
        for m in metrics:
            for p in PHASES:
                if f"{m}_mean" not in s[p]:
                    cells.append("<td>–</td>")
                    continue
                text = _pct(s[p][f"{m}_mean"], s[p][f"{m}_std"])
                bold = s[p][f"{m}_mean"] == best.get((m, p))
                cells.append(f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>")
        seeds = len(res.get("seeds", {}))
        rows.append(f"<tr><th>{html.escape(method)}</th><td>{seeds}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>method</th><th>seeds</th>{head}</tr>{''.join(rows)}</table>"


def _fmt_auc(value: float | None) -> str:
    if value is None:
        return "–"
    return "n/a (one class)" if math.isnan(value) else f"{100 * value:.2f}"


def _prequential_section(
    path: Path, pred: StreamPredictions, curve: PrequentialCurve, png: Path
) -> str:
    first = time.strftime("%Y-%m-%d %H:%M", time.gmtime(int(pred.event_time[0]) / 1000))
    last = time.strftime("%Y-%m-%d %H:%M", time.gmtime(int(pred.event_time[-1]) / 1000))
    facts = [
        ("file", html.escape(str(path))),
        ("predictions", f"{len(pred):,}"),
        ("duplicates dropped (same event id)", f"{pred.duplicates:,}"),
        ("event time (UTC)", f"{first} → {last}"),
        ("AUC, all items", _fmt_auc(curve.auc)),
        ("AUC, new items", _fmt_auc(curve.auc_new) if pred.has_phase else "– (no phase column)"),
    ]
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    return (
        "<h2>Prequential AUC over stream time</h2>"
        f"<table>{rows}</table>"
        + _img(png, "prequential AUC over event time")
        + "<p class=note>Each interaction was scored with its item's params in force "
        "<i>before</i> the interaction was applied. Windows hold equal numbers of rows in "
        "event-time order. Input format: CSV with a header or JSON Lines, columns "
        "<code>event_time</code> (ms since the epoch, UTC), <code>label</code> (0/1), "
        "<code>score</code>; optional <code>event_id</code> (de-duplication) and "
        "<code>phase</code> (<code>old</code> = trained item).</p>"
    )


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}
figure{margin:1em 0}
img{max-width:100%}
figcaption,.note,.meta{color:#666;font-size:.85em}
code{background:#f4f4f4;padding:0 .2em}
"""


def _page(run: Path, results: dict[str, Any], sections: list[str]) -> str:
    meta = [
        ("run", str(run)),
        ("dataset", str(results.get("dataset", "?"))),
        ("device", str(results.get("device", "?"))),
        ("command", str(results.get("command", "?"))),
        ("wall time", f"{results['wall_time_s']} s" if "wall_time_s" in results else "?"),
        ("report written", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())),
    ]
    split = results.get("split", {})
    if split:
        meta.append(("split", json.dumps(split)))
    meta_rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in meta
    )
    title = f"emerg-stream report: {html.escape(str(results.get('dataset', run.name)))}"
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{title}</title><style>{_CSS}</style></head><body>"
        f"<h1>{title}</h1><table class=meta>{meta_rows}</table>"
        + "".join(sections)
        + "</body></html>\n"
    )
