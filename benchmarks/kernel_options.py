"""The CPU kernel on EmerG's options: warm-up and meta-training, kernel vs autograd.

On the ML-1M shape, the four structures model selection chooses from (per-field and
joint attention, each with and without the FM term) and the joint attention with the
authors' other options (LeakyReLU, linear last layer, FM), each on the compiled kernel
and on autograd, timed interleaved in one run:

1. Warm-up: ``warm_up`` of new items (K support rows each, 5 SGD steps), item-phases/s.
2. Meta-training: one second-order meta-step (``meta_loss`` + backward) of 32 tasks with
   64 support and 64 query rows each, tasks/s.

Beside the speeds, each kernel case's result against its autograd twin: the largest
difference of the warmed-up φ, and of the meta-gradient relative to its largest entry.
And for the joint attention, the arithmetic rate its warm-up reaches (the products'
multiply-adds per row and step, :func:`joint_warmup_macs`, times the rows and steps done
per CPU second) beside one core's rate on a large float32 matrix product (torch, this
run's threads): what bounds that warm-up (docs/BENCHMARKS.md, ninth round). On a CPU
with AMX-BF16 tiles the joint variants' warm-up also runs on ``kernel-bf16`` (query and
key products in bfloat16), with its φ's largest difference from float32's kernel.

    python benchmarks/kernel_options.py --threads 1
    python benchmarks/kernel_options.py --threads 1 --quick
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    base_parser,
    emit,
    fmt,
    header,
    interleaved,
    markdown_table,
    ml1m_config,
    setup,
    synthetic_items,
)
from emerg_stream.ablations import STRUCTURES
from emerg_stream.meta.evaluate import cold_start
from emerg_stream.meta.kernel.library import cpu_has_bf16_tiles
from emerg_stream.meta.rows import Rows
from emerg_stream.meta.train import TrainConfig, meta_loss, resolve_meta_backend
from emerg_stream.meta.warmup import WarmupConfig, warm_up
from emerg_stream.model import EmerG, ModelConfig

#: name -> model options on top of the ML-1M shape
VARIANTS: dict[str, dict[str, Any]] = {
    **STRUCTURES,  # field, field+fm, joint, joint+fm: what selection chooses from
    "joint+options": {
        "attention": "joint",
        "activation": "leaky_relu",
        "activate_last": False,
        "fm": True,
    },
}
BACKENDS = ("kernel", "autograd")
Tensors = list[torch.Tensor]

#: Warm-up steps per phase in these cases.
STEPS = 5


def joint_warmup_macs(cfg: ModelConfig) -> dict[str, int]:
    """Multiply-adds per row and warm-up step of the joint attention, the products only.

    ``forward``: the attention's forward (queries and keys from each order's F·D vector,
    values, the scores and the mixing, the output map); ``backward``: its backward as
    warm-up needs it (order 0's input gradient for the ID's D values only); ``rest``: the
    message passing (forward and backward) and the predictor. Softmaxes, activations and
    the FM terms are left out (a few per cent).
    """
    f, d, heads, a = cfg.n_fields, cfg.dim, cfg.heads, cfg.head_dim
    orders, tokens = cfg.layers + 1, (cfg.layers + 1) * cfg.n_fields
    qk, ha = f * heads * a, heads * a
    scores = heads * tokens * tokens * a
    values_out = 2 * tokens * ha * d
    forward = 2 * orders * qk * f * d + 2 * scores + values_out
    backward = 2 * (orders - 1) * qk * f * d + 2 * qk * d + 4 * scores + values_out
    rest = 3 * cfg.layers * (f * d * d + f * f * d) + 2 * f * f * d
    return {"forward": forward, "backward": backward, "rest": rest}


def matmul_gflops(n: int, reps: int = 5) -> float:
    """GFLOP/s of ``a @ b`` for ``n x n`` float32 matrices on this run's threads (best)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def build(options: dict[str, Any]) -> EmerG:
    """An EmerG of ML-1M's shape with ``options``, its table spread (speed only)."""
    torch.manual_seed(0)
    model = EmerG(replace(ml1m_config(), **options))
    with torch.no_grad():
        model.embedding.table.weight.normal_(0.0, 0.1)
        model.embedding.table.weight[0].zero_()
    return model.eval()


