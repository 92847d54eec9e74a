"""Run every benchmark and summarise the targets.

    python benchmarks/run_all.py --quick     # seconds to a minute or two (make bench)
    python benchmarks/run_all.py             # the full sizes (tens of minutes on 2 cores)
    python benchmarks/run_all.py --only latency state   # some of them

The stream benchmarks (stream_throughput, latency, state) start an embedded broker each
and read the ml-100k replay with a trained checkpoint when found (see
``benchmarks/stream_inputs.py``), else a synthetic world.

Each benchmark prints its own markdown and JSON; the last line of stdout is one JSON
object with every benchmark's result and the target summary. ``--quick`` leaves
docs/benchmarks-growth.png alone unless ``--png`` is given.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (
    cold_start,
    growth,
    growth_stream,
    inner_loop,
    latency,
    members,
    state,
    stream_throughput,
    training,
)
from benchmarks.common import base_parser, emit, header, markdown_table, setup

#: Model-side benchmarks (BENCHMARKS.md) and stream benchmarks (BENCHMARKS_STREAM.md).
MODEL = ("inner_loop", "cold_start", "training", "growth")
STREAM = ("stream_throughput", "latency", "state", "members", "growth_stream")


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmarks in turn; print the summary; return the combined JSON object."""
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--png", type=Path, default=None, help="growth plot (full run: docs/)")
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=[*MODEL, *STREAM],
        help="run only these",
    )
    args = p.parse_args(argv)
    device = setup(args)
    common = ["--device", args.device]
    if args.quick:
        common.append("--quick")
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.reps:
        common += ["--reps", str(args.reps)]
    growth_args = list(common)
    stream_args = [a for a in common if a not in ("--device", args.device)]
    if args.png is not None:
        growth_args += ["--png", str(args.png)]
    elif args.quick:
        growth_args.append("--no-plot")
    plan = {
        "inner_loop": (inner_loop.run, common),
        "cold_start": (cold_start.run, common),
        "training": (training.run, common),
        "growth": (growth.run, growth_args),
        # the stream benchmarks run on the CPU (the worker's own device choice aside)
        "stream_throughput": (stream_throughput.main, stream_args),
        "latency": (latency.main, stream_args),
        "state": (state.main, stream_args),
        "members": (members.main, stream_args),
        "growth_stream": (
            growth_stream.main,
            [*stream_args, "--no-plot"] if args.quick else stream_args,
        ),
    }
    results: dict[str, Any] = {}
    for name, (fn, fn_args) in plan.items():
        if args.only is None or name in args.only:
            print(f"\n## {name}\n", flush=True)
            results[name] = fn(fn_args)
    summary = targets(results) + stream_targets(results)
    out = {
        **header("run_all.py", argv, device),
        "targets": summary,
        "results": results,
    }
    table = markdown_table(
        ["benchmark", "target", "measured", "met"],
        [[t["benchmark"], t["target"], t["measured"], t["met"]] for t in summary],
    )
    emit(out, "\n## targets\n\n" + table, args.json)
    return out


def line(benchmark: str, target: str, measured: str, met: bool | None) -> dict[str, Any]:
    """One row of the target summary (``met`` None: not measured)."""
    return {
        "benchmark": benchmark,
        "target": target,
        "measured": measured,
        "met": "-" if met is None else ("yes" if met else "no"),
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per target that a model-side benchmark reports (1, 2, 6)."""
    out = []
    if "inner_loop" in results:
        r = results["inner_loop"]
        out.append(
            line(
                "inner_loop",
                f">= {r['target_items_per_s']:,.0f} item-phase updates/s",
                f"{r['best_default_items_per_s']:,.0f}/s (best size)",
                r["target_met"],
            )
        )
    if "cold_start" in results:
        r = results["cold_start"]
        out.append(
            line(
                "cold_start",
                f">= {r['target_items_per_s']:,.0f} new items/s",
                f"{r['worst_items_per_s']:,.0f}/s (worst size)",
                r["target_met"],
            )
        )
    if "training" in results:
        r = results["training"]
        if "skipped" in r:
            out.append(line("training", ">= 10x", "skipped", None))
        else:
            c = r["meta_step_compare"][0]
            out.append(
                line(
                    "training",
                    f">= {r['target_speedup']:.0f}x batched vs per-task",
                    f"{c['speedup']:.1f}x ({c['chunk_rows']} rows cap)",
                    r["target_met"],
                )
            )
    return out


def stream_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The target lines of the stream benchmarks (3, 4, 5) and the members' scale-out."""
    out = []
    if "stream_throughput" in results:
        r = results["stream_throughput"]
        out.append(
            line(
                "stream_throughput",
                f">= {r['target']} of (a) then (b)",
                f"{r['ratio']:.2f}",
                r["met"],
            )
        )
    if "latency" in results:
        r = results["latency"]
        mode = "natural" if "natural" in r["latency_ms"] else r["modes"][0]
        p50, p99 = r["latency_ms"][mode]["p50"], r["latency_ms"][mode]["p99"]
        measured = f"p50 {p50:.0f} ms, p99 {p99:.0f} ms" if p99 is not None else "-"
        out.append(line("latency", f"p99 <= {r['target_p99_ms']:.0f} ms", measured, r["met"]))
    if "state" in results:
        r = results["state"]
        t, met = r["targets"], r["met"]
        out.append(
            line(
                "state",
                f"<= {t['bytes_per_item']:,.0f} B/item resident",
                f"{r['rss_bytes_per_item']:,.0f} B/item",
                met["bytes_rss"],
            )
        )
        out.append(
            line(
                "state",
                f">= {t['restore_items_per_s']:,.0f} items/s restore",
                f"{r['restore_items_per_s']:,.0f} items/s",
                met["restore"],
            )
        )
    if "members" in results:
        r = results["members"]
        n = max(int(k) for k in r["events_per_s"])
        measured = f"{r['speedup']:.2f}x ({r['events_per_s'][str(n)]:,.0f} events/s)"
        out.append(line("members", f"{n} worker processes vs 1 (no target)", measured, None))
    return out


if __name__ == "__main__":
    run()
