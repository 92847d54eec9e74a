"""``emerg-stream train``: select the protocol on pseudo-new items and train one checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from emerg_stream.devices import DEVICES
from emerg_stream.methods import METHOD_NAMES

HELP = "train one method (with model selection) and save a verified checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the job's flags."""
    parser.add_argument("--dataset", required=True, help="preset or dataset YAML")
    parser.add_argument("--method", default=METHOD_NAMES[0], choices=METHOD_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Train and save ``OUT/checkpoints/<method>-seed<seed>``."""
    from emerg_stream.meta.reproduce import markdown_table, reproduce, selection_config

    # A single-seed reproduce of one method is exactly "train, then evaluate".
    results = reproduce(
        args.dataset,
        args.out,
        methods=(args.method,),
        seeds=1,
        data_dir=args.data_dir,
        device=args.device,
        cfg=selection_config(seed=args.seed),
        progress=not args.no_progress,
    )
    print(markdown_table(results), end="")
    print(f"checkpoint: {args.out / 'checkpoints' / f'{args.method}-seed0'}")
    return 0
