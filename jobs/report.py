"""Thin entry point of ``emerg-stream report``: ``python jobs/report.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.report`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream report`` with this script's arguments."""
    return cli.main(["report", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
