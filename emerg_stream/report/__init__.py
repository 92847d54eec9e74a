"""``emerg-stream report``: one HTML page with the plots of a reproduce run.

:func:`write_report` reads a run directory written by ``emerg-stream reproduce``::

    RUN/results.json             per-method, per-phase metrics over seeds (required)
    RUN/phis-<method>.npz        each new item's params after every phase (for heatmaps)
    RUN/checkpoints/<method>-seed0/  the checkpoint that refines those params into graphs

and writes ``RUN/report.html`` (self-contained: the PNGs are embedded) plus the PNGs
themselves under ``RUN/report/``. Sections whose inputs are missing say so in the page
instead of failing the report. With a stream predictions file (format:
:mod:`emerg_stream.report.predictions`) it adds the prequential AUC over stream time.

Rooms: :mod:`~emerg_stream.report.results` reads the run, :mod:`~emerg_stream.report.write`
assembles the sections, :mod:`~emerg_stream.report.page` writes the HTML,
:mod:`~emerg_stream.report.plots` draws the PNGs; this module only re-exports.
"""

from emerg_stream.report.results import load_results, pick_items
from emerg_stream.report.write import Report, write_report

__all__ = ["Report", "load_results", "pick_items", "write_report"]
