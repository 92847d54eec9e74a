"""Phased warm-up of new items: gradient steps on φ only, batched over items.

One call updates every item of a batch at once: φ is stacked over items, each item's
loss is the mean over its own support rows, and one backward pass per step yields all
items' gradients. :func:`warm_up_reference` loops over items one by one; it exists so
tests can prove the batched path equal to it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from emerg_stream.meta.losses import per_item_mean_loss
from emerg_stream.meta.rows import Rows
from emerg_stream.model.base import ItemModel, Phi, Prepared


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
#: cache and memory stays bounded (about 0.3 MB per item of K=20 rows); 64 was the
#: fastest of 16/32/64/128/256/512 on the ML-1M shape, eager and compiled alike
#: (1.2-1.3x over 256; docs/BENCHMARKS.md).
CPU_CHUNK_ITEMS = 64


#: The loss of one warm-up step: (model, prepared rows, rows, φ leaves, I) -> scalar.
StepLoss = Callable[[ItemModel, Prepared, Rows, Phi, int], Tensor]


def _step_loss(model: ItemModel, prepared: Prepared, rows: Rows, phi: Phi, n_items: int) -> Tensor:
    """Sum over items of each item's mean support loss (its gradient is per item)."""
    return per_item_mean_loss(model, rows, phi, n_items, prepared).sum()


_COMPILED: weakref.WeakKeyDictionary[ItemModel, StepLoss] = weakref.WeakKeyDictionary()


def _compiled_step_loss(model: ItemModel) -> StepLoss:
    """:func:`_step_loss` through ``torch.compile`` (inductor), one per model.

    Shapes are dynamic (rows and items vary per call), so one compilation serves every
    chunk; it costs about a minute on a 2-core CPU the first time in a process
    (inductor's on-disk cache shortens later ones).
    """
    fn = _COMPILED.get(model)
    if fn is None:
        fn = torch.compile(_step_loss, dynamic=True)
        _COMPILED[model] = fn
    return fn


@contextmanager
def _frozen(model: ItemModel) -> Iterator[None]:
    """Shared parameters without ``requires_grad`` while warm-up runs.

    Warm-up differentiates with respect to φ only; a compiled backward would otherwise
    also compute the shared parameters' gradients, which nobody reads.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def warm_up(
    model: ItemModel,
    phi: Phi,
    rows: Rows,
    cfg: WarmupConfig,
    *,
    chunk: int | None = None,
    compiled: bool = False,
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
        compiled: Run each step's forward and backward through ``torch.compile`` (the
            same function; about 2x faster on CPU, after a one-off compilation of about
            a minute per process). Meant for long-running workers; it freezes the shared
            parameters' ``requires_grad`` during the call, so do not train the model
            concurrently.

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
    if not compiled:
        return _warm_up_chunks(model, cur, rows, cfg, chunk, _step_loss)
    with _frozen(model):
        return _warm_up_chunks(model, cur, rows, cfg, chunk, _compiled_step_loss(model))


def _warm_up_chunks(
    model: ItemModel, cur: Phi, rows: Rows, cfg: WarmupConfig, chunk: int, loss: StepLoss
) -> Phi:
    """:func:`warm_up` over items ``chunk`` at a time."""
    n_items = next(iter(cur.values())).shape[0]
    if n_items <= chunk:
        return _warm_up_batch(model, cur, rows, cfg, loss)
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
            part = _warm_up_batch(model, part, own, cfg, loss)
        parts.append(part)
    return {k: torch.cat([p[k] for p in parts]) for k in cur}


def _warm_up_batch(
    model: ItemModel, cur: Phi, rows: Rows, cfg: WarmupConfig, loss_fn: StepLoss
) -> Phi:
    """All items of ``cur`` in one batched computation per step."""
    n_items = next(iter(cur.values())).shape[0]
    stepper = _Stepper(cur, cfg)
    names = list(cur)
    with torch.no_grad():  # the rows' φ-independent part, once for all steps
        prepared = model.prepare(rows.tokens, rows.weights)
    for _ in range(cfg.steps):
        leaves = {k: cur[k].clone().requires_grad_(True) for k in names}
        with torch.enable_grad():
            loss = loss_fn(model, prepared, rows, leaves, n_items)
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
