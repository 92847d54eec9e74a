"""Thin entry point of ``emerg-stream reproduce``: ``python jobs/reproduce.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.reproduce`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream reproduce`` with this script's arguments."""
    return cli.main(["reproduce", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
