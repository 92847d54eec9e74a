"""Stream predictions file and the prequential AUC over stream time (numpy only).

**The file format** (``emerg-stream report --stream-predictions FILE``): one row per
scored interaction, the fields of the ``Prediction`` record of the predictions topic.

* CSV with a header row (``*.csv``), or JSON Lines (``*.jsonl``, ``*.ndjson``: one JSON
  object per line). Either may be gzip-compressed (``*.gz``).
* Required: ``event_time`` - milliseconds since the Unix epoch, UTC (an ISO 8601 string
  with a time zone is accepted too); ``label`` - 0 or 1; ``score`` - the predicted click
  probability.
* Optional: ``event_id`` - rows repeating an event id (the same interaction scored again
  after a restart: delivery is at-least-once) count once, the first one wins;
  ``phase`` - rows of phase ``old`` (items the checkpoint was trained on) are left out of
  the *new items* curve; ``shadow`` - rows marked true (a shadow method's scores, see
  docs/DEPLOYMENT.md, Shadow method) are read apart from the primary's:
  :func:`read_predictions` with ``shadow=True`` (or both in one pass: :func:`read_roles`),
  and :func:`compare_methods` sets the two
  side by side on the interactions both scored; ``method`` - the method that scored.
  Other columns (``item_id``, ``params_version`` ...) are ignored.

A JSON Lines dump of the decoded predictions topic is such a file; ``emerg-stream report
--predictions-topic`` writes one. *Prequential* means each interaction was scored with the
item's params in force *before* that interaction was applied, so the curve measures how
well the pipeline predicts what comes next, as the stream goes on.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from emerg_stream.errors import DataError
from emerg_stream.meta.metrics import roc_auc

__all__ = [
    "MethodComparison",
    "PrequentialCurve",
    "StreamPredictions",
    "compare_methods",
    "prequential_curve",
    "read_predictions",
    "read_roles",
]

REQUIRED = ("event_time", "label", "score")


@dataclass(frozen=True)
class StreamPredictions:
    """Scored interactions in stream-time order, duplicates removed.

    Args:
        event_time: ``[N]`` int64 milliseconds since the epoch, ascending.
        label: ``[N]`` int8 0/1.
        score: ``[N]`` float64.
        new_item: ``[N]`` bool, false for phase ``old``; all true without a phase column.
        duplicates: Rows dropped because their event id was seen before.
        has_phase: The file had a ``phase`` column.
        event_id: ``[N]`` the event ids (empty strings where the file has none).
        method: The ``method`` column's value of the rows read ("" without one).
    """

    event_time: npt.NDArray[np.int64]
    label: npt.NDArray[np.int8]
    score: npt.NDArray[np.float64]
    new_item: npt.NDArray[np.bool_]
    duplicates: int
    has_phase: bool
    event_id: tuple[str, ...] = ()
    method: str = ""

    def __len__(self) -> int:
        return len(self.event_time)


@dataclass(frozen=True)
class PrequentialCurve:
    """AUC over stream time, in equal-count windows.

    Args:
        window_end: ``[W]`` event time (ms) of each window's last row.
        window_auc: ``[W]`` AUC of the rows of each window alone (NaN: one class).
        cumulative_auc: ``[W]`` AUC of all rows up to each window's end.
        cumulative_auc_new: ``[W]`` the same over new items only; None without a phase
            column or without old items (then it equals ``cumulative_auc``).
        window_rows: Rows per window (the last may hold more).
        auc: AUC of all rows.
        auc_new: AUC of the new items' rows, or None.
    """

    window_end: npt.NDArray[np.int64]
    window_auc: npt.NDArray[np.float64]
    cumulative_auc: npt.NDArray[np.float64]
    cumulative_auc_new: npt.NDArray[np.float64] | None
    window_rows: int
    auc: float
    auc_new: float | None


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs of a CSV or JSON Lines file."""
    kind = path.name.removesuffix(".gz").rsplit(".", 1)[-1].lower()
    if kind not in ("csv", "jsonl", "ndjson", "json"):
        raise DataError(
            f"{path}: unknown predictions format {kind!r}; use .csv (with a header) or "
            ".jsonl (one JSON object per line), optionally .gz"
        )
    with _open_text(path) as fh:
        if kind == "csv":
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{path}: the header lacks {missing} (needs {', '.join(REQUIRED)}; "
                    f"found {reader.fieldnames})"
                )
            for row in reader:
                yield reader.line_num, row
            return
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not a JSON object: {exc.msg}") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, obj


