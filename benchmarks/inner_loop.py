"""Warm-up throughput: item-phase updates per second, batched vs the per-item reference.

One warm-up phase = ``cfg.steps`` gradient steps on φ of every item over its K support
rows. The batched path (``meta.warmup.warm_up``, one call for all items, its default
backend: the compiled CPU kernel for EmerG on the CPU) is timed beside the per-item
reference (``warm_up_reference``, autograd one item at a time) on the same inputs,
interleaved; past ``--ref-full-max`` items the reference runs on a random sample of items
and its time is extrapolated linearly (reported as such). Beside them, the same batched
call with the other backends (``--alternatives``: ``autograd``, and ``compile`` unless
``--quick``). Also: FLOPs of a step (FlopCounterMode, matmul family only, autograd's ops)
against the machine's measured matmul FLOP/s, a profile of one step, the before/after of
the OrderAttention evaluation-order fix and of the per-phase embedding cache + chunk size
+ backends, 1 vs all torch threads (autograd) and 1 vs one process per core.

    python benchmarks/inner_loop.py            # 100, 1,000, 10,000 items
    python benchmarks/inner_loop.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    base_parser,
    build_emerg,
    emit,
    fmt,
    header,
    interleaved,
    log_slope,
    markdown_table,
    matmul_flops,
    sample_items,
    setup,
    synthetic_items,
    time_once,
)
from emerg_stream.meta import warmup as warmup_module
from emerg_stream.meta.evaluate import cold_start
from emerg_stream.meta.losses import per_item_mean_loss
from emerg_stream.meta.rows import Rows
from emerg_stream.meta.warmup import (
    Backend,
    WarmupConfig,
    resolve_backend,
    warm_up,
    warm_up_reference,
)
from emerg_stream.model import EmerG, Phi, Prepared
from emerg_stream.model.interaction import OrderAttention
from emerg_stream.threads import resolve_threads

K = 20  # support rows per item
TARGET = 2000.0  # item-phase updates / s, default config, on the 2 CPU cores
CONFIGS: dict[str, WarmupConfig] = {
    "sgd x5 (default)": WarmupConfig(),
    "adam x11": WarmupConfig(steps=11, optimizer="adam"),
}


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


def max_abs_diff(a: Phi, b: Phi) -> float:
    """Largest entry-wise difference over all φ tensors."""
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def items_over(a: Phi, b: Phi, tol: float) -> int:
    """Items whose φ differ by more than ``tol`` in some entry."""
    worst = torch.stack(
        [(a[k].double() - b[k].double()).abs().flatten(1).max(dim=1).values for k in a]
    )
    return int((worst.max(dim=0).values > tol).sum())


def step_flops(model: EmerG, phi: Phi, rows: Rows) -> float:
    """Matmul-family FLOPs of one warm-up step (forward + backward to φ) per row."""
    from torch.utils.flop_counter import FlopCounterMode

    n_items = next(iter(phi.values())).shape[0]
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    # FlopCounterMode cannot follow autograd.grad; backward() with the shared weights
    # frozen computes the same gradients (to φ only) that warm_up asks for.
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter, torch.enable_grad():
            per_item_mean_loss(model, rows, leaves, n_items).sum().backward()  # type: ignore[no-untyped-call]
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return float(counter.get_total_flops()) / len(rows)


def saved_bytes(model: EmerG, phi: Phi, rows: Rows) -> int:
    """Bytes autograd keeps for the backward of one warm-up step (unique storages)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    n_items = next(iter(phi.values())).shape[0]
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        loss = per_item_mean_loss(model, rows, leaves, n_items).sum()
    del loss
    return sum(seen.values())


