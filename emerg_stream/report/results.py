"""A reproduce run's inputs to the report: its results file and the items worth drawing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from emerg_stream.errors import ConfigError
from emerg_stream.report.plots import PHASES

__all__ = ["load_results", "pick_items"]


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
