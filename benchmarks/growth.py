"""Growth: cost of warm-up (benchmark 1) and cold start (benchmark 2) as items grow.

Items go 1e3 -> 1e4 -> 1e5 (``--quick``: 1e2 -> 1e3). The batched paths run at every
size; the per-item paths run in full up to ``--ref-full-max`` items, on a sample of items
(time extrapolated linearly, drawn hollow) up to ``--ref-extrap-max``, and not beyond.
The curves go to ``docs/benchmarks-growth.png`` (``--png``).

    python benchmarks/growth.py
    python benchmarks/growth.py --quick --png /tmp/growth.png
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cold_start import TARGET as COLD_TARGET
from benchmarks.cold_start import generate, one_at_a_time
from benchmarks.common import (
    REPO_ROOT,
    base_parser,
    build_emerg,
    emit,
    fmt,
    header,
    interleaved,
    log_slope,
    markdown_table,
    sample_items,
    setup,
    synthetic_items,
)
from benchmarks.inner_loop import TARGET as WARM_TARGET
from benchmarks.inner_loop import K
from emerg_stream.meta.evaluate import cold_start
from emerg_stream.meta.rows import ItemSet
from emerg_stream.meta.warmup import WarmupConfig, warm_up, warm_up_reference
from emerg_stream.model import EmerG

SERIES = ("warm_up batched", "warm_up per-item", "cold_start batched", "cold_start per-item")


def reps_for(n: int, reps: int) -> int:
    """Fewer repetitions for the long runs."""
    return reps if n <= 1000 else max(1, reps - 1) if n <= 10_000 else 1


def measure(
    model: EmerG,
    n: int,
    device: torch.device,
    reps: int,
    ref_full_max: int,
    ref_extrap_max: int,
    warm_sample: int,
    cold_sample: int,
) -> list[dict[str, Any]]:
    """Every series at one size (per-item ones only where affordable)."""
    cfg = WarmupConfig()
    out: list[dict[str, Any]] = []

    def add(series: str, seconds: float, timed_items: int, extrapolated: bool) -> None:
        out.append(
            {
                "series": series,
                "items": n,
                "wall_s": seconds,
                "items_per_s": n / seconds,
                "items_timed": timed_items,
                "extrapolated": extrapolated,
            }
        )
        print(
            f"# {series} {n:,} items: {seconds:.3f}s{' (extrapolated)' if extrapolated else ''}",
            file=sys.stderr,
            flush=True,
        )

    # warm-up: one default phase, K rows per item
    items, rows = synthetic_items(n, K, seed=n)
    phi = cold_start(model, items, salt=0, device=device)
    rows_d = rows.to(device)
    r = reps_for(n, reps)
    cases: dict[str, Callable[[], Any]] = {"batched": lambda: warm_up(model, phi, rows_d, cfg)}
    m = n if n <= ref_full_max else min(n, warm_sample)
    if n <= ref_extrap_max:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:m].sort()[0]
        _, sub_rows = sample_items(items, rows, idx)
        sub_phi = {k: v[idx.to(v.device)] for k, v in phi.items()}
        sub_rows_d = sub_rows.to(device)
        cases["per_item"] = lambda: warm_up_reference(model, sub_phi, sub_rows_d, cfg)
    samples, _ = interleaved(cases, device, r, warmup=1 if n <= 1000 else 0)
    add("warm_up batched", samples["batched"].wall_s, n, False)
    if "per_item" in samples:
        add("warm_up per-item", samples["per_item"].wall_s * n / m, m, m < n)

    # cold start: φ⁰ + refined graphs
    citems, _ = synthetic_items(n, 1, seed=n + 1)
    m = n if n <= ref_full_max else min(n, cold_sample)
    ccases: dict[str, Callable[[], Any]] = {"batched": lambda: generate(model, citems, device)}
    if n <= ref_extrap_max:
        sub = ItemSet(citems.ids[:m], citems.tokens[:m], citems.weights[:m])
        ccases["per_item"] = lambda: one_at_a_time(model, sub, device)
    csamples, _ = interleaved(ccases, device, max(3, reps))
    add("cold_start batched", csamples["batched"].wall_s, n, False)
    if "per_item" in csamples:
        add("cold_start per-item", csamples["per_item"].wall_s * n / m, m, m < n)
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    """Seconds and items/s against items, log-log; extrapolated points hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {
        "warm_up batched": ("tab:blue", "-", "o"),
        "warm_up per-item": ("tab:blue", "--", "s"),
        "cold_start batched": ("tab:orange", "-", "o"),
        "cold_start per-item": ("tab:orange", "--", "s"),
    }
    for series in SERIES:
        pts = [p for p in res["points"] if p["series"] == series]
        if not pts:
            continue
        color, line, marker = styles[series]
        xs = [p["items"] for p in pts]
        for ax, key in ((ax_t, "wall_s"), (ax_r, "items_per_s")):
            ys = [p[key] for p in pts]
            ax.plot(xs, ys, line, color=color, label=series)
            for p, y in zip(pts, ys, strict=True):
                ax.plot(
                    p["items"],
                    y,
                    marker,
                    color=color,
                    markerfacecolor="white" if p["extrapolated"] else color,
                )
    ax_r.axhline(WARM_TARGET, color="tab:blue", lw=0.8, ls=":", label="warm-up target")
    ax_r.axhline(COLD_TARGET, color="tab:orange", lw=0.8, ls=":", label="cold-start target")
    for ax, title, ylabel in (
        (ax_t, "time of one call", "seconds (median)"),
        (ax_r, "throughput", "items / s"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_r.legend(fontsize=8, loc="best")
    m = res["machine"]
    fig.suptitle(
        f"EmerG warm-up (sgd x5, K={K} rows/item) and cold start on {m['device_name']}, "
        f"{m['torch_threads']} torch thread(s); hollow = extrapolated from a sample",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse options, measure, plot, print the table and the JSON; return the JSON object."""
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="numbers of items")
    p.add_argument("--ref-full-max", type=int, default=1000, help="largest full per-item run")
    p.add_argument("--ref-extrap-max", type=int, default=10_000, help="largest sampled one")
    p.add_argument("--warm-sample", type=int, default=200)
    p.add_argument("--cold-sample", type=int, default=500)
    p.add_argument("--png", type=Path, default=REPO_ROOT / "docs" / "benchmarks-growth.png")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    device = setup(args)
    sizes = args.sizes or ([100, 1000] if args.quick else [1000, 10_000, 100_000])
    reps = args.reps or 3
    model = build_emerg(device)
    head = header("growth.py", argv, device)
    points: list[dict[str, Any]] = []
    for n in sizes:
        points += measure(
            model,
            n,
            device,
            reps,
            args.ref_full_max,
            args.ref_extrap_max,
            args.warm_sample,
            args.cold_sample,
        )
    slopes = {
        s: log_slope(
            [p["items"] for p in points if p["series"] == s],
            [p["wall_s"] for p in points if p["series"] == s],
        )
        for s in SERIES
    }
    result: dict[str, Any] = {
        **head,
        "rows_per_item": K,
        "points": points,
        "loglog_slope": slopes,
        "png": None if args.no_plot else str(args.png),
    }
    if not args.no_plot:
        plot(result, args.png)
    emit(result, markdown(result), args.json)
    return result


def markdown(res: dict[str, Any]) -> str:
    """One row per size, one column pair per series."""
    sizes = sorted({p["items"] for p in res["points"]})
    by = {(p["series"], p["items"]): p for p in res["points"]}

    def cell(series: str, n: int) -> str:
        pt = by.get((series, n))
        if pt is None:
            return "not run"
        mark = "*" if pt["extrapolated"] else ""
        return f"{fmt(pt['wall_s'])}{mark} ({fmt(pt['items_per_s'])}/s)"

    m = res["machine"]
    return "\n".join(
        [
            f"Growth ({m['device_name']}, {m['cpus_usable']} CPUs, {m['torch_threads']} "
            f"threads, load {m.get('load_avg_1m_at_start')}): seconds (items/s); "
            "* = extrapolated from a sample.\n",
            markdown_table(
                ["items", *SERIES], [[f"{n:,}", *(cell(s, n) for s in SERIES)] for n in sizes]
            ),
            "Log-log slope of time vs items (1 = linear): "
            + ", ".join(f"{s}: {fmt(v)}" for s, v in res["loglog_slope"].items())
            + "\n",
        ]
    )


if __name__ == "__main__":
    run()
