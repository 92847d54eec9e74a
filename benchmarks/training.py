"""Training: wall time of pretraining + meta-training, and batched vs per-task meta-steps.

1. One epoch of ``meta.train.pretrain`` and one of ``meta.train.meta_train`` on the old
   items of ml-1m-u2999 (skipped cleanly when the data is absent), as the library runs
   them (``--quick``: the rows of the first ``--quick-items`` old items only).
2. The meta-step of a batch of tasks computed as meta_train computes it (φ⁰ stacked over
   tasks, one forward/backward for all, ``meta_loss`` on the default backend: the CPU
   kernel for EmerG) against the per-task loop, the reference: the same ``meta_loss``
   on autograd (L_cold, one inner step on the task's support rows, L_warm, α-weighted),
   one task at a time, gradients accumulated. Beside them, the batched step on autograd
   and the per-task loop on the kernel, so that the share of batching and of the kernel
   can be told apart. Same sampled rows and noise for all; interleaved; the
   meta-gradients are compared with the reference's.

    python benchmarks/training.py
    python benchmarks/training.py --quick
    python benchmarks/training.py --quick --synthetic   # no data needed
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    base_parser,
    build_emerg,
    emit,
    fmt,
    header,
    interleaved,
    markdown_table,
    setup,
    synthetic_items,
)
from emerg_stream.meta.kernel import EmerGKernel
from emerg_stream.meta.rows import ItemSet, Rows
from emerg_stream.meta.train import (
    TaskTable,
    TrainConfig,
    meta_loss,
    meta_train,
    pretrain,
    resolve_meta_backend,
)
from emerg_stream.model import ItemModel, build_model

TARGET = 10.0  # batched vs per-task speed-up, time per task


@dataclass
class OldData:
    """Old items, their rows and event times (what pretraining and meta-training read)."""

    items: ItemSet
    rows: Rows
    timestamps: np.ndarray
    source: str


def load_old(dataset: str, data_dir: str | None) -> tuple[OldData, ItemModel] | str:
    """The old items of a dataset and an untrained EmerG for it, or why they are absent."""
    from emerg_stream.data import load_dataset, split_log
    from emerg_stream.errors import EmergError
    from emerg_stream.features import FeatureSpec
    from emerg_stream.meta.pipeline import model_config, prepare

    try:
        log = load_dataset(dataset, data_dir)
    except (EmergError, OSError) as exc:
        return f"{dataset} not available: {exc}"
    split = split_log(log)
    spec = FeatureSpec.fit(split.schema, split.old)
    prep = prepare(split, spec)
    torch.manual_seed(0)
    model = build_model(model_config("emerg", spec))
    return OldData(prep.old_items, prep.old_rows, prep.old_timestamps, dataset), model


def synthetic_old(n_items: int, rows_per_item: int) -> tuple[OldData, ItemModel]:
    """Synthetic old items of ML-1M's shape (for the smoke test; no data needed)."""
    items, rows = synthetic_items(n_items, rows_per_item, seed=11)
    ts = np.arange(len(rows), dtype=np.int64)
    return OldData(items, rows, ts, "synthetic"), build_emerg(torch.device("cpu"))


def first_items(data: OldData, n: int) -> OldData:
    """The rows of the first ``n`` old items only (``--quick``)."""
    if n >= len(data.items):
        return data
    keep = (data.rows.item < n).nonzero().squeeze(1)
    sub = data.rows.select(keep)
    items = ItemSet(data.items.ids[:n], data.items.tokens[:n], data.items.weights[:n])
    return OldData(items, sub, data.timestamps[keep.numpy()], data.source)


@dataclass
class MetaBatch:
    """One meta-batch of tasks, with its rows and noise drawn once (shared by both paths)."""

    task_items: torch.Tensor  # [n] old-item index of each task
    sup: Rows  # rows.item = task index
    qry: Rows
    noise: torch.Tensor  # [n, noise_dim]