def _event_time(value: Any) -> int:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        raise ValueError(f"ISO time {text!r} has no time zone")
    return int(stamp.timestamp() * 1000)


def _is_shadow(row: dict[str, Any]) -> bool:
    value = row.get("shadow")
    return value is True or str(value).strip().lower() in ("true", "1")


class _Side:
    """The rows of one role (the primary's or the shadow's) as they are read."""

    def __init__(self) -> None:
        self.times: list[int] = []
        self.labels: list[int] = []
        self.scores: list[float] = []
        self.new: list[bool] = []
        self.ids: list[str] = []
        self.seen: set[str] = set()
        self.method = ""
        self.duplicates = 0
        self.has_phase = False

    def add(self, path: Path, lineno: int, row: dict[str, Any]) -> None:
        missing = [c for c in REQUIRED if row.get(c) in (None, "")]
        if missing:
            raise DataError(f"{path}:{lineno}: missing {', '.join(missing)}")
        event_id = row.get("event_id")
        if event_id not in (None, ""):
            if str(event_id) in self.seen:
                self.duplicates += 1
                return
            self.seen.add(str(event_id))
        try:
            t = _event_time(row["event_time"])
            y = int(float(row["label"]))
            s = float(row["score"])
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}:{lineno}: {exc}") from exc
        if y not in (0, 1):
            raise DataError(f"{path}:{lineno}: label must be 0 or 1, got {row['label']!r}")
        if not np.isfinite(s):
            raise DataError(f"{path}:{lineno}: score is not a finite number: {row['score']!r}")
        phase = row.get("phase")
        self.has_phase = self.has_phase or phase not in (None, "")
        self.times.append(t)
        self.labels.append(y)
        self.scores.append(s)
        self.new.append(phase != "old")
        self.ids.append("" if event_id is None else str(event_id))
        self.method = self.method or str(row.get("method") or "")

    def build(self) -> StreamPredictions | None:
        """The rows sorted by event time (stable); None without any."""
        if not self.times:
            return None
        order = np.argsort(np.asarray(self.times, dtype=np.int64), kind="stable")
        return StreamPredictions(
            event_time=np.asarray(self.times, dtype=np.int64)[order],
            label=np.asarray(self.labels, dtype=np.int8)[order],
            score=np.asarray(self.scores, dtype=np.float64)[order],
            new_item=np.asarray(self.new, dtype=bool)[order],
            duplicates=self.duplicates,
            has_phase=self.has_phase,
            event_id=tuple(self.ids[i] for i in order.tolist()),
            method=self.method,
        )


def read_roles(path: Path) -> tuple[StreamPredictions, StreamPredictions | None]:
    """The primary's rows and, when the file has any, a shadow method's, in one pass.

    Each as :func:`read_predictions` returns it.

    Raises:
        DataError: As :func:`read_predictions`; or the file has no primary rows.
    """
    if not path.is_file():
        raise DataError(f"no stream predictions file {path}")
    primary, shadow = _Side(), _Side()
    for lineno, row in _rows(path):
        (shadow if _is_shadow(row) else primary).add(path, lineno, row)
    got = primary.build()
    if got is None:
        raise DataError(f"{path}: no predictions in the file")
    return got, shadow.build()


