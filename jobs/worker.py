"""Thin entry point of ``emerg-stream worker``: ``python jobs/worker.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.worker`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream worker`` with this script's arguments."""
    return cli.main(["worker", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
