"""Pretraining on old items and meta-training over old-item tasks.

Pretraining fits everything on old items' rows with BCE (φ of an old item = its
generated graph and its ID embedding from the table). Meta-training then makes the
shared parameters good at *starting* and *adapting* φ: each task is one old item whose
time-ordered rows are cut into 4 chunks, one chunk the support S and the next the
query Q, and the item gets exactly what a new item gets, φ⁰ = cold_params(...):

    L_cold = BCE(Q; φ⁰);  φ' = φ⁰ − β ∇_φ BCE(S; φ⁰);  L_warm = BCE(Q; φ')
    minimise α·L_cold + (1 − α)·L_warm over the meta parameters.

All tasks of a meta-batch share one forward/backward: φ⁰ is stacked over tasks and the
per-task means come from :func:`per_item_mean_loss`. The per-row part of that
computation (the query losses' gradients, the support gradient and its exact second
derivative) runs on EmerG's compiled CPU kernel where it serves (``backend``, as in
warm-up), on autograd otherwise; both give the same meta-gradient up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import structlog
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from tqdm.auto import tqdm

from emerg_stream.meta.kernel import (
    EmerGKernel,
    KernelRows,
    KernelUnavailableError,
    emerg_kernel,
    row_loss,
    support_grad,
    weight_tensors,
)
from emerg_stream.meta.losses import per_item_mean_loss, row_weights
from emerg_stream.meta.rows import ItemSet, Rows, to_device
from emerg_stream.model.base import ItemModel, Phi
from emerg_stream.model.emerg import EmerG

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of pretraining and meta-training (paper defaults for ML-1M).

    Args:
        seed: Seed of initialisation, shuffling and task sampling.
        batch_size: Rows per pretraining step.
        pretrain_epochs: Epochs of pretraining.
        pretrain_lr: Adam lr of pretraining.
        weight_decay: Adam's weight decay (its L2 form, as the authors') of pretraining
            and meta-training.
        meta_epochs: Epochs over all tasks of meta-training (0 = no meta-learning).
        meta_lr: Adam lr of meta-training.
        meta_batch: Tasks per meta-step.
        inner_lr: β, the inner step on φ.
        alpha: α, the weight of L_cold.
        second_order: Backpropagate through the inner gradient.
        inner_update: False = ablation without the inner step (φ' = φ⁰).
        chunk_rows: Rows drawn per chunk of a task (bounds a task's cost).
        id_dropout: Share of pretraining rows whose item ID embedding is replaced by
            zeros, so the other fields learn to predict an item as a new one (DropoutNet's
            input dropout; an extension, off by default: docs/RESULTS.md measures it).
    """

    seed: int = 0
    batch_size: int = 512
    pretrain_epochs: int = 2
    pretrain_lr: float = 5e-3
    weight_decay: float = 0.0
    meta_epochs: int = 3
    meta_lr: float = 1e-3
    meta_batch: int = 32
    inner_lr: float = 0.01
    alpha: float = 0.1
    second_order: bool = True
    inner_update: bool = True
    chunk_rows: int = 64
    id_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")


EpochCallback = Callable[[str, int], None]

#: Where meta-training's per-row derivatives come from: ``autograd`` (any model, any
#: device), ``kernel`` (EmerG on the CPU: the compiled kernel of
#: :mod:`emerg_stream.meta.kernel`, seconds to build on first use) or ``auto``
#: (``kernel`` where it serves, else ``autograd``, with a warning where the machine is
#: the reason).
MetaBackend = Literal["auto", "autograd", "kernel"]
META_BACKENDS: tuple[str, ...] = ("auto", "autograd", "kernel")


