"""``emerg-stream explain``: an item's feature graphs as heatmaps, cold and after each phase."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "render an item's adjacency matrices (cold, A, B, C) as heatmaps to PNG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the job's flags."""
    parser.add_argument("--run", required=True, type=Path, help="a reproduce run directory")
    parser.add_argument("--item", required=True, help="item id (a new item of the run)")
    parser.add_argument("--method", default="emerg")
    parser.add_argument(
        "--out", type=Path, default=None, help="PNG path (default RUN/explain-<item>.png)"
    )


def run(args: argparse.Namespace) -> int:
    """Write the PNG and print its path."""
    from emerg_stream.meta.explain import render_item_graphs

    out = args.out or args.run / f"explain-{args.item}.png"
    render_item_graphs(args.run, args.item, out, method=args.method)
    print(out)
    return 0
