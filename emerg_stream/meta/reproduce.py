"""``emerg-stream reproduce``: the whole protocol for several methods and seeds."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from emerg_stream.ablations import ABLATIONS, with_structure
from emerg_stream.data import load_dataset, split_log, write_split
from emerg_stream.devices import resolve_device
from emerg_stream.errors import ConfigError
from emerg_stream.features import FeatureSpec
from emerg_stream.meta.checkpoint import save_checkpoint
from emerg_stream.meta.evaluate import run_phases
from emerg_stream.meta.metrics import PHASE_METRICS
from emerg_stream.meta.parallel import run_units
from emerg_stream.meta.pipeline import (
    EPOCH_WARMUP_GRID,
    MAX_META_EPOCHS,
    MAX_PRETRAIN_EPOCHS,
    METHODS,
    WARMUP_GRID,
    Prepared,
    Protocol,
    final_config,
    pick_reading,
    prepare,
    reading_candidates,
    select_protocol,
    selection_split,
    train_model,
)
from emerg_stream.meta.train import TrainConfig
from emerg_stream.meta.warmup import WarmupConfig
from emerg_stream.phases import PHASE_LABELS, PHASES

log = structlog.get_logger(__name__)


def selection_config(**overrides: Any) -> TrainConfig:
    """The training config whose epochs are selection's maxima (the chosen ones train)."""
    base = {"pretrain_epochs": MAX_PRETRAIN_EPOCHS, "meta_epochs": MAX_META_EPOCHS}
    return TrainConfig(**{**base, **overrides})