def draw_batches(
    data: OldData, model: ItemModel, cfg: TrainConfig, n_batches: int, device: torch.device
) -> list[MetaBatch]:
    """Meta-batches drawn as meta_train draws them (chunks, row cap, fresh noise)."""
    table = TaskTable.build(data.rows.item.numpy(), data.timestamps, len(data.items))
    tasks = table.tasks()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    perm = rng.permutation(len(tasks))
    out = []
    for b in range(n_batches):
        batch = tasks[perm[b * cfg.meta_batch : (b + 1) * cfg.meta_batch]]
        if len(batch) == 0:
            break
        parts = []
        for offset in (0, 1):
            idx, owner = [], []
            for t, (item, chunk) in enumerate(batch):
                sel = table.sample(int(item), int(chunk) + offset, cfg.chunk_rows, rng)
                idx.append(sel)
                owner.append(np.full(len(sel), t, dtype=np.int64))
            r = data.rows.select(torch.from_numpy(np.concatenate(idx)))
            parts.append(
                Rows(r.tokens, r.weights, r.labels, torch.from_numpy(np.concatenate(owner)))
            )
        noise = torch.randn(len(batch), model.noise_dim, generator=gen)
        out.append(
            MetaBatch(
                torch.from_numpy(batch[:, 0]).to(device),
                parts[0].to(device),
                parts[1].to(device),
                noise.to(device),
            )
        )
    return out


def batch_loss(
    model: ItemModel,
    items: ItemSet,
    mb: MetaBatch,
    cfg: TrainConfig,
    kernel: EmerGKernel | None,
    task: int | None = None,
) -> torch.Tensor:
    """The library's meta-loss of a meta-batch (``task=None``) or of one task of it.

    For one task the loss is divided by the batch size, so that summing the per-task
    losses gives the batch's mean, exactly what the batched path minimises.
    """
    n_batch = len(mb.task_items)
    if task is None:
        ti, sup, qry, noise, n = mb.task_items, mb.sup, mb.qry, mb.noise, n_batch
    else:
        ti, noise, n = mb.task_items[task : task + 1], mb.noise[task : task + 1], 1
        sup, qry = (own(r, task) for r in (mb.sup, mb.qry))
    phi0 = model.cold_params(items.tokens[ti], items.weights[ti], noise)
    loss = meta_loss(model, sup, qry, phi0, n, cfg, kernel)
    return loss if task is None else loss * (1 / n_batch)


def own(rows: Rows, task: int) -> Rows:
    """One task's rows, re-indexed to item 0."""
    sel = rows.select((rows.item == task).nonzero().squeeze(1))
    return Rows(sel.tokens, sel.weights, sel.labels, torch.zeros_like(sel.item))


def meta_grads(
    model: ItemModel,
    items: ItemSet,
    batches: list[MetaBatch],
    cfg: TrainConfig,
    kernel: EmerGKernel | None,
    per_task: bool,
) -> list[torch.Tensor]:
    """Meta-gradients of every batch (concatenated), batched or one task at a time."""
    params = model.meta_parameters()
    out = []
    for mb in batches:
        for p in params:
            p.grad = None
        if per_task:
            for t in range(len(mb.task_items)):
                loss = batch_loss(model, items, mb, cfg, kernel, task=t)
                loss.backward()  # type: ignore[no-untyped-call]
        else:
            batch_loss(model, items, mb, cfg, kernel).backward()  # type: ignore[no-untyped-call]
        out.append(
            torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
            )
        )
    for p in params:
        p.grad = None
    return out


