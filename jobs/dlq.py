"""Thin entry point of ``emerg-stream dlq``: ``python jobs/dlq.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.dlq`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream dlq`` with this script's arguments."""
    return cli.main(["dlq", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
