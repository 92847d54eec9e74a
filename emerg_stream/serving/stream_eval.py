"""Stream evaluation: the offline per-phase table, computed from what the stream published.

The worker publishes, per item, versioned params tagged with their phase (``cold``,
``warm_a``, ``warm_b``, ``warm_c``, then ``common``). This module reads the whole
item-params topic (every partition, from the beginning to its end: bounded), keeps for
each item the highest version of each phase, and scores every new item's held-out test
rows (the rows the replay left out) with the params in force after each phase:

* after ``cold``: the item's last ``cold`` params;
* after ``warm_a`` / ``warm_b`` / ``warm_c``: the last params of that phase, or, if the
  item never reached it, of its latest earlier phase.

AUC (pooled over all test rows), within-item and between-item AUC and F1 (threshold at
the mean score) per phase then form the same tables as the offline ``reproduce``; with
the same checkpoint and seed, the two agree up to float noise when the worker applied
the offline warm-up protocol.
Params of another model version are refused (:class:`~emerg_stream.errors.ModelError`).

It also reads the predictions topic: the *prequential* AUC, each interaction scored
with the params in force before it was applied (de-duplicated by event id). When a
shadow method ran beside the primary (records marked ``shadow``), the prequential AUC
per phase is also given per method, on the clicks both scored
(:func:`prequential_by_method`, :func:`prequential_table`): the shadow publishes no
params, so the held-out tables above are the primary's only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import structlog
import torch

from emerg_stream.data.log import InteractionLog
from emerg_stream.data.split import Split, split_log
from emerg_stream.errors import DataError, SchemaError
from emerg_stream.features import FeatureSpec, encode
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import ItemParams, Prediction
from emerg_stream.meta.checkpoint import Checkpoint
from emerg_stream.meta.evaluate import NewItemData, cold_start, predict, run_phases
from emerg_stream.meta.metrics import PHASE_METRICS, phase_metrics, roc_auc
from emerg_stream.meta.reproduce import markdown_table, summarize
from emerg_stream.meta.rows import ItemSet, Rows, item_set_from, rows_for
from emerg_stream.meta.warmup import Backend
from emerg_stream.model.base import Phi
from emerg_stream.phases import COMMON, OLD, PHASES, WARM_PHASES
from emerg_stream.serving.ranker import check_params, params_to_phi
from emerg_stream.stream.reader import read_to_end

__all__ = [
    "PublishedParams",
    "StreamEvaluation",
    "collect_params",
    "comparison_table",
    "evaluate_stream",
    "offline_phases",
    "prequential_by_method",
    "prequential_metrics",
    "prequential_table",
]

log = structlog.get_logger(__name__)

Metrics = dict[str, dict[str, float]]


@dataclass
class PublishedParams:
    """What the item-params topic holds, per item and phase.

    Args:
        last: item id -> phase -> the record of the highest version of that phase.
        records: Records read (tombstones included).
        tombstones: Null values (deleted items).
        undecodable: Values that failed to decode (skipped).
    """

    last: dict[str, dict[str, ItemParams]] = field(default_factory=dict)
    records: int = 0
    tombstones: int = 0
    undecodable: int = 0


def collect_params(
    consumer_conf: Mapping[str, str],
    topic: str,
    checkpoint: Checkpoint,
    *,
    timeout_s: float = 120.0,
) -> PublishedParams:
    """Read the item-params topic to its end, keeping the last version of each phase.

    A compacted topic may already have dropped an item's earlier versions; a phase whose
    params are gone counts as not reached (the fallback of :func:`phase_phis` applies).

    Args:
        consumer_conf: librdkafka settings.
        topic: The item-params topic.
        checkpoint: Params must belong to its model version.
        timeout_s: Deadline of the read.

    Returns:
        The params by item and phase.

    Raises:
        ModelError: A record of another model version (naming both) or of a bad shape.
        TransientError: The end of the topic was not reached in time.
    """
    serde = AvroSerde(ItemParams, topic=topic)
    out = PublishedParams()
    for msg in read_to_end(consumer_conf, topic, timeout_s=timeout_s):
        out.records += 1
        value = msg.value()
        if value is None:
            out.tombstones += 1
            continue
        try:
            rec = serde.decode(value)
        except SchemaError as exc:
            out.undecodable += 1
            log.warning("item_params_undecodable", offset=msg.offset(), error=str(exc))
            continue
        check_params(rec, checkpoint)
        phases = out.last.setdefault(rec["item_id"], {})
        held = phases.get(rec["phase"])
        if held is None or rec["version"] > held["version"]:
            phases[rec["phase"]] = rec
    log.info(
        "item_params_read",
        topic=topic,
        records=out.records,
        items=len(out.last),
        tombstones=out.tombstones,
        undecodable=out.undecodable,
    )
    return out


def phase_phis(
    published: PublishedParams,
    items: ItemSet,
    checkpoint: Checkpoint,
    fallback: Phi | None = None,
) -> tuple[dict[str, Phi], dict[str, dict[str, int]], list[str]]:
    """φ of every item after each phase, from the published params.

    Args:
        published: From :func:`collect_params`.
        items: The new items, ``[I]``.
        checkpoint: The model.
        fallback: ``[I, ...]`` φ for items with no params at all (e.g. locally computed
            cold-start params); ``None`` leaves them out of the result (``missing``).

    Returns:
        ``(phis, coverage, missing)``: phase -> φ ``[I, ...]``; phase -> {"published":
        items with params of that phase, "earlier": items using an earlier phase's,
        "fallback": items using ``fallback``}; ids of the items with no params at all.
    """
    missing = [i for i in items.ids if not published.last.get(i)]
    phis: dict[str, Phi] = {}
    coverage: dict[str, dict[str, int]] = {}
    for q, phase in enumerate(PHASES):
        chosen: list[ItemParams | None] = []
        cov = {"published": 0, "earlier": 0, "fallback": 0}
        for item in items.ids:
            by_phase = published.last.get(item, {})
            rec = next((by_phase[p] for p in reversed(PHASES[: q + 1]) if p in by_phase), None)
            if rec is None:
                cov["fallback"] += 1
            elif rec["phase"] == phase:
                cov["published"] += 1
            else:
                cov["earlier"] += 1
            chosen.append(rec)
        coverage[phase] = cov
        present = [r for r in chosen if r is not None]
        stacked = params_to_phi(present, checkpoint) if present else None
        if fallback is None:
            if stacked is not None and len(present) == len(chosen):
                phis[phase] = stacked
            continue
        phi = {k: v.detach().clone().cpu() for k, v in fallback.items()}
        rows = [j for j, r in enumerate(chosen) if r is not None]
        if stacked is not None:
            for k in phi:
                phi[k][rows] = stacked[k]
        phis[phase] = phi
    return phis, coverage, missing


@dataclass
class _NewItems:
    items: ItemSet
    test: Rows
    warm: dict[str, Rows]


def _new_items(split: Split, spec: FeatureSpec) -> _NewItems:
    enc_a = encode(spec, split.warm_a)
    items, _ = item_set_from(enc_a)
    warm = {WARM_PHASES[0]: rows_for(enc_a, items)}
    for phase in WARM_PHASES[1:]:
        warm[phase] = rows_for(encode(spec, split.part(phase)), items)
    return _NewItems(items, rows_for(encode(spec, split.test), items), warm)


def offline_phases(
    checkpoint: Checkpoint,
    split: Split,
    *,
    device: torch.device | str = "cpu",
    backend: Backend = "auto",
) -> Metrics:
    """The offline protocol (``run_phases``) with the checkpoint's warm-up and salt.

    ``backend``: where warm-up gradients come from; the worker's own
    (``EMERG_WARMUP_BACKEND``) for an exact comparison.
    """
    spec = FeatureSpec.from_dict(checkpoint.feature_spec)
    new = _new_items(split, spec)
    metrics, _ = run_phases(
        checkpoint.model,
        NewItemData(new.items, new.warm, new.test),
        checkpoint.meta.warmup,
        salt=checkpoint.meta.noise_salt,
        device=torch.device(device),
        backend=backend,
    )
    return metrics


_Scored = dict[str, tuple[int, float, str]]  # event id -> (label, score, phase)


def _method_label(rec: Prediction) -> str:
    """``emerg``, ``deepfm (shadow)`` ...: a method's column (``primary``: a version 1 record)."""
    method = rec["method"] or "primary"
    return f"{method} (shadow)" if rec["shadow"] else method


