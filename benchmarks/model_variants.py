"""Model variants compared on pseudo-new items only: the numbers behind model decisions.

For each named variant (a method plus model-config overrides) and each seed, this runs
model selection exactly as ``reproduce`` does (``meta.pipeline.select_protocol``: 20 %
of the old items held out as pseudo-new items (the least-rated ones; ``--holdout
random`` for a random draw), epochs chosen after every epoch with
each method's best warm-up of ``EPOCH_WARMUP_GRID``, then the warm-up from
``WARMUP_GRID``) and reports the pseudo-new items' metrics at the chosen settings:
pooled, within-item and between-item AUC per phase. The real new items' test rows are
never read, so a variant can be chosen from this table without touching them.

    python benchmarks/model_variants.py --dataset ml-100k --seeds 0,1 --processes 2 \
        --variants emerg-joint-fm,deepfm,metae

Variants (``--variants``): see :data:`VARIANTS`; every method gets the same grid, epochs
and selection. ``--alpha``, ``--inner-lr``, ``--weight-decay``, ``--batch-size``, ``--id-dropout``
and ``--multi-pooling`` change the training or the data of every variant of the run.
``--processes 2`` runs the (seed, variant) units on two worker processes of one thread
each (on 2 cores, about half the time of one process; each unit's result is the one it
gives alone).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import base_parser, emit, machine_info, markdown_table, setup
from emerg_stream.ablations import STRUCTURES
from emerg_stream.data import load_dataset, split_log
from emerg_stream.features import FeatureSpec
from emerg_stream.meta.evaluate import PHASES
from emerg_stream.meta.parallel import run_units
from emerg_stream.meta.pipeline import (
    EPOCH_WARMUP_GRID,
    SELECTION_HOLDOUT,
    WARMUP_GRID,
    Prepared,
    prepare,
    select_protocol,
    selection_split,
)
from emerg_stream.meta.reproduce import selection_config
from emerg_stream.meta.rows import ItemSet, Rows
from emerg_stream.meta.train import TrainConfig
from emerg_stream.meta.warmup import WarmupConfig
from emerg_stream.threads import configure_threads, threads_per_process

_JOINT = {"attention": "joint"}
_AUTHORS = {"attention": "joint", "activation": "leaky_relu", "activate_last": False}

#: name -> (method, model config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "emerg-field": ("emerg", {"attention": "field"}),
    "emerg-joint": ("emerg", _JOINT),
    "emerg-authors": ("emerg", _AUTHORS),
    # the whole FM (pairwise and first-order terms): the "+fm" structures of selection
    "emerg-field-fm": ("emerg", STRUCTURES["field+fm"]),
    "emerg-joint-fm": ("emerg", STRUCTURES["joint+fm"]),
    # a meta-learned initial ID embedding shared by new items (MAML's initialisation)
    "emerg-joint-fm-id-init": ("emerg", {**STRUCTURES["joint+fm"], "learned_id_init": True}),
    # the authors' generator shape: two hidden layers of width F (9 on both MovieLens sets)
    "emerg-joint-fm-hyper2": (
        "emerg",
        {**STRUCTURES["joint+fm"], "hyper_depth": 2, "hyper_hidden": 9},
    ),
    # the authors' predictor: no bias in the contribution gate nor on the logit (their
    # ReLU before it is a no-op after the joint attention's Σ_o relu(...))
    "emerg-joint-fm-no-bias": ("emerg", {**STRUCTURES["joint+fm"], "predictor_bias": False}),
    # the authors' graphs: the raw generated graph at every layer, no min-max, TopK or
    # powers (their refinement is commented out in model/gnn.py)
    "emerg-joint-fm-raw-graph": ("emerg", {**STRUCTURES["joint+fm"], "refine_graph": False}),
    # three message-passing layers (orders up to 4): the authors' code's gnn_layers;
    # the paper's setting for MovieLens-1M is two
    "emerg-joint-fm-3-layers": ("emerg", {**STRUCTURES["joint+fm"], "layers": 3}),
    # a generator twice as wide (one hidden layer of 64)
    "emerg-joint-fm-hyper64": ("emerg", {**STRUCTURES["joint+fm"], "hyper_hidden": 64}),
    # a new item starts from a zero ID embedding instead of N(0, 0.01²) noise (the cold
    # phase scores it as it is; DeepFM's cold ID embedding is the same noise)
    "emerg-joint-fm-zero-id": ("emerg", {**STRUCTURES["joint+fm"], "id_init_std": 0.0}),
    "deepfm-zero-id": ("deepfm", {"id_init_std": 0.0}),
    # the pairwise FM term alone (the "+fm" structures until the first-order term won)
    "emerg-field-pairwise": ("emerg", {"attention": "field", "fm": True}),
    "emerg-joint-pairwise": ("emerg", {**_JOINT, "fm": True}),
    "emerg": ("emerg", {}),
    "deepfm": ("deepfm", {}),
    "metae": ("metae", {}),
}


@dataclass(frozen=True)
class _Shared:
    """What every (seed, variant) unit reads: the selection split and the grids."""

    spec: FeatureSpec
    val: Prepared
    cfg: TrainConfig
    grid: tuple[WarmupConfig, ...]
    epoch_grid: tuple[WarmupConfig, ...]
    device: torch.device


def _select_variant(shared: _Shared, unit: tuple[int, str]) -> dict[str, Any]:
    """Selection of one variant with one seed, as ``reproduce`` runs it."""
    seed, name = unit
    method, overrides = VARIANTS[name]
    t0 = time.perf_counter()
    protocol = select_protocol(
        method,
        shared.spec,
        shared.val,
        replace(shared.cfg, seed=seed),
        device=shared.device,
        progress=False,
        model_overrides=overrides,
        grid=shared.grid,
        epoch_grid=shared.epoch_grid,
    )
    seconds = round(time.perf_counter() - t0, 1)
    print(f"{name} seed {seed}: {seconds} s", file=sys.stderr, flush=True)
    return {
        "variant": name,
        "seed": seed,
        "pretrain_epochs": protocol.pretrain_epochs,
        "meta_epochs": protocol.meta_epochs,
        "warmup": protocol.to_dict()["warmup"],
        "metrics": protocol.validation["metrics"],
        "seconds": seconds,
    }


def multi_hot_sum(data: Prepared, spec: FeatureSpec) -> Prepared:
    """``data`` with every multi-valued field's token weights 1 (a sum) instead of 1/m.

    Every kept token's weight is 1/m of its row's m tokens, so setting the non-zero
    weights to 1 turns the mean into the sum; padding stays 0 and an empty list's OOV
    token already weighs 1.
    """
    multi = [j for j, f in enumerate(spec.fields) if f.kind == "multi"]

    def summed(weights: torch.Tensor) -> torch.Tensor:
        out = weights.clone()
        out[:, multi] = (weights[:, multi] != 0).to(weights.dtype)
        return out

    def rows(r: Rows) -> Rows:
        return replace(r, weights=summed(r.weights))

    def items(s: ItemSet) -> ItemSet:
        return replace(s, weights=summed(s.weights))

    new = replace(
        data.new,
        items=items(data.new.items),
        warm={k: rows(v) for k, v in data.new.warm.items()},
        test=rows(data.new.test),
    )
    return replace(data, old_items=items(data.old_items), old_rows=rows(data.old_rows), new=new)


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", default="0", help="comma-separated selection seeds")
    p.add_argument("--variants", default="emerg-field,emerg-joint,deepfm,metae")
    p.add_argument("--max-pretrain-epochs", type=int, default=None)
    p.add_argument("--max-meta-epochs", type=int, default=None)
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="α, meta-training's weight of the cold-start loss (default: TrainConfig's); "
        "applied to every variant of the run",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows per pretraining step (default: TrainConfig's); applied to every variant",
    )
    p.add_argument(
        "--inner-lr",
        type=float,
        default=None,
        help="β, meta-training's inner step on φ (default: TrainConfig's); every variant",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="Adam's weight decay in pretraining and meta-training (default: TrainConfig's, "
        "0); applied to every variant of the run",
    )
    p.add_argument(
        "--id-dropout",
        type=float,
        default=None,
        help="share of pretraining rows whose item ID embedding is zeroed (default: "
        "TrainConfig's, 0); applied to every variant of the run",
    )
    p.add_argument(
        "--multi-pooling",
        choices=["mean", "sum"],
        default="mean",
        help="a multi-valued field's embedding: the mean of its tokens' (the project's "
        "encoding) or their sum (the authors' code); applied to every variant of the run",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the (seed, variant) units in this many worker processes, the --threads "
        "budget split between them (emerg_stream/meta/parallel.py); 1 = in this process",
    )
    p.add_argument(
        "--holdout",
        choices=["fewest_rows", "random"],
        default=None,
        help="how pseudo-new items are picked (default: the project's, SELECTION_HOLDOUT)",
    )
    args = p.parse_args(argv)
    device = setup(args)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    given = {
        "pretrain_epochs": args.max_pretrain_epochs,
        "meta_epochs": args.max_meta_epochs,
        "alpha": args.alpha,
        "inner_lr": args.inner_lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "id_dropout": args.id_dropout,
    }
    cfg = selection_config(**{k: v for k, v in given.items() if v is not None})
    if args.quick:
        cfg = replace(cfg, pretrain_epochs=1, meta_epochs=1)
    ilog = load_dataset(args.dataset, args.data_dir)
    split = split_log(ilog)
    val_split = selection_split(split, args.holdout)
    spec = FeatureSpec.fit(val_split.schema, val_split.old)
    val = prepare(val_split, spec)
    if args.multi_pooling == "sum":
        val = multi_hot_sum(val, spec)
    grid = WARMUP_GRID[:2] if args.quick else WARMUP_GRID
    epoch_grid = EPOCH_WARMUP_GRID[:2] if args.quick else EPOCH_WARMUP_GRID
    shared = _Shared(spec, val, cfg, grid, epoch_grid, device)
    units = [(seed, name) for seed in seeds for name in names]
    budget = configure_threads(args.threads or None, processes=args.processes)
    threads = threads_per_process(budget, args.processes)
    runs = run_units(_select_variant, shared, units, processes=args.processes, threads=threads)
    rows = []
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        cells = []
        for key in ("auc", "auc_within"):
            for phase in PHASES:
                vals = np.array([100 * r["metrics"][phase][key] for r in mine])
                cells.append(f"{vals.mean():.2f} ± {vals.std():.2f}")
        chosen = "; ".join(
            f"{r['pretrain_epochs']}+{r['meta_epochs']} ep, {r['warmup']['optimizer']} "
            f"{r['warmup']['lr']} x {r['warmup']['steps']}"
            for r in mine
        )
        rows.append([name, *cells, chosen])
    heads = [f"AUC {p}" for p in PHASES] + [f"within {p}" for p in PHASES]
    md = markdown_table(["variant", *heads, "chosen (per seed)"], rows)
    result = {
        "dataset": ilog.name,
        "seeds": seeds,
        "max_epochs": [cfg.pretrain_epochs, cfg.meta_epochs],
        "holdout": args.holdout or SELECTION_HOLDOUT,
        "multi_pooling": args.multi_pooling,
        "alpha": cfg.alpha,
        "inner_lr": cfg.inner_lr,
        "weight_decay": cfg.weight_decay,
        "batch_size": cfg.batch_size,
        "id_dropout": cfg.id_dropout,
        "machine": machine_info(device),
        "runs": runs,
    }
    emit(result, md, args.json)


if __name__ == "__main__":
    main()