def summarize(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean and std over seeds of each phase's metrics.

    Returns:
        phase -> ``{"<metric>_mean", "<metric>_std"}`` for every metric of
        :data:`~emerg_stream.meta.metrics.PHASE_METRICS` that every seed has (``auc``,
        ``auc_within``, ``auc_between``, ``f1``).
    """
    out: dict[str, dict[str, float]] = {}
    for phase in PHASES:
        out[phase] = {}
        for metric in PHASE_METRICS:
            if not all(metric in m[phase] for m in per_seed.values()):
                continue
            values = np.array([m[phase][metric] for m in per_seed.values()])
            out[phase][f"{metric}_mean"] = float(values.mean())
            out[phase][f"{metric}_std"] = float(values.std())
    return out


def _cell(summary: dict[str, float], metric: str) -> str:
    if f"{metric}_mean" not in summary:
        return "–"
    return f"{100 * summary[f'{metric}_mean']:.2f} ± {100 * summary[f'{metric}_std']:.2f}"


def _wide_table(results: dict[str, Any], metrics: Sequence[str]) -> str:
    """One row per method, one column per (metric, phase)."""
    head = "| method | " + " | ".join(
        f"{PHASE_METRICS[m]} {PHASE_LABELS[p]}" for m in metrics for p in PHASES
    )
    lines = [head + " |", "|---" * (1 + len(metrics) * len(PHASES)) + "|"]
    for method, res in results["methods"].items():
        s = res["summary"]
        cells = " | ".join(_cell(s[p], m) for m in metrics for p in PHASES)
        lines.append(f"| {method} | {cells} |")
    return "\n".join(lines) + "\n"


def markdown_table(results: dict[str, Any]) -> str:
    """Every method's per-phase metrics (mean ± std over seeds, in %), two tables.

    The first holds pooled AUC and F1 (the paper's table), the second the within-item
    and between-item AUC (see :mod:`emerg_stream.meta.metrics`); ``–`` marks a metric
    the results lack (a run written before it existed).
    """
    first = _wide_table(results, ("auc", "f1"))
    second = _wide_table(results, [m for m in PHASE_METRICS if m not in ("auc", "f1")])
    return first + "\n" + second


def save_phis(path: Path, ids: list[str], phis: dict[str, dict[str, torch.Tensor]]) -> None:
    """Store each phase's φ of every new item (for ``explain`` and the report)."""
    arrays: dict[str, np.ndarray] = {"item_ids": np.array(ids)}
    for phase, phi in phis.items():
        for name, value in phi.items():
            arrays[f"{phase}.{name}"] = value.numpy()
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Inputs:
    """What every unit of a run reads (pickled once per worker process)."""

    dataset: str
    out: Path
    spec: FeatureSpec
    val_spec: FeatureSpec
    val: Prepared
    data: Prepared
    device: torch.device
    n: int
    k: int
    progress: bool
    warmup_grid: tuple[WarmupConfig, ...]
    epoch_grid: tuple[WarmupConfig, ...] | None


@dataclass(frozen=True)
class _Selection:
    """One selection: a method with one structure's overrides."""

    method: str
    cfg: TrainConfig
    overrides: dict[str, Any]


@dataclass(frozen=True)
class _FinalRun:
    """One final run: a method, its chosen protocol and overrides, one seed."""

    method: str
    cfg: TrainConfig
    protocol: Protocol
    overrides: dict[str, Any]
    seed: int


def _select(inp: _Inputs, unit: _Selection) -> tuple[Protocol, float]:
    t0 = time.perf_counter()
    protocol = select_protocol(
        unit.method,
        inp.val_spec,
        inp.val,
        unit.cfg,
        device=inp.device,
        progress=inp.progress,
        model_overrides=unit.overrides,
        grid=inp.warmup_grid,
        epoch_grid=inp.epoch_grid,
    )
    return protocol, time.perf_counter() - t0


def _final_run(inp: _Inputs, unit: _FinalRun) -> tuple[dict[str, dict[str, float]], float]:
    """Train with the chosen protocol, evaluate the phases, save the checkpoint."""
    t0 = time.perf_counter()
    method, seed, protocol = unit.method, unit.seed, unit.protocol
    fcfg = final_config(unit.cfg, protocol, seed)
    model = train_model(
        method,
        inp.spec,
        inp.data,
        fcfg,
        device=inp.device,
        progress=inp.progress,
        model_overrides=unit.overrides,
    )
    metrics, phis = run_phases(model, inp.data.new, protocol.warmup, salt=seed, device=inp.device)
    log.info(
        "seed_evaluated",
        method=method,
        seed=seed,
        auc={p: round(100 * m["auc"], 2) for p, m in metrics.items()},
    )
    save_checkpoint(
        inp.out / "checkpoints" / f"{method}-seed{seed}",
        model,
        inp.spec.to_dict(),
        {
            "method": method,
            "dataset": inp.dataset,
            "seed": seed,
            "noise_salt": seed,
            "warmup": asdict(protocol.warmup),
            "train_config": asdict(fcfg),
            "split": {"n": inp.n, "k": inp.k},
            "old_item_ids": list(inp.data.old_items.ids),
        },
    )
    if seed == 0:
        save_phis(inp.out / f"phis-{method}.npz", inp.data.new.items.ids, phis)
    return metrics, time.perf_counter() - t0


def reproduce(
    dataset: str,
    out: Path,
    *,
    methods: tuple[str, ...] = METHODS,
    seeds: int = 3,
    data_dir: str | None = None,
    device: str = "auto",
    cfg: TrainConfig | None = None,
    progress: bool = True,
    ablation: str = "none",
    warmup_grid: Sequence[WarmupConfig] = WARMUP_GRID,
    epoch_grid: Sequence[WarmupConfig] | None = EPOCH_WARMUP_GRID,
    processes: int = 1,
    threads_each: int = 1,
    structure: str | None = None,
) -> dict[str, Any]:
    """Run split, selection, training and phased evaluation; write results to ``out``.

    Args:
        dataset: Preset name or dataset YAML.
        out: Run directory.
        methods: Methods to run.
        seeds: Seeds 0..seeds-1 of the final runs (selection uses seed 0).
        data_dir: Dataset folder (default: ``EMERG_DATA_DIR``).
        device: ``auto``, ``cpu`` or ``cuda``.
        cfg: Training hyperparameters (epochs are maxima for selection; default
            :func:`selection_config`).
        progress: Show progress bars.
        ablation: One of :data:`ABLATIONS`, applied to EmerG only.
        warmup_grid: Warm-up protocols that model selection tries.
        epoch_grid: Warm-up protocols scored after every epoch to choose the epochs
            (``None``: ``warmup_grid``).
        processes: Run the units (every selection, then every final run) on this many
            worker processes (:mod:`emerg_stream.meta.parallel`); 1 runs them here.
        threads_each: Compute threads of each worker process.
        structure: Fix EmerG's structure (a name of :data:`~emerg_stream.ablations.STRUCTURES`)
            instead of selecting it; combines with ``ablation``.

    Returns:
        The content of ``out/results.json``.
    """
    try:
        model_ov = with_structure(ablation, structure)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    t_start = time.perf_counter()
    dev = resolve_device(device)
    cfg = cfg or selection_config()
    train_ov = ABLATIONS[ablation][1]
    out.mkdir(parents=True, exist_ok=True)
    ilog = load_dataset(dataset, data_dir)
    split = split_log(ilog)
    manifest = write_split(split, out / "split")
    spec = FeatureSpec.fit(split.schema, split.old)
    (out / "feature_spec.json").write_text(json.dumps(spec.to_dict()) + "\n")
    # Selection sees neither the new items nor the pseudo-new items' ids: its own spec is
    # fitted on the remaining old items (pseudo-new items: meta.pipeline.selection_split).
    val_split = selection_split(split)
    val_spec = FeatureSpec.fit(val_split.schema, val_split.old)
    val: Prepared = prepare(val_split, val_spec)
    data: Prepared = prepare(split, spec)
    log.info(
        "data_prepared",
        dataset=ilog.name,
        old_rows=len(data.old_rows),
        new_items=len(data.new.items),
        test_rows=len(data.new.test),
        val_items=len(val.new.items),
    )
    results: dict[str, Any] = {
        "dataset": ilog.name,
        "command": " ".join(sys.argv),
        "device": str(dev),
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads() if processes <= 1 else threads_each,
            "processes": processes,
        },
        "train_config": asdict(cfg),
        "ablation": ablation,
        "structure": structure,
        "split": {k: manifest[k] for k in ("row_counts", "item_counts") if k in manifest},
        "methods": {},
    }
    inp = _Inputs(
        dataset=ilog.name,
        out=out,
        spec=spec,
        val_spec=val_spec,
        val=val,
        data=data,
        device=dev,
        n=split.n,
        k=split.k,
        progress=progress,
        warmup_grid=tuple(warmup_grid),
        epoch_grid=None if epoch_grid is None else tuple(epoch_grid),
    )

    def stage(fn: Any, units: Sequence[Any], label: str) -> list[Any]:
        """Run one stage's units.

        Their own progress bars show where they run in this process; in workers a bar of
        units done replaces them.
        """
        here = min(processes, len(units)) <= 1
        return run_units(
            fn,
            replace(inp, progress=progress and here),
            units,
            processes=processes,
            threads=threads_each,
            progress=label if progress and not here else None,
        )

    # 1. selection: every method, every structure EmerG chooses from
    cfgs = {m: replace(cfg, **train_ov) if m == "emerg" else cfg for m in methods}
    selections = [
        _Selection(m, cfgs[m], ov)
        for m in methods
        for ov in reading_candidates(m, model_ov if m == "emerg" else {})
    ]
    # the pool hands units out in order: the slowest (EmerG's joint attention) first
    selections.sort(key=lambda u: (u.method != "emerg", u.overrides.get("attention") != "joint"))
    candidates: dict[str, list[tuple[Protocol, dict[str, Any]]]] = {m: [] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    selected = stage(_select, selections, "selection")
    for unit, (protocol, took) in zip(selections, selected, strict=True):
        candidates[unit.method].append((protocol, unit.overrides))
        seconds[unit.method] += took
    chosen = {m: pick_reading(m, candidates[m]) for m in methods}
    # 2. the final runs: every method, every seed
    finals = [
        _FinalRun(m, cfgs[m], chosen[m][0], chosen[m][1], seed)
        for m in methods
        for seed in range(seeds)
    ]
    per_seed: dict[str, dict[int, dict[str, dict[str, float]]]] = {m: {} for m in methods}
    evaluated = stage(_final_run, finals, "final runs")
    for run, (metrics, took) in zip(finals, evaluated, strict=True):
        per_seed[run.method][run.seed] = metrics
        seconds[run.method] += took
    for m in methods:
        protocol, m_ov = chosen[m]
        results["methods"][m] = {
            "protocol": protocol.to_dict(),
            "model_overrides": m_ov,
            "seeds": {str(s): v for s, v in per_seed[m].items()},
            "summary": summarize(per_seed[m]),
            # the method's units' own time (wall time when they run one after another)
            "wall_time_s": round(seconds[m], 1),
        }
    results["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(results))
    return results
