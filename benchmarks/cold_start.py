"""Cold-start generation: new items/s through the batched hypernetwork + refinement.

The batched path is what a worker runs for a batch of new items: φ⁰ from
``meta.evaluate.cold_start`` (id-keyed noise + the hypernetwork) and the refined per-layer
graphs from ``EmerG.graphs``. Beside it, the same for one item at a time (a sample of
items past ``--ref-full-max``, extrapolated linearly), and the batched path's parts
(noise, hypernetwork, refinement) timed on their own. All interleaved.

    python benchmarks/cold_start.py            # 1,000, 10,000, 100,000 items
    python benchmarks/cold_start.py --quick
"""

from __future__ import annotations

import inspect
import sys
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
    setup,
    synthetic_items,
)
from emerg_stream.meta.evaluate import cold_start
from emerg_stream.meta.rows import ItemSet
from emerg_stream.model import EmerG, Phi, item_noise

TARGET = 50_000.0  # new items / s on CPU
_CHUNK_PARAM = inspect.signature(cold_start).parameters.get("chunk")
HAS_CHUNK = _CHUNK_PARAM is not None
#: Items per hypernetwork call in cold_start (one piece before the chunking fix).
CHUNK = int(_CHUNK_PARAM.default) if _CHUNK_PARAM is not None else 1 << 62


def generate(
    model: EmerG, items: ItemSet, device: torch.device, chunk: int | None = None
) -> tuple[Phi, Tensor]:
    """φ⁰ and the refined graphs ``[I, L, F, F]`` of new items (the batched path)."""
    if chunk is not None and HAS_CHUNK:
        phi = cold_start(model, items, salt=0, device=device, chunk=chunk)  # type: ignore[call-arg]
    else:
        phi = cold_start(model, items, salt=0, device=device)
    with torch.no_grad():
        graphs = model.graphs(phi["adj"])
    return phi, graphs


def one_at_a_time(model: EmerG, items: ItemSet, device: torch.device) -> tuple[Phi, Tensor]:
    """The same, one item per call."""
    parts = []
    for i in range(len(items)):
        one = ItemSet([items.ids[i]], items.tokens[i : i + 1], items.weights[i : i + 1])
        parts.append(generate(model, one, device))
    phi = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
    return phi, torch.cat([p[1] for p in parts])


def bench_size(
    model: EmerG, n: int, device: torch.device, reps: int, ref_full_max: int, ref_sample: int
) -> dict[str, Any]:
    """All cases at one number of items."""
    items, _ = synthetic_items(n, 1, seed=n)
    sampled = n > ref_full_max
    m = min(n, ref_sample) if sampled else n
    sub = ItemSet(items.ids[:m], items.tokens[:m], items.weights[:m])
    noise = item_noise(items.ids, model.noise_dim).to(device)
    dev_items = items.to(device)

    def hyper() -> Tensor:
        with torch.no_grad():  # as cold_start runs it: CHUNK items per call
            return torch.cat(
                [
                    model.cold_params(
                        dev_items.tokens[s : s + CHUNK],
                        dev_items.weights[s : s + CHUNK],
                        noise[s : s + CHUNK],
                    )["adj"]
                    for s in range(0, n, CHUNK)
                ]
            )

    adj = hyper()

    def refine() -> Tensor:
        with torch.no_grad():
            return model.graphs(adj)

    cases: dict[str, Callable[[], Any]] = {
        "batched": lambda: generate(model, items, device),
        "per_item": lambda: one_at_a_time(model, sub, device),
        "noise": lambda: item_noise(items.ids, model.noise_dim),
        "hypernetwork": hyper,
        "refinement": refine,
    }
    samples, results = interleaved(cases, device, reps)
    phi_b, g_b = results["batched"]
    phi_r, g_r = results["per_item"]
    diff = max(
        float((g_b[:m] - g_r).abs().max()),
        *(float((phi_b[k][:m] - phi_r[k]).abs().max()) for k in phi_b),
    )
    per_item_wall = samples["per_item"].wall_s * n / m
    b = samples["batched"]
    row: dict[str, Any] = {
        "items": n,
        **{name: s.to_dict() for name, s in samples.items()},
        "batched_items_per_s": n / b.wall_s,
        "batched_items_per_cpu_s": n / b.cpu_s,
        "per_item_items_timed": m,
        "per_item_extrapolated": sampled,
        "per_item_wall_s_full": per_item_wall,
        "per_item_items_per_s": n / per_item_wall,
        "speedup": per_item_wall / b.wall_s,
        "parts_share": {
            k: samples[k].wall_s / b.wall_s for k in ("noise", "hypernetwork", "refinement")
        },
        "max_abs_diff": diff,
    }
    print(
        f"# {n} items: batched {b.wall_s:.4f}s ({n / b.wall_s:,.0f}/s), one at a time "
        f"{per_item_wall:.3f}s{' (extrapolated)' if sampled else ''}",
        file=sys.stderr,
        flush=True,
    )
    return row