def _read_predictions(
    consumer_conf: Mapping[str, str], topic: str, timeout_s: float
) -> tuple[str, dict[str, _Scored]]:
    """The primary's label and, per method label, the first score of each event id."""
    serde = AvroSerde(Prediction, topic=topic)
    by_label: dict[str, _Scored] = {}
    primary = ""
    duplicates = n = 0
    for msg in read_to_end(consumer_conf, topic, timeout_s=timeout_s):
        value = msg.value()
        if value is None:
            continue
        try:
            rec = serde.decode(value)
        except SchemaError:
            continue
        label = _method_label(rec)
        if not rec["shadow"]:
            primary = label
        seen = by_label.setdefault(label, {})
        if rec["event_id"] in seen:
            duplicates += 1
            continue
        n += 1
        seen[rec["event_id"]] = (rec["label"], rec["score"], rec["phase"])
    log.info("predictions_read", topic=topic, predictions=n, duplicates=duplicates)
    return primary, by_label


def _groups(scored: _Scored, events: list[str] | None = None) -> dict[str, dict[str, float]]:
    """``{"all" | "new" | <phase>: {"auc", "n"}}`` over ``events`` (default: all)."""
    rows = [scored[e] for e in (scored if events is None else events)]
    y = np.asarray([r[0] for r in rows])
    s = np.asarray([r[1] for r in rows], dtype=np.float64)
    ph = np.asarray([r[2] for r in rows], dtype=object)
    groups = {"all": np.ones(len(y), dtype=bool), "new": ph != "old"}
    for phase in dict.fromkeys(r[2] for r in rows):
        groups[str(phase)] = ph == phase
    return {
        name: {"auc": roc_auc(y[m], s[m]) if m.any() else float("nan"), "n": float(m.sum())}
        for name, m in groups.items()
    }


