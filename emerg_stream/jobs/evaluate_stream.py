"""``emerg-stream evaluate-stream``: the per-phase table from what the stream published.

Reads the item-params topic to its end, scores every new item's held-out test rows with
the params in force after each phase, and prints the offline ``reproduce`` table for the
stream (and, with ``--offline``, for the offline protocol on the same checkpoint), plus
the live prequential AUC from the predictions topic. See
:mod:`emerg_stream.serving.stream_eval`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emerg_stream.backends import WARMUP_BACKENDS

HELP = "Per-phase AUC (pooled, within-, between-item), F1 of the published params (+ prequential)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="preset (ml-100k, ...) or dataset YAML")
    parser.add_argument("--data-dir", default=None, help="dataset folder")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory")
    parser.add_argument(
        "--offline", action="store_true", help="also run the offline protocol, side by side"
    )
    parser.add_argument(
        "--no-prequential", action="store_true", help="skip reading the predictions topic"
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="score items without published params with local cold-start params",
    )
    parser.add_argument(
        "--warmup-backend",
        default="auto",
        choices=WARMUP_BACKENDS,
        help="--offline: the warm-up backend of the offline protocol (the worker's "
        "EMERG_WARMUP_BACKEND, for an exact comparison; default auto)",
    )
    parser.add_argument("--bootstrap", default=None, help="bootstrap servers (overrides settings)")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline per topic read, s")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from emerg_stream.config import Settings, load_settings
    from emerg_stream.data import load_dataset
    from emerg_stream.meta.checkpoint import load_checkpoint
    from emerg_stream.serving.stream_eval import (
        comparison_table,
        evaluate_stream,
        prequential_table,
    )

    overrides = {"kafka": {"bootstrap_servers": args.bootstrap}} if args.bootstrap else None
    settings = load_settings(Settings, overrides)
    checkpoint = load_checkpoint(args.checkpoint)
    ev = evaluate_stream(
        checkpoint,
        load_dataset(args.dataset, args.data_dir),
        settings.kafka.as_librdkafka(),
        settings.topics.item_params,
        predictions_topic=None if args.no_prequential else settings.topics.predictions,
        offline=args.offline,
        allow_missing=args.allow_missing,
        timeout_s=args.timeout,
        warmup_backend=args.warmup_backend,
    )
    print(comparison_table(ev), end="")
    print(
        f"model_version {ev.model_version}: {ev.n_items} new items, {ev.n_test_rows} test rows, "
        f"{ev.params_records} params records, {len(ev.missing_items)} items without params"
    )
    for phase, cov in ev.coverage.items():
        print(
            f"  {phase:<7} own params {cov['published']}, earlier phase {cov['earlier']}, "
            f"local cold start {cov['fallback']}"
        )
    if ev.prequential:
        parts = [f"{k} {100 * v['auc']:.2f} (n={int(v['n'])})" for k, v in ev.prequential.items()]
        print("prequential AUC: " + ", ".join(parts))
    if ev.prequential_methods:
        print("prequential AUC per method (shadow beside primary, on the clicks both scored):")
        print(prequential_table(ev.prequential_methods), end="")
    if args.json is not None:
        args.json.write_text(json.dumps(ev.to_dict(), indent=2) + "\n")
    return 0