def pretrain(
    model: ItemModel,
    rows: Rows,
    items: ItemSet,
    cfg: TrainConfig,
    *,
    device: torch.device,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
) -> list[float]:
    """Fit all parameters on old items' rows; returns the mean loss of each epoch.

    Args:
        model: The model (already on ``device``).
        rows: Old items' rows (``rows.item`` indexes ``items``).
        items: Old items (unused beyond indexing; kept for symmetry with meta-training).
        cfg: Hyperparameters.
        device: Where to compute.
        progress: Show a progress bar.
        on_epoch: Called as ``on_epoch("pretrain", epoch)`` after each epoch.
    """
    del items
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay)
    history: list[float] = []
    model.train()
    for epoch in range(cfg.pretrain_epochs):
        perm = torch.randperm(len(rows), generator=gen)
        total, n = 0.0, 0
        batches = range(0, len(rows), cfg.batch_size)
        bar = tqdm(
            batches,
            desc=f"pretrain {epoch + 1}/{cfg.pretrain_epochs}",
            disable=not progress,
            leave=False,
        )
        for start in bar:
            b = rows.select(perm[start : start + cfg.batch_size]).to(device)
            phi = model.trained_params(b.tokens, b.weights)
            if cfg.id_dropout > 0.0:
                keep = torch.rand(len(b), generator=gen) >= cfg.id_dropout
                phi["id"] = phi["id"] * keep.to(device=device, dtype=phi["id"].dtype)[:, None]
            loss = F.binary_cross_entropy_with_logits(model(b.tokens, b.weights, phi), b.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach()) * len(b)
            n += len(b)
        history.append(total / max(n, 1))
        log.info("pretrain_epoch_done", epoch=epoch + 1, loss=round(history[-1], 5))
        if on_epoch is not None:
            on_epoch("pretrain", epoch + 1)
    model.eval()
    return history


