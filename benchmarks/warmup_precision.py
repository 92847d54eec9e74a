"""What bfloat16 warm-up products change: a reproduce run's EmerG checkpoints evaluated
with each warm-up backend on the same new items, side by side.

For every ``checkpoints/emerg-seed*`` of a ``reproduce`` output folder, the phased
evaluation (cold start, then warm-up A, B, C; each checkpoint's own warm-up protocol)
runs once per backend (default ``kernel``, float32, against ``kernel-bf16``, the joint
attention's query and key products as bfloat16 tile products). Reported per seed and
phase: pooled and within-item AUC under each, their differences, the largest difference
of any metric over all seeds and phases, and each backend's total evaluation time. The
cold phase has no warm-up, so its differences are zero by construction.

    python benchmarks/warmup_precision.py --run runs/ml100k-lin --dataset ml-100k
    python benchmarks/warmup_precision.py --run runs/ml1m-lin --dataset ml-1m-u2999
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import base_parser, emit, header, markdown_table, setup
from emerg_stream.meta.warmup import BACKENDS


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate every EmerG checkpoint of ``--run`` under each backend."""
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--run", type=Path, required=True, help="a reproduce --out folder")
    p.add_argument("--dataset", required=True, help="the dataset the run used")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--backends", nargs=2, default=["kernel", "kernel-bf16"], choices=BACKENDS, metavar="B"
    )
    args = p.parse_args(argv)
    device = setup(args)

    from emerg_stream.data import load_dataset, split_log
    from emerg_stream.meta.checkpoint import load_checkpoint
    from emerg_stream.meta.evaluate import run_phases
    from emerg_stream.meta.metrics import PHASE_METRICS
    from emerg_stream.meta.pipeline import prepare
    from emerg_stream.phases import PHASE_LABELS, PHASES

    paths = sorted((args.run / "checkpoints").glob("emerg-seed*"))
    if not paths:
        raise SystemExit(f"no checkpoints/emerg-seed* under {args.run}")
    res: dict[str, Any] = {
        **header("warmup_precision.py", argv, device),
        "run": str(args.run),
        "dataset": args.dataset,
        "backends": args.backends,
        "seeds": {},
    }
    split = split_log(load_dataset(args.dataset, args.data_dir))
    seconds = dict.fromkeys(args.backends, 0.0)
    rows, worst = [], 0.0
    first, second = args.backends
    for path in paths:
        ck = load_checkpoint(path, device=device)
        data = prepare(split, ck.meta.spec)
        got: dict[str, dict[str, dict[str, float]]] = {}
        for backend in args.backends:
            t0 = time.perf_counter()
            got[backend], _ = run_phases(
                ck.model,
                data.new,
                ck.meta.warmup,
                salt=ck.meta.noise_salt,
                device=device,
                backend=backend,
            )
            seconds[backend] += time.perf_counter() - t0
        seed = path.name.removeprefix("emerg-seed")
        res["seeds"][seed] = got
        for phase in PHASES:
            a, b = got[first][phase], got[second][phase]
            worst = max([worst, *(abs(b[m] - a[m]) for m in PHASE_METRICS)])
            rows.append(
                [
                    seed,
                    PHASE_LABELS[phase],
                    *(f"{100 * a[m]:.3f} / {100 * b[m]:.3f}" for m in ("auc", "auc_within")),
                    *(f"{100 * (b[m] - a[m]):+.3f}" for m in ("auc", "auc_within")),
                ]
            )
    res["largest_abs_difference"] = worst
    res["evaluation_seconds"] = seconds
    md = markdown_table(
        [
            "seed",
            "phase",
            f"AUC ({first} / {second})",
            "within-item AUC",
            "Δ AUC",
            "Δ within",
        ],
        rows,
    )
    md += (
        f"\nlargest |Δ| of any metric ({', '.join(PHASE_METRICS.values())}), any seed and "
        f"phase: {100 * worst:.3f} points; evaluation time {first} {seconds[first]:.1f} s, "
        f"{second} {seconds[second]:.1f} s\n"
    )
    emit(res, md, args.json)
    return res


if __name__ == "__main__":
    run()