def warmup_cases(
    n_items: int, k: int, device: torch.device
) -> dict[str, Callable[[], dict[str, torch.Tensor]]]:
    """One warm-up phase per (variant, backend), on the same items and rows."""
    items, rows = synthetic_items(n_items, k)
    cfg = WarmupConfig(steps=STEPS, lr=0.1)
    cases: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}
    bf16 = cpu_has_bf16_tiles()
    for name, options in VARIANTS.items():
        model = build(options)
        phi = cold_start(model, items, salt=0, device=device)
        joint = options.get("attention") == "joint"
        for backend in (*BACKENDS, *(("kernel-bf16",) if joint and bf16 else ())):

            def case(
                m: EmerG = model, p: dict[str, torch.Tensor] = phi, b: str = backend
            ) -> dict[str, torch.Tensor]:
                return warm_up(m, p, rows, cfg, backend=b)  # type: ignore[arg-type]

            cases[f"{name} {backend}"] = case
    return cases


def meta_cases(n_tasks: int, k: int, device: torch.device) -> dict[str, Callable[[], Tensors]]:
    """One meta-step per (variant, backend): its meta-gradient."""
    items, rows = synthetic_items(n_tasks, 2 * k)
    pos = torch.arange(len(rows.item)) % (2 * k)
    sup = rows.select((pos < k).nonzero().squeeze(1))
    qry = rows.select((pos >= k).nonzero().squeeze(1))
    cfg = TrainConfig()
    cases: dict[str, Callable[[], Tensors]] = {}
    for name, options in VARIANTS.items():
        model = build(options).train()
        noise = torch.randn(n_tasks, model.noise_dim, generator=torch.Generator().manual_seed(1))
        for backend in BACKENDS:
            kernel = resolve_meta_backend(model, backend, torch.float32, device)  # type: ignore[arg-type]

            def case(m: EmerG = model, kern: Any = kernel, z: torch.Tensor = noise) -> Tensors:
                return meta_step(m, kern, items.tokens, items.weights, z, sup, qry, cfg)

            cases[f"{name} {backend}"] = case
    return cases


