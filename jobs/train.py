"""Thin entry point of ``emerg-stream train``: ``python jobs/train.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.train`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream train`` with this script's arguments."""
    return cli.main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
