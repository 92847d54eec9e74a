"""Model variants compared on pseudo-new items only: the numbers behind model decisions.

For each named variant (a method plus model-config overrides) and each seed, this runs
model selection exactly as ``reproduce`` does (``meta.pipeline.select_protocol``: 20 %
of the old items held out as pseudo-new items (the least-rated ones; ``--holdout
random`` for a random draw), epochs chosen after every epoch with
each method's best warm-up of ``EPOCH_WARMUP_GRID``, then the warm-up from
``WARMUP_GRID``) and reports the pseudo-new items' metrics at the chosen settings:
pooled, within-item and between-item AUC per phase. The real new items' test rows are
never read, so a variant can be chosen from this table without touching them.

    python benchmarks/model_variants.py --dataset ml-100k --seeds 0,1,2 \
        --variants emerg,emerg-joint,deepfm,metae

Variants (``--variants``): see :data:`VARIANTS`; every method gets the same grid, epochs
and selection.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import base_parser, emit, machine_info, markdown_table, setup
from emerg_stream.ablations import STRUCTURES
from emerg_stream.data import load_dataset, split_log
from emerg_stream.features import FeatureSpec
from emerg_stream.meta.evaluate import PHASES
from emerg_stream.meta.pipeline import (
    EPOCH_WARMUP_GRID,
    SELECTION_HOLDOUT,
    WARMUP_GRID,
    prepare,
    select_protocol,
    selection_split,
)
from emerg_stream.meta.reproduce import selection_config

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
    # the pairwise FM term alone (the "+fm" structures until the first-order term won)
    "emerg-field-pairwise": ("emerg", {"attention": "field", "fm": True}),
    "emerg-joint-pairwise": ("emerg", {**_JOINT, "fm": True}),
    "emerg": ("emerg", {}),
    "deepfm": ("deepfm", {}),
    "metae": ("metae", {}),
}


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", default="0", help="comma-separated selection seeds")
    p.add_argument("--variants", default="emerg-field,emerg-joint,deepfm,metae")
    p.add_argument("--max-pretrain-epochs", type=int, default=None)
    p.add_argument("--max-meta-epochs", type=int, default=None)
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
    cfg = selection_config()
    if args.max_pretrain_epochs is not None:
        cfg = replace(cfg, pretrain_epochs=args.max_pretrain_epochs)
    if args.max_meta_epochs is not None:
        cfg = replace(cfg, meta_epochs=args.max_meta_epochs)
    if args.quick:
        cfg = replace(cfg, pretrain_epochs=1, meta_epochs=1)
    ilog = load_dataset(args.dataset, args.data_dir)
    split = split_log(ilog)
    val_split = selection_split(split, args.holdout)
    spec = FeatureSpec.fit(val_split.schema, val_split.old)
    val = prepare(val_split, spec)
    grid = WARMUP_GRID[:2] if args.quick else WARMUP_GRID
    epoch_grid = EPOCH_WARMUP_GRID[:2] if args.quick else EPOCH_WARMUP_GRID
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for name in names:
            method, overrides = VARIANTS[name]
            t0 = time.perf_counter()
            protocol = select_protocol(
                method,
                spec,
                val,
                replace(cfg, seed=seed),
                device=device,
                progress=False,
                model_overrides=overrides,
                grid=grid,
                epoch_grid=epoch_grid,
            )
            runs.append(
                {
                    "variant": name,
                    "seed": seed,
                    "pretrain_epochs": protocol.pretrain_epochs,
                    "meta_epochs": protocol.meta_epochs,
                    "warmup": protocol.to_dict()["warmup"],
                    "metrics": protocol.validation["metrics"],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(f"{name} seed {seed}: {runs[-1]['seconds']} s", file=sys.stderr, flush=True)
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
        "machine": machine_info(device),
        "runs": runs,
    }
    emit(result, md, args.json)


if __name__ == "__main__":
    main()
