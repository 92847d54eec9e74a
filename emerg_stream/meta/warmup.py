"""Phased warm-up of new items: gradient steps on φ only, batched over items.

One call updates every item of a batch at once: φ is stacked over items, each item's
loss is the mean over its own support rows, and one gradient computation per step
yields all items' gradients. :func:`warm_up_reference` loops over items one by one; it
exists so tests can prove the batched path equal to it.

Where the gradient comes from is the ``backend`` (:data:`Backend`): autograd (any model,
any device), autograd through ``torch.compile``, or, for EmerG on the CPU, the compiled
kernel of :mod:`emerg_stream.meta.kernel`. ``auto`` takes the kernel where it
serves and autograd elsewhere; all of them compute the same function.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import structlog
import torch
from torch import Tensor

from emerg_stream.backends import WARMUP_BACKENDS, WarmupBackend
from emerg_stream.meta.kernel import EmerGKernel, KernelUnavailableError, emerg_kernel
from emerg_stream.meta.losses import per_item_mean_loss, row_weights
from emerg_stream.meta.rows import Rows
from emerg_stream.model.base import ItemModel, Phi, Prepared
from emerg_stream.model.emerg import EmerG

log = structlog.get_logger(__name__)

#: Where a warm-up step's gradient comes from:
#: ``autograd`` - one batched backward pass (every model and device);
#: ``compile`` - the same step through ``torch.compile`` (about a minute to compile per
#: process; ~2x autograd on CPU);
#: ``kernel`` - EmerG's gradient from the compiled CPU kernel (a second or two to build
#: once per machine and model shape; 3-4x ``compile``, 7-8x autograd on one core);
#: ``kernel-bf16`` - the kernel with the joint attention's query and key products as
#: bfloat16 tile products with float32 sums (Intel AMX; float32 models of joint attention
#: whose D and H·a are multiples of 16): the same function up to bfloat16 rounding of
#: those products' inputs, ~1.5x ``kernel`` (docs/BENCHMARKS.md, tenth round;
#: docs/RESULTS.md measures what it changes);
#: ``auto`` - ``kernel`` where it serves (EmerG, CPU, float32/64, a C++ compiler), else
#: ``autograd``.
Backend = WarmupBackend
BACKENDS: tuple[str, ...] = WARMUP_BACKENDS


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
#: fastest of 16/32/64/128/256/512 on the ML-1M shape for autograd, eager and compiled
#: alike (1.2-1.3x over 256; docs/BENCHMARKS.md).
CPU_CHUNK_ITEMS = 64

#: Items per chunk with the CPU kernel: its temporaries are per tile of 16 rows, so a
#: chunk only spreads the per-step torch work (graph refinement, the call) over more
#: items; 256 was 1.14x over 64 and level with 1,024 (scratch, ML-1M shape, K = 20).
KERNEL_CHUNK_ITEMS = 256

#: The gradient of one chunk's summed per-item loss with respect to its φ.
PhiGrad = Callable[[Phi], dict[str, Tensor]]


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


def resolve_backend(
    model: ItemModel, backend: Backend, dtype: torch.dtype, device: torch.device
) -> tuple[Literal["autograd", "compile", "kernel", "kernel-bf16"], EmerGKernel | None]:
    """The backend ``backend`` means for this model, dtype and device, and its kernel.

    ``auto`` becomes ``kernel`` where the kernel serves and ``autograd`` otherwise (the
    reason is logged once per process); ``kernel`` and ``kernel-bf16`` raise
    :class:`KernelUnavailableError` where they do not.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown warm-up backend {backend!r}; choose one of {BACKENDS}")
    if backend in ("autograd", "compile"):
        return backend, None
    try:
        if backend == "kernel-bf16":
            return backend, emerg_kernel(model, dtype, device, bf16=True)
        return "kernel", emerg_kernel(model, dtype, device)
    except KernelUnavailableError as exc:
        if backend != "auto":
            raise
        if exc.machine and str(exc) not in _FALLBACKS_LOGGED:  # worth an operator's look
            _FALLBACKS_LOGGED.add(str(exc))
            log.warning("warmup_kernel_unavailable", reason=str(exc), backend="autograd")
        return "autograd", None


_FALLBACKS_LOGGED: set[str] = set()