def prequential_metrics(
    consumer_conf: Mapping[str, str], topic: str, *, timeout_s: float = 120.0
) -> dict[str, dict[str, float]]:
    """Prequential AUC of the primary from the predictions topic.

    One score per event id, the first; a shadow method's records are left out (they
    are in :func:`prequential_by_method`).

    Returns:
        ``{"all" | "new" | <phase>: {"auc": ..., "n": ...}}``; ``new`` leaves out
        interactions of old items (phase ``old``); AUC is NaN with one class only.
    """
    primary, by_label = _read_predictions(consumer_conf, topic, timeout_s)
    return _groups(by_label.get(primary, {}))


def prequential_by_method(
    consumer_conf: Mapping[str, str], topic: str, *, timeout_s: float = 120.0
) -> dict[str, dict[str, dict[str, float]]]:
    """Prequential AUC per method (the primary and a shadow) on the clicks all scored.

    A shadow does not score items announced before it started (nor, after a restart
    with another shadow checkpoint, items restored without its φ), so the methods are
    compared on the event ids every method has a score for, by the primary's phase of
    each (the shadow's phase is the same: same thresholds).

    Returns:
        method label (``emerg``, ``deepfm (shadow)`` ...) -> the groups of
        :func:`prequential_metrics`; the primary first. Empty without predictions.
    """
    return _by_method(*_read_predictions(consumer_conf, topic, timeout_s))


def _by_method(
    primary: str, by_label: dict[str, _Scored]
) -> dict[str, dict[str, dict[str, float]]]:
    if not by_label:
        return {}
    order = sorted(by_label, key=lambda label: label != primary)
    common = set(by_label[order[0]])
    for label in order[1:]:
        common &= set(by_label[label])
    events = [e for e in by_label[order[0]] if e in common]
    return {label: _groups(by_label[label], events) for label in order}