@dataclass
class TaskTable:
    """Old items' rows cut into 4 time-ordered chunks, as flat index arrays.

    Args:
        chunk_start: ``[I, 5]`` row offsets of the chunk boundaries into ``order``.
        order: Row indices sorted by (item, time).
    """

    chunk_start: np.ndarray
    order: np.ndarray

    @classmethod
    def build(cls, item: np.ndarray, timestamps: np.ndarray, n_items: int) -> TaskTable:
        """Cut each item's time-ordered rows into 4 chunks."""
        order = np.lexsort((np.arange(len(item)), timestamps, item))
        counts = np.bincount(item, minlength=n_items)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        bounds = first[:, None] + (counts[:, None] * np.arange(5)[None, :]) // 4
        return cls(chunk_start=bounds, order=order)

    def tasks(self) -> np.ndarray:
        """``[n_tasks, 2]`` (item, support chunk); the query is the next chunk."""
        n_items = self.chunk_start.shape[0]
        sizes = np.diff(self.chunk_start, axis=1)
        items = np.repeat(np.arange(n_items), 3)
        chunks = np.tile(np.arange(3), n_items)
        ok = (sizes[items, chunks] > 0) & (sizes[items, chunks + 1] > 0)
        return np.stack([items[ok], chunks[ok]], axis=1)

    def sample(self, item: int, chunk: int, cap: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``cap`` rows of one chunk, drawn without replacement."""
        lo, hi = self.chunk_start[item, chunk], self.chunk_start[item, chunk + 1]
        idx = self.order[lo:hi]
        if len(idx) > cap:
            idx = rng.choice(idx, size=cap, replace=False)
        return idx


def _task_rows(
    rows: Rows, table: TaskTable, batch: np.ndarray, offset: int, cap: int, rng: np.random.Generator
) -> Rows:
    parts, owner = [], []
    for t, (item, chunk) in enumerate(batch):
        idx = table.sample(int(item), int(chunk) + offset, cap, rng)
        parts.append(idx)
        owner.append(np.full(len(idx), t, dtype=np.int64))
    sel = rows.select(torch.from_numpy(np.concatenate(parts)))
    return Rows(sel.tokens, sel.weights, sel.labels, torch.from_numpy(np.concatenate(owner)))


def resolve_meta_backend(
    model: ItemModel, backend: MetaBackend, dtype: torch.dtype, device: torch.device
) -> EmerGKernel | None:
    """The kernel meta-training runs on, or None for autograd (see :data:`MetaBackend`).

    Raises:
        ValueError: An unknown backend.
        KernelUnavailableError: ``kernel`` asked where it cannot serve (the reason).
    """
    if backend not in META_BACKENDS:
        raise ValueError(
            f"unknown meta-training backend {backend!r}; choose one of {META_BACKENDS}"
        )
    if backend == "autograd":
        return None
    try:
        return emerg_kernel(model, dtype, device)
    except KernelUnavailableError as exc:
        if backend == "kernel":
            raise
        if exc.machine:
            log.warning("meta_kernel_unavailable", reason=str(exc), backend="autograd")
        return None


def meta_loss(
    model: ItemModel,
    sup: Rows,
    qry: Rows,
    phi0: Phi,
    n_tasks: int,
    cfg: TrainConfig,
    kernel: EmerGKernel | None = None,
) -> Tensor:
    """α·L_cold + (1 − α)·L_warm of one meta-batch, each the mean over its tasks.

    Args:
        model: The model (its shared parameters receive the meta-gradient).
        sup: Support rows, ``item`` = the task in ``0..n_tasks-1``.
        qry: Query rows, likewise.
        phi0: The tasks' cold φ⁰ (differentiable with respect to the generator).
        n_tasks: Tasks in the batch.
        cfg: β, α, first or second order, the no-inner-step ablation.
        kernel: Compute the per-row part on this kernel (EmerG only); autograd if None.
    """
    if kernel is not None:
        if not isinstance(model, EmerG):
            raise TypeError(f"the meta-training kernel serves EmerG, not {type(model).__name__}")
        return _kernel_meta_loss(model, kernel, sup, qry, phi0, n_tasks, cfg)
    # A fresh ID embedding is a constant, but the inner step still differentiates it.
    phi0 = {k: v if v.requires_grad else v.requires_grad_(True) for k, v in phi0.items()}
    l_cold = per_item_mean_loss(model, qry, phi0, n_tasks).mean()
    if cfg.inner_update:
        names = list(phi0)
        s_loss = per_item_mean_loss(model, sup, phi0, n_tasks).sum()
        grads = torch.autograd.grad(
            s_loss,
            [phi0[k] for k in names],
            create_graph=cfg.second_order,
            allow_unused=True,
        )
        phi1 = {
            k: phi0[k] if g is None else phi0[k] - cfg.inner_lr * g
            for k, g in zip(names, grads, strict=True)
        }
    else:
        phi1 = phi0
    l_warm = per_item_mean_loss(model, qry, phi1, n_tasks).mean()
    return cfg.alpha * l_cold + (1 - cfg.alpha) * l_warm


def _kernel_rows(rows: Rows, n_tasks: int) -> KernelRows:
    """The rows for the kernel, each weighted by one over its task's rows.

    With the tokens of fields 1..F-1: the kernel embeds them and accumulates the
    table's gradient itself.
    """
    inv = row_weights(rows.item, n_tasks, rows.labels.dtype)
    tokens, weights = rows.tokens[:, 1:].contiguous(), rows.weights[:, 1:].contiguous()
    return KernelRows(rows.item, rows.labels, inv, tokens, weights)  # copied once, read 2-4x


def _kernel_meta_loss(
    model: EmerG,
    kernel: EmerGKernel,
    sup: Rows,
    qry: Rows,
    phi0: Phi,
    n_tasks: int,
    cfg: TrainConfig,
) -> Tensor:
    """:func:`meta_loss` with the per-row part on the kernel, the per-task part in torch.

    The rows' losses and their gradients (to the refined graphs, ID embeddings,
    embedding table and shared weights) come from the kernel, which embeds the rows'
    tokens itself; the graph refinement, the generator and the attention's folded maps
    are differentiated by autograd around it. The inner step's gradient is the kernel's
    φ-gradient pulled back through the refinement (with ``create_graph`` for the second
    order), and the derivative of that gradient is the kernel's exact Hessian-vector
    product: the same function as the autograd path, term for term.
    """
    adj0, id0 = phi0["adj"], phi0["id"]
    if not adj0.requires_grad:  # random-graph ablation: the inner step still moves it
        adj0 = adj0.detach().requires_grad_(True)
    weights = weight_tensors(model)
    graphs0 = model.graphs(adj0)
    q_rows = _kernel_rows(qry, n_tasks)
    l_cold = row_loss(kernel, model, q_rows, graphs0, id0, weights) / n_tasks
    if cfg.inner_update:
        s_rows = _kernel_rows(sup, n_tasks)
        g_graphs, g_id = support_grad(kernel, model, s_rows, graphs0, id0, weights)
        if not cfg.second_order:
            g_graphs, g_id = g_graphs.detach(), g_id.detach()
        (g_adj,) = torch.autograd.grad(
            graphs0, adj0, g_graphs, create_graph=cfg.second_order, retain_graph=True
        )
        adj1, id1 = adj0 - cfg.inner_lr * g_adj, id0 - cfg.inner_lr * g_id
        graphs1 = model.graphs(adj1)
    else:
        graphs1, id1 = graphs0, id0
    l_warm = row_loss(kernel, model, q_rows, graphs1, id1, weights) / n_tasks
    return cfg.alpha * l_cold + (1 - cfg.alpha) * l_warm


def meta_train(
    model: ItemModel,
    rows: Rows,
    items: ItemSet,
    timestamps: np.ndarray,
    cfg: TrainConfig,
    *,
    device: torch.device,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
    backend: MetaBackend = "auto",
) -> list[float]:
    """Meta-train the model's meta parameters over old-item tasks.

    Args:
        model: The pretrained model (on ``device``).
        rows: Old items' rows.
        items: Old items (representative rows give each task its cold φ⁰).
        timestamps: ``[N]`` event time of each row, to order the chunks.
        cfg: Hyperparameters.
        device: Where to compute.
        progress: Show a progress bar.
        on_epoch: Called as ``on_epoch("meta", epoch)`` after each epoch.
        backend: Where the per-row derivatives come from (:data:`MetaBackend`).

    Returns:
        Mean meta-loss per epoch.
    """
    params = model.meta_parameters()
    if cfg.meta_epochs == 0 or not params:
        return []
    kernel = resolve_meta_backend(model, backend, params[0].dtype, device)
    log.info("meta_backend", asked=backend, runs="autograd" if kernel is None else "kernel")
    table = TaskTable.build(rows.item.numpy(), timestamps, len(items))
    tasks = table.tasks()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(params, lr=cfg.meta_lr, weight_decay=cfg.weight_decay)
    dev_items = items.to(device)
    history: list[float] = []
    model.train()
    for epoch in range(cfg.meta_epochs):
        perm = rng.permutation(len(tasks))
        total, steps = 0.0, 0
        starts = range(0, len(perm), cfg.meta_batch)
        bar = tqdm(
            starts, desc=f"meta {epoch + 1}/{cfg.meta_epochs}", disable=not progress, leave=False
        )
        for start in bar:
            batch = tasks[perm[start : start + cfg.meta_batch]]
            n = len(batch)
            sup = _task_rows(rows, table, batch, 0, cfg.chunk_rows, rng).to(device)
            qry = _task_rows(rows, table, batch, 1, cfg.chunk_rows, rng).to(device)
            task_items = to_device(torch.from_numpy(batch[:, 0]), device)
            noise = to_device(torch.randn(n, model.noise_dim, generator=gen), device)
            phi0 = model.cold_params(
                dev_items.tokens[task_items], dev_items.weights[task_items], noise
            )
            loss = meta_loss(model, sup, qry, phi0, n, cfg, kernel)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach())
            steps += 1
        history.append(total / max(steps, 1))
        log.info("meta_epoch_done", epoch=epoch + 1, loss=round(history[-1], 5))
        if on_epoch is not None:
            on_epoch("meta", epoch + 1)
    model.eval()
    return history
