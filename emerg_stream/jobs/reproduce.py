"""``emerg-stream reproduce``: the whole offline protocol, several methods and seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from emerg_stream.ablations import ABLATIONS, STRUCTURES
from emerg_stream.devices import DEVICES
from emerg_stream.methods import METHOD_NAMES

HELP = "run split, model selection, training and phased evaluation; write results.json/.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the job's flags."""
    parser.add_argument(
        "--dataset",
        required=True,
        help=(
            "preset (ml-100k, ml-1m, ml-1m-u2999, ml-1m-all, synthetic-pairs[:k=v,...]) "
            "or a dataset YAML"
        ),
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHOD_NAMES),
        help=f"comma-separated: {','.join(METHOD_NAMES)}",
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    parser.add_argument(
        "--data-dir", default=None, help="dataset folder (default: $EMERG_DATA_DIR)"
    )
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=None,
        help="max pretraining epochs that selection tries (default 8)",
    )
    parser.add_argument(
        "--meta-epochs",
        type=int,
        default=None,
        help="max meta-training epochs that selection tries (default 11)",
    )
    parser.add_argument(
        "--ablation",
        default="none",
        choices=list(ABLATIONS),
        help="an EmerG ablation of the paper or a fixed structure (baselines are unaffected)",
    )
    parser.add_argument(
        "--structure",
        default=None,
        choices=list(STRUCTURES),
        help="fix EmerG's structure instead of selecting it among all four (combines with "
        "--ablation; a quarter of EmerG's selection time or less)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="rows per pretraining step")
    parser.add_argument(
        "--processes",
        default="auto",
        help="worker processes for the selections and final runs, each with its share of "
        "the threads (default auto: one per usable CPU, one thread each, or one on a GPU; "
        "1: everything in this process, with the per-epoch progress bars)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _processes(raw: str, device: str) -> tuple[int, int]:
    """``--processes`` -> (processes, threads of each), from the process's thread budget.

    ``auto`` is one process per usable CPU on the CPU, and one process on an accelerator
    (its units queue on one device anyway, and each process would hold a context on it).
    """
    from emerg_stream.devices import resolve_device
    from emerg_stream.errors import ConfigError
    from emerg_stream.threads import resolve_threads, threads_per_process

    budget = resolve_threads()
    if raw == "auto":
        n = budget.threads if resolve_device(device).type == "cpu" else 1
    else:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"--processes must be 'auto' or a positive integer, not {raw!r}")
    return n, threads_per_process(budget, n)


def run(args: argparse.Namespace) -> int:
    """Run the protocol and print the markdown table."""
    from dataclasses import replace

    from emerg_stream.errors import ConfigError
    from emerg_stream.meta.reproduce import markdown_table, reproduce, selection_config

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad or not methods:
        raise ConfigError(f"unknown method(s) {bad}; choose from {','.join(METHOD_NAMES)}")
    if args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    processes, threads_each = _processes(args.processes, args.device)
    cfg = selection_config()
    if args.pretrain_epochs is not None:
        cfg = replace(cfg, pretrain_epochs=args.pretrain_epochs)
    if args.meta_epochs is not None:
        cfg = replace(cfg, meta_epochs=args.meta_epochs)
    if args.batch_size is not None:
        cfg = replace(cfg, batch_size=args.batch_size)
    results = reproduce(
        args.dataset,
        args.out,
        methods=methods,
        seeds=args.seeds,
        data_dir=args.data_dir,
        device=args.device,
        cfg=cfg,
        progress=not args.no_progress,
        ablation=args.ablation,
        processes=processes,
        threads_each=threads_each,
        structure=args.structure,
    )
    print(markdown_table(results), end="")
    print(f"results: {args.out / 'results.json'} ({results['wall_time_s']} s)")
    return 0
