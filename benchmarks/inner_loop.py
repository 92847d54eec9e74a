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
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    K,
    base_parser,
    build_emerg,
    emit,
    header,
    interleaved,
    items_over,
    log_slope,
    markdown_table,
    matmul_flops,
    max_abs_diff,
    rate,
    sample_items,
    setup,
    synthetic_items,
    time_once,
)
from benchmarks.inner_loop_fixes import (
    attention_fix,
    cache_fix,
    chunk_compare,
    compiled_chunks,
    processes_compare,
    threads_compare,
)
from benchmarks.inner_loop_report import markdown
from emerg_stream.meta.evaluate import cold_start
from emerg_stream.meta.losses import per_item_mean_loss
from emerg_stream.meta.rows import Rows
from emerg_stream.meta.warmup import (
    WarmupConfig,
    resolve_backend,
    warm_up,
    warm_up_reference,
)
from emerg_stream.model import EmerG, Phi

TARGET = 2000.0  # item-phase updates / s, default config, on the 2 CPU cores
CONFIGS: dict[str, WarmupConfig] = {
    "sgd x5 (default)": WarmupConfig(),
    "adam x11": WarmupConfig(steps=11, optimizer="adam"),
}


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
                "items_per_s": rate(n, c.wall_s),
                "items_per_cpu_s": rate(n, c.cpu_s),
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
                "batched_items_per_s": rate(n, b.wall_s),
                "batched_items_per_cpu_s": rate(n, b.cpu_s),
                "per_item_items_per_s": rate(n, per_item_wall),
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
        "--backend",
        choices=["auto", "kernel", "kernel-bf16"],
        default="auto",
        help="--only processes: the warm-up backend every process runs (kernel-bf16: the "
        "joint attention's query and key products on AMX tiles in bfloat16)",
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
        pr = processes_compare(n, reps, args.backend)
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


if __name__ == "__main__":
    run()
