"""Capability: each method's share of the oracle's AUC lift on the synthetic-pairs log.

The log (``emerg_stream/data/synthetic.py``) makes clicks depend on an item-specific
pair of fields, EmerG's own premise, and knows every row's true click probability. For
each generator seed this runs ``reproduce``'s protocol (the library function: the public
split, selection of epochs and warm-up on pseudo-new items, training, the phased
evaluation) for every method, then scores the same test rows with the truth:

* **oracle**: the true probability; its AUC is the ceiling of any model.
* **additive**: the true item bias + user bias, no interaction (what a model reaches
  without learning any field pair).
* **item bias**: the true item bias alone; its within-item AUC is exactly 50 (a
  constant per item ties every pair of an item's rows).

Per method and phase it reports pooled AUC and within-item AUC and their *shares of the
oracle's lift*:

    share        = (AUC − 50) / (AUC_oracle − 50)
    share within = (within-item AUC − 50) / (within-item AUC_oracle − 50)

The pooled share (floor: chance) is the number issue 13 quotes. The within-item share
is the capability number: its floor 50 is what the item-bias-only predictor gets
exactly, so it counts only what a method learned about *which users* click each item,
the part that needs the item-specific pair; a warm-up that learns item biases only
leaves it where it was.

    python benchmarks/capability.py --threads 1        # 3 generator seeds, ~3-4 min
    python benchmarks/capability.py --quick            # seconds; a smoke run
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    base_parser,
    emit,
    header,
    markdown_table,
    setup,
)
from emerg_stream.data import load_dataset, split_log
from emerg_stream.data.synthetic import NAME, TRUE_P, draw_world, parse_name, row_indices
from emerg_stream.meta.evaluate import PHASES
from emerg_stream.meta.metrics import phase_metrics
from emerg_stream.meta.pipeline import METHODS, QUICK_WARMUP_GRID, WARMUP_GRID
from emerg_stream.meta.reproduce import PHASE_LABELS, reproduce, selection_config
from emerg_stream.meta.train import TrainConfig

#: Generator parameters of ``--quick`` (a few seconds per method).
QUICK_PARAMS = "old_items=60,new_items=80,users=300"
#: The truth-based scorers, in table order.
REFERENCES = ("oracle", "additive", "item_bias")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


def dataset_name(seed: int, params: str) -> str:
    """The ``synthetic-pairs`` name of one generator seed with extra parameters."""
    return f"{NAME}:seed={seed}" + (f",{params}" if params else "")


def references(name: str) -> dict[str, dict[str, float]]:
    """Metrics of the truth-based scorers on the test rows of ``name``'s public split."""
    cfg = parse_name(name)
    if cfg is None:
        raise ValueError(f"{name!r} is not a {NAME} dataset")
    log = load_dataset(name)
    test = split_log(log).test
    labels = test.column(log.schema.label).to_numpy()
    items = np.asarray(test.column(log.schema.item_id).to_pylist())
    item, user = row_indices(test, log.schema)
    world = draw_world(cfg)
    scores = {
        "oracle": test.column(TRUE_P).to_numpy(),
        "additive": _sigmoid(world.additive_logit(item, user)),
        "item_bias": _sigmoid(world.base + world.item_bias[item]),
    }
    return {k: phase_metrics(labels, s, items) for k, s in scores.items()}


def share(value: float, oracle: float) -> float:
    """A score's share of the oracle's lift over 50 (1 = the oracle, 0 = chance)."""
    return (value - 0.5) / (oracle - 0.5)


def run_seed(
    name: str,
    out: Path,
    methods: Sequence[str],
    seeds: int,
    device: str,
    cfg: TrainConfig,
    quick: bool,
    processes: int = 1,
) -> dict[str, Any]:
    """``reproduce`` on one generated log, plus the references and every run's shares."""
    res = reproduce(
        name,
        out,
        methods=tuple(methods),
        seeds=seeds,
        device=device,
        cfg=cfg,
        progress=False,
        warmup_grid=QUICK_WARMUP_GRID if quick else WARMUP_GRID,
        processes=processes,
        threads_each=1,
    )
    refs = references(name)
    oracle = refs["oracle"]
    runs: dict[str, Any] = {}
    for method in methods:
        per_model_seed = []
        for metrics in res["methods"][method]["seeds"].values():
            per_model_seed.append(
                {
                    p: {
                        "auc": metrics[p]["auc"],
                        "auc_within": metrics[p]["auc_within"],
                        "share": share(metrics[p]["auc"], oracle["auc"]),
                        "share_within": share(metrics[p]["auc_within"], oracle["auc_within"]),
                    }
                    for p in PHASES
                }
            )
        runs[method] = {
            "seeds": per_model_seed,
            "protocol": res["methods"][method]["protocol"],
            "wall_time_s": res["methods"][method]["wall_time_s"],
        }
    return {
        "dataset": name,
        "split": res["split"],
        "references": refs,
        "methods": runs,
        "wall_time_s": res["wall_time_s"],
    }