def warm_up(
    model: ItemModel,
    phi: Phi,
    rows: Rows,
    cfg: WarmupConfig,
    *,
    chunk: int | None = None,
    backend: Backend = "auto",
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
        chunk: Items per batched computation; ``None`` = :data:`KERNEL_CHUNK_ITEMS`
            with the kernel, :data:`CPU_CHUNK_ITEMS` with autograd on the CPU, all items
            at once on an accelerator.
        backend: Where each step's gradient comes from (:data:`Backend`); every
            backend gives the same φ up to float rounding. ``compile`` freezes the
            shared parameters' ``requires_grad`` during the call, so do not train the
            model concurrently.

    Returns:
        The updated φ, detached.
    """
    n_items = next(iter(phi.values())).shape[0]
    cur = {k: v.detach() for k, v in phi.items()}
    if len(rows) == 0 or cfg.steps == 0:
        return cur
    first = next(iter(cur.values()))
    kind, kernel = resolve_backend(model, backend, first.dtype, first.device)
    if chunk is None:
        on_cpu = rows.item.device.type == "cpu"
        cpu_chunk = KERNEL_CHUNK_ITEMS if kernel is not None else CPU_CHUNK_ITEMS
        chunk = cpu_chunk if on_cpu else max(n_items, 1)
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    loss_fn = _compiled_step_loss(model) if kind == "compile" else _step_loss

    def grads(own: Rows, n: int) -> PhiGrad:
        if kernel is not None:
            return _kernel_grad(model, kernel, own, n)
        return _autograd_grad(model, own, n, loss_fn)

    if kind != "compile":
        return _warm_up_chunks(cur, rows, cfg, chunk, grads)
    with _frozen(model):
        return _warm_up_chunks(cur, rows, cfg, chunk, grads)


def _warm_up_chunks(
    cur: Phi, rows: Rows, cfg: WarmupConfig, chunk: int, grads: Callable[[Rows, int], PhiGrad]
) -> Phi:
    """:func:`warm_up` over items ``chunk`` at a time; ``grads`` builds each chunk's."""
    n_items = next(iter(cur.values())).shape[0]
    if n_items <= chunk:
        return _warm_up_batch(cur, cfg, grads(rows, n_items))
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
            n_part = next(iter(part.values())).shape[0]
            part = _warm_up_batch(part, cfg, grads(own, n_part))
        parts.append(part)
    return {k: torch.cat([p[k] for p in parts]) for k in cur}


def _warm_up_batch(cur: Phi, cfg: WarmupConfig, grad: PhiGrad) -> Phi:
    """All items of ``cur`` in one batched computation per step."""
    stepper = _Stepper(cur, cfg)
    for _ in range(cfg.steps):
        cur = stepper.step(cur, grad(cur))
    return cur


def _autograd_grad(model: ItemModel, rows: Rows, n_items: int, loss_fn: StepLoss) -> PhiGrad:
    """The gradient by one backward pass of ``loss_fn`` (plain or compiled)."""
    with torch.no_grad():  # the rows' φ-independent part, once for all steps
        prepared = model.prepare(rows.tokens, rows.weights)

    def grad(cur: Phi) -> dict[str, Tensor]:
        names = list(cur)
        leaves = {k: cur[k].clone().requires_grad_(True) for k in names}
        with torch.enable_grad():
            loss = loss_fn(model, prepared, rows, leaves, n_items)
            grads = torch.autograd.grad(loss, [leaves[k] for k in names])
        return dict(zip(names, grads, strict=True))

    return grad


def _kernel_grad(model: ItemModel, kernel: EmerGKernel, rows: Rows, n_items: int) -> PhiGrad:
    """The gradient from the CPU kernel; the graph refinement's backward by autograd.

    The kernel returns the loss's gradient to the refined per-layer graphs; the small
    per-item refinement (min-max, TopK, powers) is differentiated by autograd from
    there, so the two backends share that code.
    """
    if not isinstance(model, EmerG):  # emerg_kernel only serves EmerG
        raise TypeError(f"the warm-up kernel serves EmerG, not {type(model).__name__}")
    with torch.no_grad():
        e_rest = model.prepare(rows.tokens, rows.weights).cache["e"]
        inv_count = row_weights(rows.item, n_items, rows.labels.dtype)
    weights = kernel.weights(model)  # shared parameters: fixed for the whole phase

    def grad(cur: Phi) -> dict[str, Tensor]:
        adj = cur["adj"].detach().requires_grad_(True)
        with torch.enable_grad():
            graphs = model.graphs(adj)
        _, d_graphs, d_id = kernel(
            model, e_rest, graphs.detach(), cur["id"], rows.item, rows.labels, inv_count, weights
        )
        (d_adj,) = torch.autograd.grad(graphs, adj, d_graphs.to(graphs.dtype))
        return {"adj": d_adj, "id": d_id.to(cur["id"].dtype)}

    return grad


def warm_up_reference(model: ItemModel, phi: Phi, rows: Rows, cfg: WarmupConfig) -> Phi:
    """The per-item slow path: the same update, one item at a time (tests only)."""
    n_items = next(iter(phi.values())).shape[0]
    parts: list[Phi] = []
    for i in range(n_items):
        mask = rows.item == i
        own = rows.select(mask.nonzero().squeeze(1))
        own = Rows(own.tokens, own.weights, own.labels, torch.zeros_like(own.item))
        one = {k: v[i : i + 1] for k, v in phi.items()}
        parts.append(warm_up(model, one, own, cfg, backend="autograd"))
    return {k: torch.cat([p[k] for p in parts]) for k in phi}
