"""Shared fixtures. Others may append fixtures below; keep each one documented."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pytest

from emerg_stream.data.log import ColumnSpec, InteractionLog, LogSchema

# One intra-op thread per test process: the suite runs the broker, worker subprocesses
# and torch side by side on 2 cores, where OpenMP threads spinning against each other
# made torch 6-8x slower. Set before any test module imports torch; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_data_dir() -> Path | None:
    """The real datasets' folder: ``$EMERG_DATA_DIR``, else ``<repo>/../shared/data``."""
    env = os.environ.get("EMERG_DATA_DIR")
    candidate = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def cxx_compiler() -> str:
    """The C++ compiler that builds the CPU kernel; skips the test without one."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler (c++ or $CXX): the CPU kernel cannot be built")
    return cxx


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real datasets' folder; skips the test when it is absent."""
    found = find_data_dir()
    if found is None:
        pytest.skip("real data absent: set EMERG_DATA_DIR or provide ../shared/data")
    return found


#: Schema of the logs built by ``make_log``: one feature of each kind per side.
TINY_SCHEMA = LogSchema(
    item_id="item",
    user_id="user",
    label="label",
    timestamp="ts",
    item_features=(
        ColumnSpec("cat", "categorical", "item"),
        ColumnSpec("tags", "multi", "item", max_len=3),
        ColumnSpec("price", "numeric", "item"),
    ),
    user_features=(ColumnSpec("city", "categorical", "user"),),
)

Row = tuple[str, str, int, int]


@pytest.fixture
def make_log() -> Callable[..., InteractionLog]:
    """Factory: ``make_log(rows, n=..., k=...)`` with rows ``(item, user, ts, label)``.

    Features are derived from the ids (``cat`` = item id's first letter, ``tags`` = two
    tags, ``price`` = row position, ``city`` = user id's last letter); a ``seq`` column
    holds each row's position in the file, to check ordering.
    """

    def build(rows: Sequence[Row], n: int = 9, k: int = 2, name: str = "tiny") -> InteractionLog:
        items = [r[0] for r in rows]
        users = [r[1] for r in rows]
        table = pa.table(
            {
                "item": pa.array(items, pa.string()),
                "user": pa.array(users, pa.string()),
                "ts": pa.array([r[2] for r in rows], pa.int64()),
                "label": pa.array([r[3] for r in rows], pa.int8()),
                "cat": pa.array([i[:1] for i in items], pa.string()),
                "tags": pa.array([[f"t{i[:1]}", "common"] for i in items], pa.list_(pa.string())),
                "price": pa.array([float(j) for j in range(len(rows))], pa.float64()),
                "city": pa.array([u[-1:] for u in users], pa.string()),
                "seq": pa.array(range(len(rows)), pa.int64()),
            }
        )
        return InteractionLog(name=name, table=table, schema=TINY_SCHEMA, n=n, k=k)

    return build


@pytest.fixture(autouse=True)
def _reset_structlog():
    """Tests that call ``cli.main`` configure logging onto captured streams; undo it."""
    import structlog

    yield
    structlog.reset_defaults()


@pytest.fixture
def restore_benchmark_globals() -> Iterator[None]:
    """Give back what a benchmark script's ``main`` sets: torch threads and structlog."""
    import structlog
    import torch

    threads = torch.get_num_threads()
    config = structlog.get_config()
    yield
    torch.set_num_threads(threads)
    structlog.reset_defaults()
    structlog.configure(**config)
