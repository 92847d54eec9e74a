"""``emerg-stream split``: cut a dataset into the public cold-start split, on disk."""

from __future__ import annotations

import argparse
import time

HELP = "Cut a dataset into the public cold-start split (old / warm-a / warm-b / warm-c / test)."
#: No torch here: the command line does not import it to set its threads.
USES_TORCH = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        help="preset (ml-100k, ml-1m, ml-1m-u2999, ml-1m-all, taobao) or a dataset YAML's path",
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder holding the dataset folders ($EMERG_DATA_DIR)"
    )
    parser.add_argument("--out", required=True, help="output folder (parquet parts + manifest)")
    parser.add_argument("--n", type=int, default=None, help="override N (old items have > N rows)")
    parser.add_argument("--k", type=int, default=None, help="override K (rows per warm-up phase)")


def run(args: argparse.Namespace) -> int:
    import structlog

    from emerg_stream.data import PARTS, load_dataset, split_log, write_split

    log = structlog.get_logger("jobs.split")
    started = time.perf_counter()
    interactions = load_dataset(args.dataset, args.data_dir)
    split = split_log(interactions, n=args.n, k=args.k)
    manifest = write_split(split, args.out)
    log.info(
        "split_written",
        dataset=split.name,
        out=str(args.out),
        rows=manifest["row_counts"],
        seconds=round(time.perf_counter() - started, 2),
    )
    print(f"dataset {split.name}: N={split.n} K={split.k} -> {args.out}")
    print(f"{'part':<8}{'rows':>10}{'items':>8}")
    for part in PARTS:
        print(f"{part:<8}{manifest['row_counts'][part]:>10,}{manifest['item_counts'][part]:>8,}")
    dropped = f"{split.dropped_items:,} items ({split.dropped_rows:,} rows)"
    print(f"dropped {dropped} with fewer than 3K rows")
    return 0
