"""The phased evaluation protocol: cold, then warm-up phases A, B, C on new items.

For every phase the held-out test rows of all new items are scored with the φ in force
after that phase; AUC is pooled over all test rows, F1 thresholds at the mean score, and
the pooled AUC is split into within-item AUC (ranking one item's users, averaged over
items) and between-item AUC (ranking items by their mean score).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from emerg_stream.meta.metrics import phase_metrics
from emerg_stream.meta.rows import ItemSet, Rows, to_device
from emerg_stream.meta.warmup import Backend, WarmupConfig, warm_up
from emerg_stream.model.base import ItemModel, Phi, item_noise
from emerg_stream.phases import COLD, PHASES, WARM_PHASES

__all__ = ["PHASES", "WARM_PHASES", "NewItemData", "cold_start", "predict", "run_phases"]


@dataclass
class NewItemData:
    """New items with their warm-up rows per phase and their held-out test rows."""

    items: ItemSet
    warm: dict[str, Rows]
    test: Rows


@torch.no_grad()
def predict(
    model: ItemModel, rows: Rows, phi: Phi, *, device: torch.device, chunk: int = 65536
) -> np.ndarray:
    """Click probabilities ``[N]`` of rows under per-item φ, in chunks."""
    out = []
    for start in range(0, len(rows), chunk):
        b = rows.select(torch.arange(start, min(start + chunk, len(rows)))).to(device)
        out.append(torch.sigmoid(model(b.tokens, b.weights, phi, b.item)).cpu())
    if not out:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(out).numpy()


def cold_start(
    model: ItemModel, items: ItemSet, *, salt: int, device: torch.device, chunk: int = 1024
) -> Phi:
    """φ⁰ of items, detached (depends only on each item's id and side features).

    Items go through the hypernetwork ``chunk`` at a time: each item's φ⁰ is independent
    of the others, and bounded chunks keep the temporaries (the side-feature embeddings
    above all) in cache, which on CPU makes 100,000 items several times faster than one
    piece (see docs/BENCHMARKS.md).

    Args:
        model: The item model.
        items: New items (any row of each; only item fields are read).
        salt: Salt of the fresh ID embeddings.
        device: Where to compute.
        chunk: Items per hypernetwork call.

    Returns:
        φ⁰ with a leading item axis ``I``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    noise = item_noise(items.ids, model.noise_dim, salt=salt)
    parts: list[Phi] = []
    with torch.no_grad():
        for start in range(0, max(len(items), 1), chunk):
            end = start + chunk
            parts.append(
                model.cold_params(
                    to_device(items.tokens[start:end], device),
                    to_device(items.weights[start:end], device),
                    to_device(noise[start:end], device),
                )
            )
    if len(parts) == 1:
        return {k: v.detach().contiguous() for k, v in parts[0].items()}
    return {k: torch.cat([p[k] for p in parts]).detach() for k in parts[0]}


def run_phases(
    model: ItemModel,
    data: NewItemData,
    warm_cfg: WarmupConfig,
    *,
    salt: int,
    device: torch.device,
    backend: Backend = "auto",
) -> tuple[dict[str, dict[str, float]], dict[str, Phi]]:
    """Score the test rows after each phase.

    Args:
        model: Trained model (eval mode, on ``device``).
        data: New items, their warm rows and test rows.
        warm_cfg: The warm-up protocol.
        salt: Salt of the fresh ID embeddings (the run's seed).
        device: Where to compute.
        backend: Where warm-up gradients come from (see ``warm_up``).

    Returns:
        ``(metrics, phis)``: phase -> :func:`~emerg_stream.meta.metrics.phase_metrics`
        (pooled AUC, F1, within- and between-item AUC) and phase -> φ after that phase (CPU).
    """
    model.eval()
    phi = cold_start(model, data.items, salt=salt, device=device)
    labels = data.test.labels.numpy()
    items = data.test.item.numpy()
    metrics: dict[str, dict[str, float]] = {}
    phis: dict[str, Phi] = {}
    for phase in PHASES:
        if phase != COLD:
            phi = warm_up(model, phi, data.warm[phase].to(device), warm_cfg, backend=backend)
        scores = predict(model, data.test, phi, device=device)
        metrics[phase] = phase_metrics(labels, scores, items)
        phis[phase] = {k: v.detach().cpu() for k, v in phi.items()}
    return metrics, phis
