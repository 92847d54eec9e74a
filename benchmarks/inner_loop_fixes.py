"""The warm-up fixes, each measured before/after beside ``inner_loop.py``'s main table.

The OrderAttention fix (:func:`attention_fix`, the old attention kept as
:func:`unfolded_attention`), the per-phase cache and chunk size (:func:`cache_fix`, the
old per-step embeddings kept as :class:`EmbeddingsPerStep`), ``warm_up``'s chunking
(:func:`chunk_compare`, :func:`compiled_chunks`), threads (:func:`threads_compare`) and
processes (:func:`processes_compare`).
"""

from __future__ import annotations

import inspect
import math
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import (
    K,
    build_emerg,
    interleaved,
    max_abs_diff,
    rate,
    sample_items,
    synthetic_items,
)
from emerg_stream.meta import warmup as warmup_module
from emerg_stream.meta.evaluate import cold_start
from emerg_stream.meta.rows import Rows
from emerg_stream.meta.warmup import (
    Backend,
    WarmupConfig,
    resolve_backend,
    warm_up,
)
from emerg_stream.model import EmerG, Phi, Prepared
from emerg_stream.model.interaction import OrderAttention
from emerg_stream.threads import resolve_threads


def unfolded_attention(att: OrderAttention, h: Tensor) -> Tensor:
    """OrderAttention as evaluated before the fix: q, k, v per order, out per order, mean.

    Same function of the same parameters; kept here to measure the before/after.
    """
    b, o, f, _ = h.shape
    x = h.transpose(1, 2)
    q, k, v = att.qkv(x).view(b, f, o, 3, att.heads, att.head_dim).unbind(dim=3)
    scores = torch.einsum("bfohe,bfphe->bfhop", q, k) / math.sqrt(att.head_dim)
    mixed = torch.einsum("bfhop,bfphe->bfohe", scores.softmax(dim=-1), v).reshape(b, f, o, -1)
    out: Tensor = att.out(mixed).mean(dim=2)
    return out


class EmbeddingsPerStep:
    """EmerG as warm-up ran it before the per-phase cache: embeddings at every step.

    Inside the ``with`` block ``prepare`` caches nothing and ``forward_prepared``
    recomputes fields 1..F-1's embeddings from the tokens (the same function), as
    ``warm_up`` did before ``EmerG.prepare``; kept here to measure the before/after.
    """

    def __init__(self, model: EmerG) -> None:
        self.model = model

    def __enter__(self) -> EmbeddingsPerStep:
        model = self.model

        def prepare(tokens: Tensor, weights: Tensor) -> Prepared:
            return Prepared(tokens, weights)

        def forward_prepared(prepared: Prepared, phi: Phi, row_index: Tensor | None) -> Tensor:
            fresh = EmerG.prepare(model, prepared.tokens, prepared.weights)
            return EmerG.forward_prepared(model, fresh, phi, row_index)

        model.prepare = prepare  # type: ignore[method-assign]
        model.forward_prepared = forward_prepared  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.prepare
        del self.model.forward_prepared


def attention_fix(model: EmerG, n: int, device: torch.device, reps: int) -> dict[str, Any]:
    """Warm-up with OrderAttention before (unfolded) and after (folded) the fix."""
    items, rows = synthetic_items(n, K, seed=7)
    phi = cold_start(model, items, salt=0, device=device)
    rows_d = rows.to(device)
    cfg = WarmupConfig()
    att = model.attention

    def run(unfolded: bool) -> Phi:
        if unfolded:
            att.forward = types.MethodType(unfolded_attention, att)  # type: ignore[method-assign]
        try:  # autograd: the fix is to the torch forward that autograd differentiates
            return warm_up(model, phi, rows_d, cfg, backend="autograd")
        finally:
            if unfolded:
                del att.forward

    samples, results = interleaved(
        {"before": lambda: run(True), "after": lambda: run(False)}, device, reps
    )
    before, after = samples["before"], samples["after"]
    return {
        "items": n,
        "config": "sgd x5 (default)",
        "before": before.to_dict(),
        "after": after.to_dict(),
        "before_items_per_s": rate(n, before.wall_s),
        "after_items_per_s": rate(n, after.wall_s),
        "speedup_wall": before.wall_s / after.wall_s,
        "speedup_cpu": before.cpu_s / after.cpu_s,
        "max_abs_diff": max_abs_diff(results["before"], results["after"]),
    }


