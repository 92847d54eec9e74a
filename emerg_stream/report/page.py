"""The report's HTML: tables, embedded figures, the page around the sections."""

from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path
from typing import Any

from emerg_stream.meta.metrics import PHASE_METRICS
from emerg_stream.report.plots import PHASE_LABELS, PHASES
from emerg_stream.report.predictions import MethodComparison, PrequentialCurve, StreamPredictions

__all__ = [
    "img",
    "methods_section",
    "metrics_table",
    "page",
    "prequential_section",
    "safe_name",
]


def safe_name(name: str) -> str:
    """``name`` as a file-name part: letters, digits, ``-_.``, at most 80 characters."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def img(path: Path, alt: str) -> str:
    """The PNG at ``path`` embedded as a figure (base64), captioned with its file name."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(path.parent.name + '/' + path.name)}</figcaption></figure>"
    )


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def metrics_table(methods: dict[str, Any]) -> str:
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


def prequential_section(
    path: Path, pred: StreamPredictions, curve: PrequentialCurve, png: Path
) -> str:
    """The stream section: facts about the predictions file, the curve, the protocol."""
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
        + img(png, "prequential AUC over event time")
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


def page(run: Path, results: dict[str, Any], sections: list[str]) -> str:
    """The whole self-contained page: the run's facts, then ``sections`` in order."""
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


def methods_section(cmp: MethodComparison) -> str:
    """The primary and the shadow method side by side (prequential AUC, same clicks)."""
    head = "".join(f"<th>{html.escape(m)}</th>" for m in cmp.methods)
    rows = [(f"AUC, all items (n={cmp.n:,})", cmp.auc)]
    if cmp.auc_new is not None:
        rows.append((f"AUC, new items (n={cmp.n_new:,})", cmp.auc_new))
    body = "".join(
        f"<tr><th>{k}</th>" + "".join(f"<td>{_fmt_auc(v)}</td>" for v in vals) + "</tr>"
        for k, vals in rows
    )
    return (
        "<h2>Shadow method beside the primary</h2>"
        f"<table><tr><th></th>{head}</tr>{body}</table>"
        "<p class=note>Both methods scored the same interactions, each with its own "
        "params in force <i>before</i> the interaction (the worker's shadow method: the "
        "same prequential protocol, the same update thresholds). Only interactions both "
        "scored count: a shadow started late does not score the items announced before "
        "it. The shadow's params were never published.</p>"
    )
