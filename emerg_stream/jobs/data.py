"""``emerg-stream data``: download the public MovieLens archives, or verify a local copy.

``fetch`` downloads from GroupLens (or ``$EMERG_DATA_URL``), checks every file the
readers use against a pinned sha256 and installs the folder atomically under
``--dest`` (default ``$EMERG_DATA_DIR``, else ``~/.cache/emerg-stream/data``).
``verify`` checks a folder you copied by hand. ``list`` shows what is known and present.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "download the MovieLens datasets (verified by sha256) or verify a local copy"
#: No torch here: the command line does not import it to set its threads.
USES_TORCH = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=["fetch", "verify", "list"], help="download / check / show datasets"
    )
    parser.add_argument("name", nargs="?", help="dataset: ml-100k or ml-1m (not for list)")
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="folder holding the dataset folders "
        "(default: $EMERG_DATA_DIR, else ~/.cache/emerg-stream/data)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing folder that does not verify"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout, s")


def run(args: argparse.Namespace) -> int:
    import sys

    from emerg_stream.data.datasets import DATA_DIR_ENV
    from emerg_stream.data.fetch import ARCHIVES, default_data_dir, fetch, verify
    from emerg_stream.errors import ConfigError

    root: Path = (args.dest or default_data_dir()).expanduser()
    if args.action == "list":
        for name in ARCHIVES:
            folder = root / name
            if not folder.exists():
                state = "absent"
            else:
                n = len(verify(folder, name))
                state = "ok" if n == 0 else f"bad ({n} problem(s): emerg-stream data verify {name})"
            print(f"{name:<10} {state:<7} {folder}")
        return 0
    if not args.name:
        raise ConfigError(f"`data {args.action}` needs a dataset name: one of {sorted(ARCHIVES)}")
    if args.action == "verify":
        problems = verify(root / args.name, args.name)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            return 1
        print(f"{root / args.name}: all {len(ARCHIVES[args.name].files)} pinned files verify")
        return 0
    progress = not args.no_progress and sys.stderr.isatty()
    folder = fetch(args.name, root, force=args.force, progress=progress, timeout_s=args.timeout)
    print(folder)
    if folder.parent.resolve() != _env_dir():
        print(
            f"use it with: export {DATA_DIR_ENV}={folder.parent}   (or --data-dir {folder.parent})",
            file=sys.stderr,
        )
    return 0


def _env_dir() -> Path | None:
    import os

    env = os.environ.get("EMERG_DATA_DIR")
    return Path(env).expanduser().resolve() if env else None