def compare_meta_step(
    model: ItemModel,
    data: OldData,
    cfg: TrainConfig,
    n_batches: int,
    reps: int,
    device: torch.device,
) -> dict[str, Any]:
    """Batched vs per-task meta-gradients of the same meta-batches, interleaved.

    ``batched`` is meta_train's step on its default backend, ``per_task`` the reference
    loop on autograd; the other two (batched on autograd, per task on the kernel) where
    the default backend is the kernel.
    """
    batches = draw_batches(data, model, cfg, n_batches, device)
    items = data.items.to(device)
    kernel = resolve_meta_backend(model, "auto", next(model.parameters()).dtype, device)
    paths: dict[str, tuple[EmerGKernel | None, bool]] = {
        "batched": (kernel, False),
        "per_task": (None, True),
    }
    if kernel is not None:
        paths |= {"batched_autograd": (None, False), "per_task_kernel": (kernel, True)}
    model.train()
    samples, results = interleaved(
        {
            name: (lambda k=k, pt=pt: meta_grads(model, items, batches, cfg, k, per_task=pt))
            for name, (k, pt) in paths.items()
        },
        device,
        reps,
        warmup=1,
    )
    model.eval()
    tasks = sum(len(b.task_items) for b in batches)
    rows = sum(len(b.sup) + len(b.qry) for b in batches)
    b, t = samples["batched"], samples["per_task"]

    def diff(name: str) -> float:
        return max(
            float((x - y).abs().max())
            for x, y in zip(results[name], results["per_task"], strict=True)
        )

    others = {
        name: {
            **samples[name].to_dict(),
            "ms_per_task": 1e3 * samples[name].wall_s / tasks,
            "speedup_vs_per_task": t.wall_s / samples[name].wall_s,
            "max_abs_diff_meta_grad": diff(name),
        }
        for name in paths
        if name not in ("batched", "per_task")
    }
    return {
        "backend": "autograd" if kernel is None else "kernel",
        "chunk_rows": cfg.chunk_rows,
        "batches": len(batches),
        "tasks": tasks,
        "rows_per_task": rows / max(tasks, 1),
        "meta_batch": cfg.meta_batch,
        "second_order": cfg.second_order,
        "batched": b.to_dict(),
        "per_task": t.to_dict(),
        "batched_ms_per_task": 1e3 * b.wall_s / tasks,
        "per_task_ms_per_task": 1e3 * t.wall_s / tasks,
        "speedup": t.wall_s / b.wall_s,
        "speedup_cpu": t.cpu_s / b.cpu_s,
        "max_abs_diff_meta_grad": diff("batched"),
        "max_abs_meta_grad": max(float(g.abs().max()) for g in results["batched"]),
        "alternatives": others,
    }