def profile_step(model: EmerG, phi: Phi, rows: Rows, top: int = 12) -> list[dict[str, Any]]:
    """The ops of one warm-up step with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cfg = WarmupConfig(steps=1)
    warm_up(model, phi, rows, cfg)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        warm_up(model, phi, rows, cfg)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        {
            "op": e.key,
            "shapes": str(e.input_shapes)[:80],
            "calls": e.count,
            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
            "share": round(e.self_cpu_time_total / total, 3),
        }
        for e in ranked
    ]


def _rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_size(
    model: EmerG,
    model64: EmerG,
    n: int,
    device: torch.device,
    reps: int,
    ref_full_max: int,
    ref_sample: int,
    f64_items: int,
    alternatives: Sequence[str],
) -> list[dict[str, Any]]:
    """Batched (default backend, and each alternative) vs per-item, every config, one size."""
    items, rows = synthetic_items(n, K, seed=n)
    phi = cold_start(model, items, salt=0, device=device)
    rows_d = rows.to(device)
    sampled = n > ref_full_max
    if sampled:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:ref_sample].sort()[0]
    else:
        idx = torch.arange(n)
    sub_items, sub_rows = sample_items(items, rows, idx)
    phi_sub = {k: v[idx.to(v.device)] for k, v in phi.items()}
    sub_rows_d = sub_rows.to(device)
    # float64: the batched path on (up to f64_items of) the reference's items against it
    idx64 = torch.arange(min(len(idx), f64_items))
    items64, rows64 = sample_items(sub_items, sub_rows, idx64)
    sub64 = Rows(rows64.tokens, rows64.weights.double(), rows64.labels.double(), rows64.item)
    phi64 = {k: v.double() for k, v in cold_start(model64, items64, salt=0, device=device).items()}
    out = []
    for name, cfg in CONFIGS.items():
        cases: dict[str, Callable[[], Any]] = {
            "batched": lambda cfg=cfg: warm_up(model, phi, rows_d, cfg),
            "per_item": lambda cfg=cfg: warm_up_reference(model, phi_sub, sub_rows_d, cfg),
        }
        for alt in alternatives:
            cases[alt] = lambda cfg=cfg, alt=alt: warm_up(model, phi, rows_d, cfg, backend=alt)
        samples, results = interleaved(cases, device, reps, warmup=1 if n < 1000 else 0)
        batched_on_sub = {k: v[idx.to(v.device)] for k, v in results["batched"].items()}
        diff32 = max_abs_diff(batched_on_sub, results["per_item"])
        over32 = items_over(batched_on_sub, results["per_item"], 1e-4)
        sub64_d = sub64.to(device)
        diff64 = max_abs_diff(
            warm_up(model64, phi64, sub64_d, cfg), warm_up_reference(model64, phi64, sub64_d, cfg)
        )
        scale = n / len(idx)
        b, r = samples["batched"], samples["per_item"]
        b_wall = b.wall_s
        per_item_wall = r.wall_s * scale
        alts: dict[str, Any] = {}
        for alt in alternatives:
            c = samples[alt]
            on_sub = {k: v[idx.to(v.device)] for k, v in results[alt].items()}
            alts[alt] = {
                **c.to_dict(),
                "items_per_s": _rate(n, c.wall_s),
                "items_per_cpu_s": _rate(n, c.cpu_s),
                "batched_speedup_over_it": c.wall_s / b_wall,
                "max_abs_diff_f32": max_abs_diff(on_sub, results["per_item"]),
                "max_abs_diff_f64": max_abs_diff(
                    warm_up(model64, phi64, sub64_d, cfg, backend=alt),
                    warm_up_reference(model64, phi64, sub64_d, cfg),
                ),
            }
        out.append(
            {
                "items": n,
                "config": name,
                "steps": cfg.steps,
                "optimizer": cfg.optimizer,
                "rows": n * K,
                "batched_backend": resolve_backend(model, "auto", torch.float32, device)[0],
                "batched": b.to_dict(),
                "per_item": r.to_dict(),
                "per_item_items_timed": len(idx),
                "per_item_extrapolated": sampled,
                "batched_items_per_s": _rate(n, b.wall_s),
                "batched_items_per_cpu_s": _rate(n, b.cpu_s),
                "per_item_items_per_s": _rate(n, per_item_wall),
                "per_item_wall_s_full": per_item_wall,
                "speedup": per_item_wall / b.wall_s,
                "max_abs_diff_f32": diff32,
                "items_over_1e-4_f32": over32,
                "max_abs_diff_f64": diff64,
                "f64_items": len(idx64),
                "f32_ok": diff32 <= 1e-4,
                "f64_ok": diff64 <= 1e-5,
                "alternatives": alts,
            }
        )
        print(
            f"# {n} items, {name}: batched {b.wall_s:.3f}s, per-item {per_item_wall:.3f}s"
            f"{' (extrapolated)' if sampled else ''}",
            file=sys.stderr,
            flush=True,
        )
    return out


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
        "before_items_per_s": _rate(n, before.wall_s),
        "after_items_per_s": _rate(n, after.wall_s),
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
                "items_per_s": _rate(n, v.wall_s),
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
        "whole_items_per_s": _rate(n, whole.wall_s),
        "chunked_items_per_s": _rate(n, chunked.wall_s),
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
        "items_per_s": {c: _rate(n, samples[str(c)].wall_s) for c in chunks},
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
            k: {**s.to_dict(), "items_per_s": _rate(n, s.wall_s)} for k, s in samples.items()
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
        "one": {**a.to_dict(), "items_per_s": _rate(n, a.wall_s)},
        "split": {**b.to_dict(), "items_per_s": _rate(n, b.wall_s)},
        "speedup": a.wall_s / b.wall_s,
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse options, measure, print the table and the JSON; return the JSON object."""
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="numbers of items")
    p.add_argument("--ref-full-max", type=int, default=1000, help="largest full reference run")
    p.add_argument("--ref-sample", type=int, default=200, help="items timed past that size")
    p.add_argument("--f64-items", type=int, default=200, help="items of the float64 check")
    p.add_argument("--fix-items", type=int, default=0, help="items of the before/after (0=auto)")
    p.add_argument("--chunk-items", type=int, default=0, help="items of the chunking compare")
    p.add_argument("--thread-items", type=int, default=0, help="items of the threads compare")
    p.add_argument(
        "--procs-items", type=int, default=-1, help="items of the 1 vs N processes (0 = skip)"
    )
    p.add_argument("--no-extras", action="store_true", help="skip flops/profile/fix/threads")
    p.add_argument(
        "--only",
        choices=["processes", "compiled-chunks"],
        default=None,
        help="run just this comparison (1 vs N processes, default backend: --procs-items "
        "items; the compile backend at chunks of 16/32/64/128: --chunk-items items)",
    )
    p.add_argument(
        "--alternatives",
        nargs="*",
        choices=["autograd", "compile", "kernel"],
        default=None,
        help="backends timed beside the default one (default: autograd and compile; "
        "autograd with --quick)",
    )
    args = p.parse_args(argv)
    device = setup(args)
    if args.alternatives is None:
        args.alternatives = ["autograd"] if args.quick else ["autograd", "compile"]
    alternatives: list[str] = list(dict.fromkeys(args.alternatives))
    compiled = "compile" in alternatives
    if args.procs_items < 0:
        args.procs_items = 0 if device.type != "cpu" else 100 if args.quick else 1000
    sizes = args.sizes or ([10, 50] if args.quick else [100, 1000, 10000])
    reps = args.reps or (3 if args.quick else 5)
    if args.only:
        return run_only(args, device, reps, argv)
    mid_reps, big_reps = max(1, min(reps, 3)), max(1, min(reps, 2))
    model = build_emerg(device)
    model64 = build_emerg(device, dtype=torch.float64)
    head = header("inner_loop.py", argv, device)
    compile_s = None
    build_s: dict[str, float] = {}
    c_items, c_rows = synthetic_items(8, K, seed=99)
    c_phi = cold_start(model, c_items, salt=0, device=device)
    for backend in ("auto", *alternatives):  # build once: every later size and chunk reuses it
        build_s[backend], _, _ = time_once(
            lambda b=backend: warm_up(model, c_phi, c_rows.to(device), WarmupConfig(), backend=b),
            device,
        )
    compile_s = build_s.get("compile")

    results: list[dict[str, Any]] = []
    for n in sizes:
        results += bench_size(
            model,
            model64,
            n,
            device,
            reps if n < 1000 else mid_reps if n <= 1000 else big_reps,
            args.ref_full_max,
            args.ref_sample,
            args.f64_items,
            alternatives,
        )

    growth = {
        name: log_slope(
            [r["items"] for r in results if r["config"] == name],
            [r["batched"]["wall_s_median"] for r in results if r["config"] == name],
        )
        for name in CONFIGS
    }
    extras: dict[str, Any] = {}
    if not args.no_extras:
        n_f = min(sizes[-1], 100)
        items, rows = synthetic_items(n_f, K, seed=3)
        phi = cold_start(model, items, salt=0, device=device)
        flops_row = step_flops(model, phi, rows.to(device))
        mem_item = saved_bytes(model, phi, rows.to(device)) / n_f
        dominant = (n_f * K * 9 * 3, 16, 48)  # the folded attention's projection
        mm = matmul_flops(device, [dominant, (1024, 1024, 1024)])
        largest = [r for r in results if r["items"] == sizes[-1]]
        flops = []
        for r in largest:
            achieved = flops_row * r["rows"] * r["steps"] / r["batched"]["wall_s_median"]
            flops.append(
                {
                    "config": r["config"],
                    "items": r["items"],
                    "achieved_flop_s": achieved,
                    "vs_comparable_mm": achieved / mm[f"{dominant[0]}x16@16x48"],
                    "vs_square_mm": achieved / mm["1024x1024@1024x1024"],
                }
            )
        extras["flops"] = {
            "matmul_flops_per_row_step": flops_row,
            "counted": "torch.utils.flop_counter (mm/bmm/addmm only; elementwise ops not counted)",
            "machine_mm_flop_s": mm,
            "achieved": flops,
        }
        extras["memory"] = {
            "items": n_f,
            "saved_for_backward_bytes_per_item": mem_item,
            "note": "one step, K rows per item; the model's own parameters included once",
        }
        if device.type == "cpu":
            extras["profile"] = profile_step(model, phi, rows)
        fix_n = args.fix_items or (20 if args.quick else 1000)
        # the per-field attention's evaluation-order fix needs that reading's model
        field = build_emerg(device, attention="field")
        extras["attention_fix"] = attention_fix(field, fix_n, device, reps)
        extras["cache_fix"] = cache_fix(model, fix_n, device, reps, compiled)
        extras["warmup_chunking"] = chunk_compare(
            model, args.chunk_items or (300 if args.quick else 2000), device, max(1, reps - 2)
        )
        if args.procs_items:
            extras["processes"] = processes_compare(args.procs_items, reps)
        extras["threads"] = threads_compare(
            model, args.thread_items or (20 if args.quick else 200), device, reps
        )

    default = [r for r in results if r["config"] == "sgd x5 (default)"]
    best = max(default, key=lambda r: r["batched_items_per_s"])
    # the target is on all cores: the best of one process and one process per core
    candidates = {f"1 process, {best['batched_backend']}": best["batched_items_per_s"]}
    for alt in alternatives:
        candidates[f"1 process, {alt}"] = max(
            r["alternatives"][alt]["items_per_s"] for r in default
        )
    if extras.get("processes"):
        pr = extras["processes"]
        candidates[f"{pr['processes']} processes, {pr['backend']}"] = pr["split"]["items_per_s"]
    best_name = max(candidates, key=lambda k: candidates[k])
    result: dict[str, Any] = {
        **head,
        "rows_per_item": K,
        "results": results,
        "growth_loglog_slope": growth,
        "target_items_per_s": TARGET,
        "target_met": candidates[best_name] >= TARGET,
        "best_default_items_per_s": candidates[best_name],
        "best_default_how": best_name,
        "default_items_per_s_by_setup": candidates,
        "compile_s": compile_s,
        "first_call_s": build_s,
        **extras,
    }
    emit(result, markdown(result), args.json)
    return result


