"""Write ``RUN/report.html`` and its PNGs from a reproduce run (and stream predictions)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from emerg_stream.errors import EmergError
from emerg_stream.report.page import (
    img,
    methods_section,
    metrics_table,
    page,
    prequential_section,
    safe_name,
)
from emerg_stream.report.plots import (
    PHASES,
    plot_item_graphs,
    plot_phase_metrics,
    plot_prequential,
)
from emerg_stream.report.predictions import compare_methods, prequential_curve, read_roles
from emerg_stream.report.results import load_results, pick_items

__all__ = ["FIGURES_DIR", "REPORT_FILE", "Report", "write_report"]

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
    results = load_results(run)
    figdir = run / FIGURES_DIR
    figdir.mkdir(parents=True, exist_ok=True)
    report = Report(html=run / REPORT_FILE)
    methods = results["methods"]
    sections = [_phase_section(methods, figdir, report)]
    graphs = _graphs_section(run, methods, method, items, n_items, figdir, report)
    if graphs is not None:
        sections.append(graphs)

    if stream_predictions is not None:
        pred, shadow = read_roles(stream_predictions)  # one pass over the file
        curve = prequential_curve(pred)
        png = plot_prequential(curve, figdir / "prequential-auc.png")
        report.figures.append(png)
        sections.append(prequential_section(stream_predictions, pred, curve, png))
        if shadow is not None:  # a shadow method ran beside the primary
            sections.append(methods_section(compare_methods(pred, shadow)))

    if report.notes:
        items_html = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
        sections.append(f"<h2>Left out</h2><ul>{items_html}</ul>")
    report.html.write_text(page(run, results, sections), encoding="utf-8")
    log.info(
        "report_written",
        path=str(report.html),
        figures=len(report.figures),
        items=report.items,
        notes=len(report.notes),
    )
    return report


def _phase_section(methods: dict[str, Any], figdir: Path, report: Report) -> str:
    """The per-phase metrics: tables and one figure (added to ``report.figures``)."""
    png = plot_phase_metrics(methods, figdir / "phase-metrics.png")
    report.figures.append(png)
    return (
        "<h2>Per-phase metrics</h2>"
        + metrics_table(methods)
        + img(png, "AUC, within-item AUC, between-item AUC and F1 per phase and method")
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


def _graphs_section(
    run: Path,
    methods: dict[str, Any],
    method: str,
    items: list[str] | None,
    n_items: int,
    figdir: Path,
    report: Report,
) -> str | None:
    """Feature graphs of sample new items; ``None`` when none was drawn (``report.notes``)."""
    from emerg_stream.meta.explain import item_graphs

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
                    figdir / f"graphs-{safe_name(item)}.png",
                    title=why,
                    delta_span=span,
                )
                report.figures.append(out)
                report.items.append(item)
                graphs.append(
                    f"<h3>item {html.escape(item)} <small>({html.escape(why)})</small></h3>"
                    + img(out, f"feature graphs of item {item}")
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
    return "".join(graphs) if len(graphs) > 1 else None