def cache_fix(
    model: EmerG, n: int, device: torch.device, reps: int, compiled: bool
) -> dict[str, Any]:
    """Default-config warm-up through the rounds of fixes, autograd to kernel.

    before = autograd with embeddings recomputed at every step (:class:`EmbeddingsPerStep`)
    in chunks of 256 items (the first default); cache = the per-phase cache, chunks of
    256; after = autograd with the cache and chunks of 64; compiled = that through
    ``torch.compile`` (when ``compiled``); kernel = the compiled CPU kernel (the default
    now, where it builds).
    """
    items, rows = synthetic_items(n, K, seed=10)
    phi = cold_start(model, items, salt=0, device=device)
    rows_d = rows.to(device)
    cfg = WarmupConfig()

    def before() -> Phi:
        with EmbeddingsPerStep(model):
            return warm_up(model, phi, rows_d, cfg, chunk=256, backend="autograd")

    cases: dict[str, Callable[[], Any]] = {
        "before": before,
        "cache": lambda: warm_up(model, phi, rows_d, cfg, chunk=256, backend="autograd"),
        "after": lambda: warm_up(model, phi, rows_d, cfg, backend="autograd"),
    }
    if compiled:
        cases["compiled"] = lambda: warm_up(model, phi, rows_d, cfg, backend="compile")
    if resolve_backend(model, "auto", torch.float32, device)[0] == "kernel":
        cases["kernel"] = lambda: warm_up(model, phi, rows_d, cfg, backend="kernel")
    samples, results = interleaved(cases, device, reps)
    base = samples["before"]
    return {
        "items": n,
        "config": "sgd x5 (default)",
        "cases": {
            k: {
                **v.to_dict(),
                "items_per_s": rate(n, v.wall_s),
                "speedup_wall": base.wall_s / v.wall_s,
                "speedup_cpu": base.cpu_s / v.cpu_s,
                "max_abs_diff_vs_before": max_abs_diff(results["before"], results[k]),
            }
            for k, v in samples.items()
        },
    }


def chunk_compare(model: EmerG, n: int, device: torch.device, reps: int) -> dict[str, Any] | None:
    """Autograd warm_up in one piece (before the chunking fix) vs in chunks (after)."""
    if "chunk" not in inspect.signature(warm_up).parameters:
        return None
    items, rows = synthetic_items(n, K, seed=9)
    phi = cold_start(model, items, salt=0, device=device)
    rows_d = rows.to(device)
    cfg = WarmupConfig()
    samples, results = interleaved(
        {
            "whole": lambda: warm_up(model, phi, rows_d, cfg, chunk=n, backend="autograd"),
            "chunked": lambda: warm_up(model, phi, rows_d, cfg, backend="autograd"),
        },
        device,
        reps,
        warmup=0,
    )
    whole, chunked = samples["whole"], samples["chunked"]
    return {
        "items": n,
        "chunk": getattr(warmup_module, "CPU_CHUNK_ITEMS", None),
        "whole": whole.to_dict(),
        "chunked": chunked.to_dict(),
        "whole_items_per_s": rate(n, whole.wall_s),
        "chunked_items_per_s": rate(n, chunked.wall_s),
        "speedup_wall": whole.wall_s / chunked.wall_s,
        "speedup_cpu": whole.cpu_s / chunked.cpu_s,
        "max_abs_diff": max_abs_diff(results["whole"], results["chunked"]),
    }


def compiled_chunks(
    model: EmerG, n: int, device: torch.device, reps: int, chunks: Sequence[int] = (16, 32, 64, 128)
) -> dict[str, Any]:
    """``warm_up(backend="compile")`` at several chunk sizes, interleaved (one compilation)."""
    items, rows = synthetic_items(n, K, seed=9)
    phi = cold_start(model, items, salt=0, device=device)
    rows_d = rows.to(device)
    cfg = WarmupConfig()

    def case(c: int) -> Callable[[], Phi]:
        return lambda: warm_up(model, phi, rows_d, cfg, chunk=c, backend="compile")

    samples, results = interleaved({str(c): case(c) for c in chunks}, device, reps)
    first = results[str(chunks[0])]
    return {
        "items": n,
        "default": getattr(warmup_module, "CPU_CHUNK_ITEMS", None),
        "items_per_s": {c: rate(n, samples[str(c)].wall_s) for c in chunks},
        "samples": {c: samples[str(c)].to_dict() for c in chunks},
        "max_abs_diff": max(max_abs_diff(first, results[str(c)]) for c in chunks),
    }


