"""The markdown of ``inner_loop.py``'s JSON: one section per part of the result."""

from __future__ import annotations

from typing import Any

from benchmarks.common import fmt, markdown_table

__all__ = ["markdown"]


def markdown(res: dict[str, Any]) -> str:
    """The report's tables."""
    out = [
        *_main_table(res),
        *_alternatives(res),
        *_flops(res),
        *_fixes(res),
        *_profile(res),
    ]
    return "\n".join(out)


def _main_table(res: dict[str, Any]) -> list[str]:
    """The machine, the batched vs per-item table, the growth and the target."""
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
    return out


def _alternatives(res: dict[str, Any]) -> list[str]:
    """The other backends, timed in the same interleaved runs."""
    out: list[str] = []
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
    return out


def _flops(res: dict[str, Any]) -> list[str]:
    """FLOPs per row-step and the share of the machine's matmul rate achieved."""
    out: list[str] = []
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
    return out


def _fixes(res: dict[str, Any]) -> list[str]:
    """Memory, then each before/after comparison the run made."""
    out: list[str] = []
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
    return out


def _profile(res: dict[str, Any]) -> list[str]:
    """The profile of one warm-up step."""
    out: list[str] = []
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
    return out