def timed(fn: Any) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse options, measure, print the table and the JSON; return the JSON object."""
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--dataset", default="ml-1m-u2999")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--synthetic", action="store_true", help="synthetic old items (no data)")
    p.add_argument("--quick-items", type=int, default=40, help="old items kept by --quick")
    p.add_argument("--batches", type=int, default=0, help="meta-batches compared (0 = auto)")
    p.add_argument("--meta-batch", type=int, default=0, help="tasks per meta-batch (0 = 32)")
    p.add_argument(
        "--chunk-rows", type=int, nargs="*", default=None, help="row caps per chunk compared"
    )
    args = p.parse_args(argv)
    device = setup(args)
    head = header("training.py", argv, device)
    base: dict[str, Any] = {
        **head,
    }
    if args.synthetic:
        data, model = synthetic_old(30 if args.quick else 300, 40)
    else:
        loaded = load_old(args.dataset, args.data_dir)
        if isinstance(loaded, str):
            result = {**base, "skipped": loaded}
            emit(result, f"Training benchmark skipped: {loaded}\n", args.json)
            return result
        data, model = loaded
    if args.quick:
        data = first_items(data, args.quick_items)
    model = model.to(device)
    cfg = TrainConfig(pretrain_epochs=1, meta_epochs=1)
    if args.meta_batch:
        cfg = replace(cfg, meta_batch=args.meta_batch)
    n_tasks = len(TaskTable.build(data.rows.item.numpy(), data.timestamps, len(data.items)).tasks())

    # 1. wall time of the library's pretraining and meta-training (one epoch each)
    t_pre = timed(
        lambda: pretrain(model, data.rows, data.items, cfg, device=device, progress=False)
    )
    t_meta = timed(
        lambda: meta_train(
            model, data.rows, data.items, data.timestamps, cfg, device=device, progress=False
        )
    )
    pre_steps = -(-len(data.rows) // cfg.batch_size)
    meta_steps = -(-n_tasks // cfg.meta_batch)

    # 2. batched vs per-task meta-steps on the same draws, per cap of rows per chunk
    n_batches = args.batches or (2 if args.quick else 6)
    reps = args.reps or (3 if args.quick else 5)
    chunk_rows = args.chunk_rows or ([cfg.chunk_rows] if args.quick else [cfg.chunk_rows, 16])
    compares = [
        compare_meta_step(model, data, replace(cfg, chunk_rows=c), n_batches, reps, device)
        for c in chunk_rows
    ]
    default = (
        next(c for c in compares if c["chunk_rows"] == cfg.chunk_rows)
        if any(c["chunk_rows"] == cfg.chunk_rows for c in compares)
        else compares[0]
    )
    speedup = default["speedup"]
    result: dict[str, Any] = {
        **base,
        "data": {
            "source": data.source,
            "quick_items": args.quick_items if args.quick else None,
            "old_items": len(data.items),
            "old_rows": len(data.rows),
            "tasks": n_tasks,
        },
        "train_config": asdict(cfg),
        "pretrain": {
            "epochs": 1,
            "steps": pre_steps,
            "wall_s": t_pre,
            "rows_per_s": len(data.rows) / t_pre,
        },
        "meta_train": {
            "epochs": 1,
            "steps": meta_steps,
            "wall_s": t_meta,
            "tasks_per_s": n_tasks / t_meta,
        },
        "total_wall_s": t_pre + t_meta,
        "meta_step_compare": compares,
        "target_speedup": TARGET,
        "target_met": speedup >= TARGET,
    }
    emit(result, markdown(result), args.json)
    return result


def markdown(res: dict[str, Any]) -> str:
    """The report's tables."""
    m, d = res["machine"], res["data"]
    c0 = res["meta_step_compare"][0]
    sub = f" (first {d['quick_items']} old items)" if d["quick_items"] else ""
    return "\n".join(
        [
            f"Training on {d['source']}{sub}: {d['old_items']:,} old items, {d['old_rows']:,} "
            f"rows, {d['tasks']:,} tasks ({m['device_name']}, {m['cpus_usable']} CPUs, "
            f"{m['torch_threads']} threads, load {m.get('load_avg_1m_at_start')}).\n",
            markdown_table(
                ["stage (1 epoch)", "steps", "wall s", "throughput"],
                [
                    [
                        "pretrain",
                        res["pretrain"]["steps"],
                        fmt(res["pretrain"]["wall_s"]),
                        f"{res['pretrain']['rows_per_s']:,.0f} rows/s",
                    ],
                    [
                        "meta-train",
                        res["meta_train"]["steps"],
                        fmt(res["meta_train"]["wall_s"]),
                        f"{res['meta_train']['tasks_per_s']:,.1f} tasks/s",
                    ],
                    ["total", "", fmt(res["total_wall_s"]), ""],
                ],
            ),
            f"Meta-step, {c0['batches']} batches x {c0['meta_batch']} tasks "
            f"(second order: {c0['second_order']}), wall-clock medians, time per task; "
            f"batched = meta_train's step ({c0['backend']}), per-task loop = autograd, "
            "one task at a time:\n",
            markdown_table(
                [
                    "rows cap per chunk",
                    "rows per task (S+Q)",
                    "per-task loop ms",
                    "batched ms",
                    "speed-up",
                    "max|Δ meta-grad| (max|grad|)",
                ],
                [
                    [
                        c["chunk_rows"],
                        f"{c['rows_per_task']:.0f}",
                        fmt(c["per_task_ms_per_task"]),
                        fmt(c["batched_ms_per_task"]),
                        f"{c['speedup']:.1f}x ({c['speedup_cpu']:.1f}x CPU)",
                        f"{c['max_abs_diff_meta_grad']:.1e} ({c['max_abs_meta_grad']:.1e})",
                    ]
                    for c in res["meta_step_compare"]
                ],
            ),
            alternatives_table(res["meta_step_compare"]),
            f"Target >= {res['target_speedup']:.0f}x (default cap of "
            f"{res['train_config']['chunk_rows']} rows per chunk): "
            f"**{'met' if res['target_met'] else 'missed'}**.\n",
        ]
    )


def alternatives_table(compares: list[dict[str, Any]]) -> str:
    """The batched step on autograd and the per-task loop on the kernel, if measured."""
    rows = [
        [
            c["chunk_rows"],
            name.replace("_", " "),
            fmt(a["ms_per_task"]),
            f"{a['speedup_vs_per_task']:.1f}x",
            f"{a['max_abs_diff_meta_grad']:.1e}",
        ]
        for c in compares
        for name, a in c.get("alternatives", {}).items()
    ]
    if not rows:
        return ""
    return "Side by side in the same run:\n\n" + markdown_table(
        ["rows cap", "path", "ms per task", "vs per-task loop", "max|Δ meta-grad|"], rows
    )


if __name__ == "__main__":
    run()