def threads_compare(model: EmerG, n: int, device: torch.device, reps: int) -> dict[str, Any] | None:
    """Autograd warm-up with 1 torch thread vs the current count, interleaved (torch
    threads do not reach the kernel, which runs on the calling thread)."""
    current = torch.get_num_threads()
    full = resolve_threads().threads
    if full <= 1 or device.type != "cpu":
        return None
    items, rows = synthetic_items(n, K, seed=8)
    phi = cold_start(model, items, salt=0, device=device)
    cfg = WarmupConfig()

    def run(threads: int) -> Phi:
        torch.set_num_threads(threads)
        try:
            return warm_up(model, phi, rows, cfg, backend="autograd")
        finally:
            torch.set_num_threads(current)

    samples, _ = interleaved({"1": lambda: run(1), str(full): lambda: run(full)}, device, reps)
    return {
        "items": n,
        "threads": {
            k: {**s.to_dict(), "items_per_s": rate(n, s.wall_s)} for k, s in samples.items()
        },
        "speedup_all_vs_1": samples["1"].wall_s / samples[str(full)].wall_s,
    }


_PROC_STATE: tuple[EmerG, Phi, Rows] | None = None
_PROC_BACKEND: Backend = "auto"


def _proc_init(n_items: int, seed: int, lo: int, hi: int, backend: Backend = "auto") -> None:
    """Worker process: one torch thread, the same model, its share of the items."""
    global _PROC_STATE, _PROC_BACKEND
    _PROC_BACKEND = backend
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    model = build_emerg(cpu)
    items, rows = synthetic_items(n_items, K, seed=seed)
    sub_items, sub_rows = sample_items(items, rows, torch.arange(lo, hi))
    _PROC_STATE = (model, cold_start(model, sub_items, salt=0, device=cpu), sub_rows)


def _proc_warm_up(_: int) -> int:
    if _PROC_STATE is None:
        raise RuntimeError("worker not initialised")
    model, phi, rows = _PROC_STATE
    return len(warm_up(model, phi, rows, WarmupConfig(), backend=_PROC_BACKEND)["id"])


def processes_compare(n: int, reps: int, backend: Backend = "auto") -> dict[str, Any] | None:
    """One process (1 thread) vs the items split over one 1-thread process per core.

    Every process runs ``warm_up(backend=backend)`` and builds (or compiles) what that
    backend needs once, before the timing.
    """
    import multiprocessing as mp

    cores = resolve_threads().threads
    if not cores or cores < 2 or n < cores:
        return None
    seed = 12
    cuts = [n * i // cores for i in range(cores + 1)]
    ctx = mp.get_context("spawn")
    pools = [
        ctx.Pool(1, initializer=_proc_init, initargs=(n, seed, cuts[i], cuts[i + 1], backend))
        for i in range(cores)
    ]
    try:
        for pool in pools:  # wait until every worker has built its inputs
            pool.apply(_proc_warm_up, (0,))
        cpu = torch.device("cpu")
        model = build_emerg(cpu)
        items, rows = synthetic_items(n, K, seed=seed)
        phi = cold_start(model, items, salt=0, device=cpu)
        threads = torch.get_num_threads()

        def one() -> Phi:
            torch.set_num_threads(1)
            try:
                return warm_up(model, phi, rows, WarmupConfig(), backend=backend)
            finally:
                torch.set_num_threads(threads)

        def split() -> int:
            jobs = [pool.apply_async(_proc_warm_up, (0,)) for pool in pools]
            return sum(j.get() for j in jobs)

        samples, _ = interleaved({"1 process": one, f"{cores} processes": split}, cpu, reps)
    finally:
        for pool in pools:
            pool.terminate()
    a, b = samples["1 process"], samples[f"{cores} processes"]
    return {
        "items": n,
        "backend": resolve_backend(model, backend, torch.float32, cpu)[0],
        "processes": cores,
        "one": {**a.to_dict(), "items_per_s": rate(n, a.wall_s)},
        "split": {**b.to_dict(), "items_per_s": rate(n, b.wall_s)},
        "speedup": a.wall_s / b.wall_s,
    }