def read_predictions(path: Path, *, shadow: bool = False) -> StreamPredictions:
    """Read a stream predictions file (see the module docstring for the format).

    Args:
        path: The CSV or JSON Lines file.
        shadow: Read the shadow method's rows instead of the primary's.

    Returns:
        The rows sorted by event time (stable), duplicate event ids removed.

    Raises:
        DataError: Missing file, unknown format, a missing column, or a value that does
            not parse (the message names the file and line).
    """
    if not path.is_file():
        raise DataError(f"no stream predictions file {path}")
    side = _Side()
    for lineno, row in _rows(path):
        if _is_shadow(row) == shadow:
            side.add(path, lineno, row)
    got = side.build()
    if got is None:
        which = "shadow " if shadow else ""
        raise DataError(f"{path}: no {which}predictions in the file")
    return got


@dataclass(frozen=True)
class MethodComparison:
    """The primary and a shadow method on the interactions both scored.

    Args:
        methods: ``[primary label, shadow label]``.
        n: Interactions both scored (``n_new`` of them of new items).
        auc: Per method, the AUC over those interactions.
        auc_new: Per method, over the new items' ones (None without a phase column).
    """

    methods: tuple[str, str]
    n: int
    n_new: int
    auc: tuple[float, float]
    auc_new: tuple[float, float] | None


def compare_methods(primary: StreamPredictions, shadow: StreamPredictions) -> MethodComparison:
    """AUC of both methods on the event ids both scored.

    A shadow that started late scores fewer items: the comparison is on the same clicks.

    Raises:
        DataError: No event id in common (the file has no ``event_id`` column).
    """
    theirs = {e: i for i, e in enumerate(shadow.event_id) if e}
    mine = [i for i, e in enumerate(primary.event_id) if e in theirs]
    if not mine:
        raise DataError("no interaction scored by both methods (an event_id column is needed)")
    a = np.asarray(mine)
    b = np.asarray([theirs[primary.event_id[i]] for i in mine])
    new = primary.new_item[a]

    def auc(p: StreamPredictions, at: npt.NDArray[np.int64]) -> float:
        return roc_auc(p.label[at], p.score[at])

    return MethodComparison(
        methods=(primary.method or "primary", f"{shadow.method or 'shadow'} (shadow)"),
        n=len(mine),
        n_new=int(new.sum()),
        auc=(auc(primary, a), auc(shadow, b)),
        auc_new=(auc(primary, a[new]), auc(shadow, b[new])) if primary.has_phase else None,
    )


def prequential_curve(
    pred: StreamPredictions, *, windows: int = 20, min_window_rows: int = 50
) -> PrequentialCurve:
    """Windowed and cumulative AUC over stream time.

    Args:
        pred: The predictions, in event-time order.
        windows: Most windows; fewer when there are not ``min_window_rows`` rows for each.
        min_window_rows: Fewest rows a window holds.

    Returns:
        The curve, one point per window.
    """
    n = len(pred)
    w = max(1, min(windows, n // max(1, min_window_rows)))
    size = n // w
    ends = [size * (i + 1) for i in range(w - 1)] + [n]
    starts = [0, *ends[:-1]]
    y, s, new = pred.label, pred.score, pred.new_item
    window_auc = np.array([roc_auc(y[a:b], s[a:b]) for a, b in zip(starts, ends, strict=True)])
    cumulative = np.array([roc_auc(y[:b], s[:b]) for b in ends])
    cumulative_new = None
    auc_new = None
    if pred.has_phase and not new.all():
        cumulative_new = np.array([roc_auc(y[:b][new[:b]], s[:b][new[:b]]) for b in ends])
        auc_new = roc_auc(y[new], s[new])
    if pred.has_phase and new.all():
        auc_new = roc_auc(y, s)  # no old items: every row is a new item's
    return PrequentialCurve(
        window_end=pred.event_time[np.asarray(ends) - 1],
        window_auc=window_auc,
        cumulative_auc=cumulative,
        cumulative_auc_new=cumulative_new,
        window_rows=size,
        auc=roc_auc(y, s),
        auc_new=auc_new,
    )