def run_only(
    args: argparse.Namespace, device: torch.device, reps: int, argv: Sequence[str] | None
) -> dict[str, Any]:
    """``--only``: one comparison, its JSON and a line of markdown."""
    result: dict[str, Any] = {
        **header("inner_loop.py", argv, device),
    }
    if args.only == "processes":
        n = args.procs_items or (100 if args.quick else 1000)
        pr = processes_compare(n, reps)
        if pr is None:
            raise SystemExit("--only processes needs at least 2 usable CPUs")
        result["processes"] = pr
        md = (
            f"warm-up ({pr['backend']}), {n:,} items: 1 process "
            f"{pr['one']['items_per_s']:,.0f}/s, "
            f"{pr['processes']} processes {pr['split']['items_per_s']:,.0f}/s "
            f"(**{pr['speedup']:.2f}x**)\n"
        )
    else:
        n = args.chunk_items or (64 if args.quick else 1024)
        model = build_emerg(device)
        cc = compiled_chunks(model, n, device, reps)
        result["compiled_chunks"] = cc
        md = markdown_table(
            ["items", *[f"chunk {c}" for c in cc["items_per_s"]], "max abs diff"],
            [
                [
                    n,
                    *[f"{v:,.0f}/s" for v in cc["items_per_s"].values()],
                    f"{cc['max_abs_diff']:.1e}",
                ]
            ],
        )
    emit(result, md, args.json)
    return result