def prequential_table(table: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The per-phase prequential AUC per method (:func:`prequential_by_method`), markdown.

    Rows: methods; columns: all, new items, then the phases in stream order; each cell
    the AUC in points (n under the header: the same clicks in every row).
    """
    if not table:
        return ""
    first = next(iter(table.values()))
    order = ["all", "new", *(p for p in (OLD, *PHASES, COMMON) if p in first)]
    cols = [c for c in order if c in first]
    head = "| method | " + " | ".join(f"{c} (n={int(first[c]['n'])})" for c in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for label, groups in table.items():
        cells = []
        for c in cols:
            auc = groups.get(c, {}).get("auc", float("nan"))
            cells.append("n/a" if np.isnan(auc) else f"{100 * auc:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class StreamEvaluation:
    """The result of :func:`evaluate_stream`.

    Args:
        stream: phase -> {"auc", "auc_within", "auc_between", "f1"} from the published
            params (:func:`~emerg_stream.meta.metrics.phase_metrics`).
        coverage: phase -> how many items used that phase's own params, an earlier
            phase's, or the local fallback.
        missing_items: New items without any published params.
        n_items: New items evaluated.
        n_test_rows: Held-out test rows scored.
        model_version: Of the checkpoint (and of every params record read).
        params_records: Records read from the item-params topic.
        offline: phase -> the same metrics from the offline protocol (when asked).
        prequential: From the predictions topic (when asked): the primary's.
        prequential_methods: With a shadow method's predictions in the topic: per method
            (:func:`prequential_by_method`, on the clicks both scored).
    """

    stream: Metrics
    coverage: dict[str, dict[str, int]]
    missing_items: list[str]
    n_items: int
    n_test_rows: int
    model_version: str
    params_records: int
    offline: Metrics | None = None
    prequential: dict[str, dict[str, float]] | None = None
    prequential_methods: dict[str, dict[str, dict[str, float]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def evaluate_stream(
    checkpoint: Checkpoint,
    ilog: InteractionLog,
    consumer_conf: Mapping[str, str],
    params_topic: str,
    *,
    predictions_topic: str | None = None,
    offline: bool = False,
    allow_missing: bool = False,
    timeout_s: float = 120.0,
    device: torch.device | str = "cpu",
    warmup_backend: Backend = "auto",
) -> StreamEvaluation:
    """Score the held-out test rows with the params the stream published (module docstring).

    Args:
        checkpoint: The checkpoint the worker ran with.
        ilog: The dataset's log (split with the checkpoint's N and K).
        consumer_conf: librdkafka settings.
        params_topic: The item-params topic.
        predictions_topic: Also compute the prequential AUC from it.
        offline: Also run the offline protocol with the same checkpoint, for comparison.
        allow_missing: Score items without any published params with their locally
            computed cold-start params instead of failing.
        timeout_s: Deadline of each topic read.
        device: Torch device.
        warmup_backend: The offline protocol's warm-up backend (the worker's, for an
            exact comparison).

    Returns:
        The evaluation.

    Raises:
        DataError: New items without published params (unless ``allow_missing``).
        ModelError: Params of another model version.
    """
    dev = torch.device(device)
    meta = checkpoint.meta
    split = split_log(ilog, meta.n, meta.k)
    if meta.dataset not in (None, ilog.name):
        log.warning("dataset_differs", checkpoint=meta.dataset, dataset=ilog.name)
    spec = FeatureSpec.from_dict(checkpoint.feature_spec)
    new = _new_items(split, spec)
    published = collect_params(consumer_conf, params_topic, checkpoint, timeout_s=timeout_s)
    salt = meta.noise_salt
    fallback = cold_start(checkpoint.model, new.items, salt=salt, device=dev)
    fallback = {k: v.cpu() for k, v in fallback.items()}
    phis, coverage, missing = phase_phis(published, new.items, checkpoint, fallback)
    if missing and not allow_missing:
        raise DataError(
            f"{len(missing)} of {len(new.items)} new items have no params in {params_topic} "
            f"(first: {missing[:5]}): the worker has not processed the whole replay yet (is it "
            "running, did the replay finish, is the lag 0?); pass allow_missing to score them "
            "with local cold-start params"
        )
    labels, rows_item = new.test.labels.numpy(), new.test.item.numpy()
    stream = {
        phase: phase_metrics(
            labels, predict(checkpoint.model, new.test, phis[phase], device=dev), rows_item
        )
        for phase in PHASES
    }
    result = StreamEvaluation(
        stream=stream,
        coverage=coverage,
        missing_items=missing,
        n_items=len(new.items),
        n_test_rows=len(new.test),
        model_version=checkpoint.model_version,
        params_records=published.records,
    )
    if offline:
        result.offline = offline_phases(checkpoint, split, device=dev, backend=warmup_backend)
    if predictions_topic is not None:
        primary, by_label = _read_predictions(consumer_conf, predictions_topic, timeout_s)
        result.prequential = _groups(by_label.get(primary, {}))
        if len(by_label) > 1:  # a shadow method ran beside the primary
            result.prequential_methods = _by_method(primary, by_label)
    return result


def comparison_table(ev: StreamEvaluation) -> str:
    """The per-phase tables (``reproduce``'s format) of the stream and offline runs.

    Pooled AUC and F1, then within- and between-item AUC
    (:data:`~emerg_stream.meta.metrics.PHASE_METRICS`), and with the offline run the
    differences of pooled and within-item AUC.
    """
    methods: dict[str, Any] = {"stream": {"summary": summarize({0: ev.stream})}}
    if ev.offline is not None:
        methods["offline"] = {"summary": summarize({0: ev.offline})}
    text = markdown_table({"methods": methods})
    if ev.offline is not None:
        text += "\n"
        for metric in ("auc", "auc_within"):
            diffs = ", ".join(
                f"{p} {100 * (ev.stream[p][metric] - ev.offline[p][metric]):+.3f}" for p in PHASES
            )
            text += f"{PHASE_METRICS[metric]} stream - offline (points): {diffs}\n"
    return text