def meta_step(
    model: EmerG,
    kernel: Any,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    noise: torch.Tensor,
    sup: Rows,
    qry: Rows,
    cfg: TrainConfig,
) -> Tensors:
    """meta_loss and its backward; the meta-gradient."""
    model.zero_grad(set_to_none=True)
    phi0 = model.cold_params(tokens, weights, noise)
    meta_loss(model, sup, qry, phi0, len(tokens), cfg, kernel).backward()  # type: ignore[no-untyped-call]
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Both benchmarks; the result dict (see the module docstring)."""
    p = base_parser(__doc__ or "")
    p.add_argument("--items", type=int, default=512, help="warm-up: new items")
    p.add_argument("--k", type=int, default=20, help="warm-up: support rows per item")
    args = p.parse_args(argv)
    device = setup(args)
    if device.type != "cpu":
        raise SystemExit("the kernel runs on the CPU: use --device cpu")
    n_items = 64 if args.quick else args.items
    reps = args.reps or (1 if args.quick else 3)
    res: dict[str, Any] = {
        **header("kernel_options.py", argv, device),
        "warmup": {"items": n_items, "k": args.k, "steps": STEPS},
        "meta": {"tasks": 32, "rows": "64 support + 64 query"},
    }
    samples, outs = interleaved(warmup_cases(n_items, args.k, device), device, reps)
    res["warmup"]["cases"] = {
        name: {
            **s.to_dict(),
            "items_per_cpu_s": n_items / s.cpu_s,
            "items_per_s": n_items / s.wall_s,
        }
        for name, s in samples.items()
    }
    macs = sum(joint_warmup_macs(ml1m_config("joint")).values())
    gflops = matmul_gflops(512 if args.quick else 2048)
    res["warmup"]["arithmetic"] = {
        "joint_macs_per_row_step": macs,
        "matmul_gflops": gflops,
        "cases": {
            name: {
                "gflops": (rate := c["items_per_cpu_s"] * args.k * STEPS * 2 * macs / 1e9),
                "of_matmul": rate / gflops,
            }
            for name, c in res["warmup"]["cases"].items()
            if name.startswith("joint") and name.endswith(("kernel", "kernel-bf16"))
        },
    }
    res["warmup"]["max_phi_diff"] = {
        v: max(
            float((outs[f"{v} kernel"][k] - outs[f"{v} autograd"][k]).abs().max())
            for k in ("adj", "id")
        )
        for v in VARIANTS
    }
    res["warmup"]["max_phi_diff_bf16"] = {  # bfloat16 products against float32's
        v: max(
            float((outs[f"{v} kernel-bf16"][k] - outs[f"{v} kernel"][k]).abs().max())
            for k in ("adj", "id")
        )
        for v in VARIANTS
        if f"{v} kernel-bf16" in outs
    }
    n_tasks = 32
    samples, grads = interleaved(
        meta_cases(n_tasks, 16 if args.quick else 64, device), device, reps
    )
    res["meta"]["cases"] = {
        name: {
            **s.to_dict(),
            "tasks_per_cpu_s": n_tasks / s.cpu_s,
            "tasks_per_s": n_tasks / s.wall_s,
        }
        for name, s in samples.items()
    }
    rel = {}
    for v in VARIANTS:
        got, want = grads[f"{v} kernel"], grads[f"{v} autograd"]
        scale = max(float(w.abs().max()) for w in want)
        rel[v] = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)) / scale
    res["meta"]["max_rel_grad_diff"] = rel
    return res


def markdown(res: dict[str, Any]) -> str:
    """The report's tables."""
    m = res["machine"]
    out = [
        f"`{res['command']}` on {m['cpu_model']}, {m['torch_threads']} torch thread(s), "
        f"load average {m['load_avg_1m_at_start']} at start\n",
        f"Warm-up: {res['warmup']['items']} items x K={res['warmup']['k']}, 5 steps "
        "(medians; per CPU second: process time, insensitive to being descheduled)\n",
    ]
    w = res["warmup"]
    rows = [
        (name, fmt(c["items_per_s"]), fmt(c["items_per_cpu_s"])) for name, c in w["cases"].items()
    ]
    out.append(markdown_table(["case", "item-phases/s", "per CPU second"], rows))
    ar = w["arithmetic"]
    out.append(
        f"Joint attention's warm-up, products only: {ar['joint_macs_per_row_step']:,} "
        f"multiply-adds per row and step; a float32 matrix product runs at "
        f"{ar['matmul_gflops']:.0f} GFLOP/s here; "
        + ", ".join(
            f"{name} {c['gflops']:.0f} GFLOP/s ({100 * c['of_matmul']:.0f} %)"
            for name, c in ar["cases"].items()
        )
        + "\n"
    )
    out.append(
        "max |φ kernel − φ autograd|: "
        + ", ".join(f"{v} {d:.1e}" for v, d in w["max_phi_diff"].items())
        + "\n"
    )
    if w["max_phi_diff_bf16"]:
        out.append(
            "max |φ kernel-bf16 − φ kernel| (AMX bfloat16 query/key products): "
            + ", ".join(f"{v} {d:.1e}" for v, d in w["max_phi_diff_bf16"].items())
            + "\n"
        )
    mt = res["meta"]
    out.append(f"Meta-step: {mt['tasks']} tasks, {mt['rows']} rows, second order\n")
    rows = [
        (name, fmt(c["tasks_per_s"]), fmt(c["tasks_per_cpu_s"])) for name, c in mt["cases"].items()
    ]
    out.append(markdown_table(["case", "tasks/s", "per CPU second"], rows))
    out.append(
        "max |meta-grad kernel − autograd| / max |autograd|: "
        + ", ".join(f"{v} {d:.1e}" for v, d in mt["max_rel_grad_diff"].items())
        + "\n"
    )
    return "\n".join(out)


if __name__ == "__main__":
    result = run()
    emit(result, markdown(result))