def chunk_compare(
    model: EmerG, n: int, chunk: int, device: torch.device, reps: int
) -> dict[str, Any] | None:
    """cold_start in one piece (before the chunking fix) vs in chunks (after)."""
    if not HAS_CHUNK:
        return None
    items, _ = synthetic_items(n, 1, seed=5)
    samples, results = interleaved(
        {
            "whole": lambda: generate(model, items, device, chunk=n),
            "chunked": lambda: generate(model, items, device, chunk=chunk),
        },
        device,
        reps,
    )
    diff = max(
        float((results["whole"][0][k] - results["chunked"][0][k]).abs().max())
        for k in results["whole"][0]
    )
    return {
        "items": n,
        "chunk": chunk,
        "whole": samples["whole"].to_dict(),
        "chunked": samples["chunked"].to_dict(),
        "whole_items_per_s": n / samples["whole"].wall_s,
        "chunked_items_per_s": n / samples["chunked"].wall_s,
        "speedup": samples["whole"].wall_s / samples["chunked"].wall_s,
        "max_abs_diff": diff,
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse options, measure, print the table and the JSON; return the JSON object."""
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="numbers of items")
    p.add_argument("--ref-full-max", type=int, default=1000, help="largest full one-at-a-time")
    p.add_argument("--ref-sample", type=int, default=500, help="items timed past that size")
    p.add_argument("--no-extras", action="store_true", help="skip the chunking before/after")
    args = p.parse_args(argv)
    device = setup(args)
    sizes = args.sizes or ([100, 1000] if args.quick else [1000, 10_000, 100_000])
    reps = args.reps or (3 if args.quick else 7)
    model = build_emerg(device)
    head = header("cold_start.py", argv, device)
    results = [
        bench_size(model, n, device, reps, args.ref_full_max, args.ref_sample) for n in sizes
    ]
    extras: dict[str, Any] = {}
    if not args.no_extras and HAS_CHUNK:
        extras["chunking"] = chunk_compare(model, max(sizes), CHUNK, device, reps)
    worst = min(results, key=lambda r: r["batched_items_per_s"])
    result: dict[str, Any] = {
        **head,
        "results": results,
        "growth_loglog_slope": log_slope(
            [r["items"] for r in results], [r["batched"]["wall_s_median"] for r in results]
        ),
        "target_items_per_s": TARGET,
        "target_met": worst["batched_items_per_s"] >= TARGET,
        "worst_items_per_s": worst["batched_items_per_s"],
        **extras,
    }
    emit(result, markdown(result), args.json)
    return result


def markdown(res: dict[str, Any]) -> str:
    """The report's tables."""
    m = res["machine"]
    out = [
        f"Cold-start generation ({m['device_name']}, {m['cpus_usable']} CPUs, torch "
        f"{m['torch']}, {m['torch_threads']} threads, load {m.get('load_avg_1m_at_start')}). "
        "Wall-clock medians; parts as a share of the batched time.\n",
        markdown_table(
            [
                "items",
                "batched s",
                "batched items/s",
                "one-at-a-time s",
                "one-at-a-time items/s",
                "speed-up",
                "noise / hypernet / refine",
                "max|Δ|",
            ],
            [
                [
                    f"{r['items']:,}",
                    fmt(r["batched"]["wall_s_median"]),
                    fmt(r["batched_items_per_s"]),
                    fmt(r["per_item_wall_s_full"])
                    + (
                        f" (extrap. from {r['per_item_items_timed']})"
                        if r["per_item_extrapolated"]
                        else ""
                    ),
                    fmt(r["per_item_items_per_s"]),
                    f"{r['speedup']:.0f}x",
                    " / ".join(f"{v:.0%}" for v in r["parts_share"].values()),
                    f"{r['max_abs_diff']:.1e}",
                ]
                for r in res["results"]
            ],
        ),
        f"Growth of batched time (log-log slope, 1 = linear): {fmt(res['growth_loglog_slope'])}\n",
        f"Target >= {res['target_items_per_s']:,.0f} new items/s at every size: "
        f"**{'met' if res['target_met'] else 'missed'}** "
        f"(worst {res['worst_items_per_s']:,.0f}/s).\n",
    ]
    ch = res.get("chunking")
    if ch:
        out.append(
            f"cold_start chunking fix, {ch['items']:,} items (chunk {ch['chunk']:,}): one piece "
            f"{ch['whole_items_per_s']:,.0f}/s, chunked {ch['chunked_items_per_s']:,.0f}/s, "
            f"**{ch['speedup']:.2f}x**, max|Δφ| {ch['max_abs_diff']:.1e}.\n"
        )
    return "\n".join(out)


if __name__ == "__main__":
    run()
