"""Phased warm-up of new items: gradient steps on φ only, batched over items.

One call updates every item of a batch at once: φ is stacked over items, each item's
loss is the mean over its own support rows, and one backward pass per step yields all
items' gradients. :func:`warm_up_reference` loops over items one by one; it exists so
tests can prove the batched path equal to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from emerg_stream.meta.losses import per_item_mean_loss
from emerg_stream.meta.rows import Rows
from emerg_stream.model.base import ItemModel, Phi


@dataclass(frozen=True)
class WarmupConfig:
    """How a warm-up phase updates φ.

    Args:
        steps: Full-batch gradient steps per phase over the item's support rows.
        lr: Step size.
        optimizer: ``sgd`` or ``adam`` (per-entry state, so batching changes nothing).
        betas: Adam's betas.
        eps: Adam's epsilon.
        lr_scale: Per-entry multipliers of ``lr`` by φ name, e.g. ``{"adj": 0.0}`` keeps
            the graph fixed (an ablation) and ``{"adj": 10.0}`` speeds its adaptation.
    """

    steps: int = 5
    lr: float = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_scale: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr < 0:
            raise ValueError("warm-up steps and lr must be non-negative")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown warm-up optimizer {self.optimizer!r}")


class _Stepper:
    """Elementwise SGD/Adam over a dict of tensors (state has the same item axis)."""

    def __init__(self, phi: Phi, cfg: WarmupConfig) -> None:
        self.cfg = cfg
        self.t = 0
        self.m = {k: torch.zeros_like(v) for k, v in phi.items()}
        self.v = {k: torch.zeros_like(v) for k, v in phi.items()}

    def step(self, phi: Phi, grads: dict[str, Tensor]) -> Phi:
        cfg = self.cfg
        scale = dict(cfg.lr_scale)
        if cfg.optimizer == "sgd":
            return {k: phi[k] - cfg.lr * scale.get(k, 1.0) * grads[k] for k in phi}
        self.t += 1
        b1, b2 = cfg.betas
        out: Phi = {}
        for k in phi:
            g = grads[k]
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1**self.t)
            v_hat = self.v[k] / (1 - b2**self.t)
            out[k] = phi[k] - cfg.lr * scale.get(k, 1.0) * m_hat / (v_hat.sqrt() + cfg.eps)
        return out


#: Items per chunk of :func:`warm_up` on CPU: the per-row temporaries of a chunk stay in
#: cache and memory stays bounded (about 0.4 MB per item of K=20 rows); 256 was the
#: fastest of 64/256/1,000/all on the ML-1M shape (docs/BENCHMARKS.md).
CPU_CHUNK_ITEMS = 256


def warm_up(
    model: ItemModel, phi: Phi, rows: Rows, cfg: WarmupConfig, *, chunk: int | None = None
) -> Phi:
    """One warm-up phase for every item of ``phi`` at once.

    Only φ changes; the model's shared parameters are read, never written. Items with
    no row in ``rows`` keep their φ unchanged. Items are independent, so they are
    processed ``chunk`` items at a time, each chunk one batched computation.

    Args:
        model: The item model (its mode is left as it is; it has no dropout).
        phi: ``[I, ...]`` current item parameters.
        rows: Support rows, ``rows.item`` indexing into ``phi``.
        cfg: Steps, lr, optimiser.
        chunk: Items per batched computation; ``None`` = :data:`CPU_CHUNK_ITEMS` on CPU,
            all items at once on an accelerator.

    Returns:
        The updated φ, detached.
    """
    n_items = next(iter(phi.values())).shape[0]
    cur = {k: v.detach() for k, v in phi.items()}
    if len(rows) == 0 or cfg.steps == 0:
        return cur
    if chunk is None:
        chunk = CPU_CHUNK_ITEMS if rows.item.device.type == "cpu" else max(n_items, 1)
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if n_items <= chunk:
        return _warm_up_batch(model, cur, rows, cfg)
    order = torch.argsort(rows.item, stable=True)  # keeps each item's rows in order
    edges = torch.arange(0, n_items + chunk, chunk, device=rows.item.device).clamp_max(n_items)
    bounds = torch.searchsorted(rows.item[order], edges).tolist()
    parts: list[Phi] = []
    for j, start in enumerate(range(0, n_items, chunk)):
        part = {k: v[start : start + chunk] for k, v in cur.items()}
        idx = order[bounds[j] : bounds[j + 1]]
        if len(idx) > 0:
            sel = rows.select(idx)
            own = Rows(sel.tokens, sel.weights, sel.labels, sel.item - start)
            part = _warm_up_batch(model, part, own, cfg)
        parts.append(part)
    return {k: torch.cat([p[k] for p in parts]) for k in cur}


def _warm_up_batch(model: ItemModel, cur: Phi, rows: Rows, cfg: WarmupConfig) -> Phi:
    """All items of ``cur`` in one batched computation per step."""
    n_items = next(iter(cur.values())).shape[0]
    stepper = _Stepper(cur, cfg)
    names = list(cur)
    for _ in range(cfg.steps):
        leaves = {k: cur[k].clone().requires_grad_(True) for k in names}
        with torch.enable_grad():
            loss = per_item_mean_loss(model, rows, leaves, n_items).sum()
            grads = torch.autograd.grad(loss, [leaves[k] for k in names])
        cur = stepper.step(cur, dict(zip(names, grads, strict=True)))
    return cur


def warm_up_reference(model: ItemModel, phi: Phi, rows: Rows, cfg: WarmupConfig) -> Phi:
    """The per-item slow path: the same update, one item at a time (tests only)."""
    n_items = next(iter(phi.values())).shape[0]
    parts: list[Phi] = []
    for i in range(n_items):
        mask = rows.item == i
        own = rows.select(mask.nonzero().squeeze(1))
        own = Rows(own.tokens, own.weights, own.labels, torch.zeros_like(own.item))
        one = {k: v[i : i + 1] for k, v in phi.items()}
        parts.append(warm_up(model, one, own, cfg))
    return {k: torch.cat([p[k] for p in parts]) for k in phi}
