"""``emerg-stream evaluate``: the phased evaluation of a saved checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from emerg_stream.backends import WARMUP_BACKENDS
from emerg_stream.devices import DEVICES

HELP = "evaluate a checkpoint on new items: pooled, within- and between-item AUC and F1 per phase"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the job's flags."""
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--dataset", required=True, help="preset or dataset YAML")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument(
        "--warmup-backend",
        default="auto",
        choices=WARMUP_BACKENDS,
        help="where warm-up gradients come from (kernel-bf16: the joint attention's query "
        "and key products in bfloat16 on AMX tiles; default auto)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the per-phase table."""
    from emerg_stream.data import load_dataset, split_log
    from emerg_stream.devices import resolve_device
    from emerg_stream.meta.checkpoint import load_checkpoint
    from emerg_stream.meta.evaluate import run_phases
    from emerg_stream.meta.metrics import PHASE_METRICS
    from emerg_stream.meta.pipeline import prepare
    from emerg_stream.phases import PHASE_LABELS, PHASES

    device = resolve_device(args.device)
    ck = load_checkpoint(args.checkpoint, device=device)
    spec = ck.meta.spec
    split = split_log(load_dataset(args.dataset, args.data_dir))
    data = prepare(split, spec)
    metrics, _ = run_phases(
        ck.model,
        data.new,
        ck.meta.warmup,
        salt=ck.meta.noise_salt,
        device=device,
        backend=args.warmup_backend,
    )
    print("| phase | " + " | ".join(PHASE_METRICS.values()) + " |")
    print("|---" * (1 + len(PHASE_METRICS)) + "|")
    for p in PHASES:
        cells = " | ".join(f"{100 * metrics[p][m]:.2f}" for m in PHASE_METRICS)
        print(f"| {PHASE_LABELS[p]} | {cells} |")
    n_items, n_test = len(data.new.items), len(data.new.test)
    print(f"model_version {ck.model_version}, {n_items} new items, {n_test} test rows")
    return 0