def markdown(res: dict[str, Any]) -> str:
    """The report's tables."""
    m = res["machine"]
    out = [
        f"Warm-up throughput ({m['device_name']}, {m['cpus_usable']} CPUs, torch "
        f"{m['torch']}, {m['torch_threads']} threads, load {m.get('load_avg_1m_at_start')}); "
        f"K={res['rows_per_item']} rows per item. Wall-clock medians. Batched = `warm_up`'s "
        f"default backend ({res['results'][0]['batched_backend']}); per-item = autograd, one "
        "item at a time.\n",
        markdown_table(
            [
                "items",
                "config",
                "batched s",
                "batched items/s",
                "per-item s",
                "per-item items/s",
                "speed-up",
                "max|Δ| f32",
                "max|Δ| f64 (items)",
            ],
            [
                [
                    f"{r['items']:,}",
                    r["config"],
                    fmt(r["batched"]["wall_s_median"]),
                    fmt(r["batched_items_per_s"]),
                    fmt(r["per_item_wall_s_full"])
                    + (
                        f" (extrap. from {r['per_item_items_timed']})"
                        if r["per_item_extrapolated"]
                        else ""
                    ),
                    fmt(r["per_item_items_per_s"]),
                    f"{r['speedup']:.1f}x",
                    f"{r['max_abs_diff_f32']:.1e}"
                    + (f" ({r['items_over_1e-4_f32']} items > 1e-4)" if not r["f32_ok"] else ""),
                    f"{r['max_abs_diff_f64']:.1e} ({r['f64_items']})",
                ]
                for r in res["results"]
            ],
        ),
        "Growth of batched time with items (log-log slope, 1 = linear): "
        + ", ".join(f"{k}: {fmt(v)}" for k, v in res["growth_loglog_slope"].items())
        + "\n",
        f"Target >= {res['target_items_per_s']:,.0f} item-phase updates/s (default config): "
        f"**{'met' if res['target_met'] else 'missed'}** "
        f"(best {res['best_default_items_per_s']:,.0f}/s: {res['best_default_how']}; "
        + ", ".join(f"{k} {v:,.0f}/s" for k, v in res["default_items_per_s_by_setup"].items())
        + ").\n",
    ]
    alt_rows = [(r, a, v) for r in res["results"] for a, v in r["alternatives"].items()]
    if alt_rows:
        out.append(
            "The other backends, timed in the same interleaved runs (built once before the "
            "timing: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in res["first_call_s"].items())
            + " for a first 8-item call):\n"
        )
        out.append(
            markdown_table(
                [
                    "items",
                    "config",
                    "backend",
                    "s",
                    "items/s",
                    "batched is … faster",
                    "max|Δ| f32",
                    "max|Δ| f64",
                ],
                [
                    [
                        f"{r['items']:,}",
                        r["config"],
                        a,
                        fmt(v["wall_s_median"]),
                        fmt(v["items_per_s"]),
                        f"{v['batched_speedup_over_it']:.2f}x",
                        f"{v['max_abs_diff_f32']:.1e}",
                        f"{v['max_abs_diff_f64']:.1e}",
                    ]
                    for r, a, v in alt_rows
                ],
            )
        )
    if "flops" in res:
        fl = res["flops"]
        out.append(
            f"FLOPs per row-step (forward + backward to φ, {fl['counted']}): "
            f"{fl['matmul_flops_per_row_step']:,.0f}. Measured mm FLOP/s: "
            + ", ".join(f"{k}: {v / 1e9:.1f} G" for k, v in fl["machine_mm_flop_s"].items())
            + "\n"
        )
        out.append(
            markdown_table(
                ["config", "items", "achieved GFLOP/s", "/ same-shape mm", "/ 1024³ mm"],
                [
                    [
                        a["config"],
                        f"{a['items']:,}",
                        f"{a['achieved_flop_s'] / 1e9:.2f}",
                        f"{a['vs_comparable_mm']:.1%}",
                        f"{a['vs_square_mm']:.1%}",
                    ]
                    for a in fl["achieved"]
                ],
            )
        )
    if "memory" in res:
        mem = res["memory"]
        out.append(
            f"Autograd keeps {mem['saved_for_backward_bytes_per_item'] / 1e6:.2f} MB per item "
            f"for the backward of one step ({mem['items']} items measured).\n"
        )
    if "attention_fix" in res:
        fx = res["attention_fix"]
        out.append(
            f"OrderAttention fix, {fx['items']:,} items, default config: before "
            f"{fx['before_items_per_s']:,.0f}/s, after {fx['after_items_per_s']:,.0f}/s, "
            f"**{fx['speedup_wall']:.2f}x** wall ({fx['speedup_cpu']:.2f}x CPU time), "
            f"max|Δφ| {fx['max_abs_diff']:.1e}.\n"
        )
    if res.get("cache_fix"):
        cf = res["cache_fix"]
        out.append(
            f"Rounds of fixes, {cf['items']:,} items, default config (before = autograd, "
            "embeddings every step, chunks of 256; cache = the per-phase cache, chunks of 256; "
            "after = cache, chunks of 64; compiled = that through torch.compile; kernel = "
            "the CPU kernel): "
            + ", ".join(
                f"{k} {v['items_per_s']:,.0f}/s (**{v['speedup_wall']:.2f}x** wall, "
                f"{v['speedup_cpu']:.2f}x CPU, max|Δφ| {v['max_abs_diff_vs_before']:.1e})"
                for k, v in cf["cases"].items()
            )
            + ".\n"
        )
    if res.get("warmup_chunking"):
        wc = res["warmup_chunking"]
        out.append(
            f"warm_up chunking fix, {wc['items']:,} items, default config: one piece "
            f"{wc['whole_items_per_s']:,.0f}/s, chunks of {wc['chunk']} "
            f"{wc['chunked_items_per_s']:,.0f}/s, **{wc['speedup_wall']:.2f}x** wall "
            f"({wc['speedup_cpu']:.2f}x CPU time), max|Δφ| {wc['max_abs_diff']:.1e}.\n"
        )
    if res.get("threads"):
        th = res["threads"]
        out.append(
            f"Threads ({th['items']:,} items): "
            + ", ".join(f"{k}: {v['items_per_s']:,.0f}/s" for k, v in th["threads"].items())
            + f"; all vs 1: {th['speedup_all_vs_1']:.2f}x.\n"
        )
    for pr in (res.get("processes"),):
        if not pr:
            continue
        out.append(
            f"Processes ({pr['backend']}) "
            f"({pr['items']:,} items, 1 torch thread each): 1 process "
            f"{pr['one']['items_per_s']:,.0f}/s, items split over {pr['processes']} processes "
            f"{pr['split']['items_per_s']:,.0f}/s: **{pr['speedup']:.2f}x**.\n"
        )
    if "profile" in res:
        out.append(
            markdown_table(
                ["op (one warm-up step)", "shapes", "calls", "self CPU ms", "share"],
                [
                    [p["op"], p["shapes"], p["calls"], p["self_cpu_ms"], f"{p['share']:.0%}"]
                    for p in res["profile"]
                ],
            )
        )
    return "\n".join(out)


if __name__ == "__main__":
    run()