def summarize(per_data_seed: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Mean and std over every (generator seed, model seed) run of each number."""
    out: dict[str, Any] = {"methods": {}, "references": {}}
    for method in methods:
        runs = [r for d in per_data_seed for r in d["methods"][method]["seeds"]]
        out["methods"][method] = {
            p: {
                key: {
                    "mean": float(np.mean([r[p][key] for r in runs])),
                    "std": float(np.std([r[p][key] for r in runs])),
                }
                for key in ("auc", "auc_within", "share", "share_within")
            }
            for p in PHASES
        }
    for ref in REFERENCES:
        vals = [d["references"][ref] for d in per_data_seed]
        out["references"][ref] = {
            key: {
                "mean": float(np.mean([v[key] for v in vals])),
                "std": float(np.std([v[key] for v in vals])),
            }
            for key in ("auc", "auc_within")
        }
    return out


def _pm(x: dict[str, float], scale: float = 100.0) -> str:
    return f"{scale * x['mean']:.1f} ± {scale * x['std']:.1f}"


def markdown(res: dict[str, Any]) -> str:
    """The report: shares per phase, then the AUCs behind them with the references."""
    s = res["summary"]
    m = res["machine"]
    labels = [PHASE_LABELS[p] for p in PHASES]
    n_runs = len(res["data_seeds"]) * res["model_seeds"]
    out = [
        f"Capability on `{NAME}` ({len(res['data_seeds'])} generator seeds "
        f"{res['data_seeds']} × {res['model_seeds']} model seed(s) = {n_runs} runs per "
        f"method; {m['cpu_model']}, {m['torch_threads']} thread(s)). Share of the oracle's "
        "lift in %, mean ± std over runs:\n",
        markdown_table(
            [
                "method",
                *(f"share {lab}" for lab in labels),
                *(f"share within {lab}" for lab in labels),
            ],
            [
                [
                    method,
                    *(_pm(s["methods"][method][p]["share"]) for p in PHASES),
                    *(_pm(s["methods"][method][p]["share_within"]) for p in PHASES),
                ]
                for method in res["methods"]
            ],
        ),
        "AUC and within-item AUC (%) behind them; the references score the same test rows "
        "with the truth (phase-independent):\n",
        markdown_table(
            ["scorer", *(f"AUC {lab}" for lab in labels), *(f"within {lab}" for lab in labels)],
            [
                [
                    method,
                    *(_pm(s["methods"][method][p]["auc"]) for p in PHASES),
                    *(_pm(s["methods"][method][p]["auc_within"]) for p in PHASES),
                ]
                for method in res["methods"]
            ]
            + [
                [
                    f"*{ref}*",
                    *[_pm(s["references"][ref]["auc"])] * len(PHASES),
                    *[_pm(s["references"][ref]["auc_within"])] * len(PHASES),
                ]
                for ref in REFERENCES
            ],
        ),
    ]
    target = res.get("target")
    if target is not None:
        out.append(
            f"Issue 13's target, EmerG's share beats DeepFM's in every phase: "
            f"**{'met' if target['met'] else 'missed'}** (pooled share, EmerG − DeepFM, "
            f"points: {', '.join(f'{k} {v:+.1f}' for k, v in target['margin'].items())}; "
            "within-item share: "
            f"{', '.join(f'{k} {v:+.1f}' for k, v in target['margin_within'].items())}).\n"
        )
    return "\n".join(out)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run every generator seed, print the tables and the JSON."""
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--data-seeds", type=int, default=3, help="generator seeds 0..N-1")
    p.add_argument("--seeds", type=int, default=1, help="model seeds 0..N-1 per generator seed")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    p.add_argument(
        "--params", default="", help="extra generator parameters, e.g. new_items=400,pair_std=2"
    )
    p.add_argument("--out", type=Path, default=None, help="keep the reproduce runs here")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="reproduce's worker processes (one thread each; same numbers as 1)",
    )
    args = p.parse_args(argv)
    setup(args)
    device = "cpu" if args.device == "auto" else args.device
    methods = [x.strip() for x in args.methods.split(",") if x.strip()]
    params = ",".join(x for x in (QUICK_PARAMS if args.quick else "", args.params) if x)
    cfg = selection_config()
    if args.quick:
        cfg = replace(cfg, pretrain_epochs=1, meta_epochs=1)
    with tempfile.TemporaryDirectory(prefix="capability-") as tmp:
        root = args.out or Path(tmp)
        per_data_seed = [
            run_seed(
                dataset_name(ds, params),
                root / f"data-seed{ds}",
                methods,
                args.seeds,
                device,
                cfg,
                args.quick,
                args.processes,
            )
            for ds in range(args.data_seeds)
        ]
    summary = summarize(per_data_seed, methods)
    generator = parse_name(dataset_name(0, params))
    result: dict[str, Any] = {
        **header("capability.py", argv, _torch_device(device)),
        "generator": asdict(generator) if generator else None,
        "data_seeds": list(range(args.data_seeds)),
        "model_seeds": args.seeds,
        "train_config": asdict(cfg),
        "methods": methods,
        "summary": summary,
        "per_data_seed": per_data_seed,
    }
    if "emerg" in methods and "deepfm" in methods:
        margin = {
            PHASE_LABELS[ph]: 100
            * (
                summary["methods"]["emerg"][ph]["share"]["mean"]
                - summary["methods"]["deepfm"][ph]["share"]["mean"]
            )
            for ph in PHASES
        }
        margin_within = {
            PHASE_LABELS[ph]: 100
            * (
                summary["methods"]["emerg"][ph]["share_within"]["mean"]
                - summary["methods"]["deepfm"][ph]["share_within"]["mean"]
            )
            for ph in PHASES
        }
        result["target"] = {
            "margin": margin,
            "margin_within": margin_within,
            "met": all(v > 0 for v in margin.values()),
        }
    emit(result, markdown(result), args.json)
    return result


def _torch_device(name: str) -> Any:
    import torch

    return torch.device(name)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    run(argv)


if __name__ == "__main__":
    main()
