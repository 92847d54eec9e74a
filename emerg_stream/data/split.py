"""The public cold-start split (MetaE / MWUF / CVAR / EmerG) and its on-disk form.

``split(N, K)``: per item, rows sorted by timestamp (ties keep file order). An item
with more than N rows is *old*: all its rows go to ``old`` (pretraining and
meta-training). An item with 3K..N rows (inclusive) is *new*: its rows go
``[0, K) -> warm_a``, ``[K, 2K) -> warm_b``, ``[2K, 3K) -> warm_c``, the rest -> ``test``.
Items with fewer than 3K rows are dropped (counted in the manifest).

Every part is ordered by item (in order of first appearance in the log), then time,
then file order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from emerg_stream.data._files import sha256_file
from emerg_stream.data.log import InteractionLog, LogSchema, schema_from_dict, schema_to_dict
from emerg_stream.errors import ConfigError, DataError
from emerg_stream.phases import OLD, WARM_PHASES, WarmupSchedule

#: Part names, in manifest order.
PARTS = (OLD, *WARM_PHASES, "test")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass
class Split:
    """The five parts of a split plus what produced them.

    Args:
        old: All rows of old items (more than N rows each).
        warm_a: Rows [0, K) of each new item.
        warm_b: Rows [K, 2K) of each new item.
        warm_c: Rows [2K, 3K) of each new item.
        test: The remaining rows of each new item.
        n: The split's N.
        k: The split's K.
        schema: Column roles (shared by every part).
        name: Dataset name (a holdout split appends a suffix).
        dropped_items: Items with fewer than 3K rows, left out.
        dropped_rows: Their rows.
        sources: Input file -> sha256, from the log.
    """

    old: pa.Table
    warm_a: pa.Table
    warm_b: pa.Table
    warm_c: pa.Table
    test: pa.Table
    n: int
    k: int
    schema: LogSchema
    name: str
    dropped_items: int = 0
    dropped_rows: int = 0
    sources: dict[str, str] = field(default_factory=dict)

    def part(self, name: str) -> pa.Table:
        """The table of part ``name`` (one of :data:`PARTS`)."""
        if name not in PARTS:
            raise ConfigError(f"unknown split part {name!r}; parts are {PARTS}")
        table: pa.Table = getattr(self, name)
        return table

    def row_counts(self) -> dict[str, int]:
        """Rows per part."""
        return {p: self.part(p).num_rows for p in PARTS}

    def item_counts(self) -> dict[str, int]:
        """Distinct items per part."""
        return {
            p: len(pc.unique(self.part(p).column(self.schema.item_id).combine_chunks()))
            for p in PARTS
        }


def _check_nk(n: int, k: int) -> None:
    if k < 1 or n < 1:
        raise ConfigError(f"split needs n >= 1 and k >= 1, got n={n}, k={k}")
    if n < WarmupSchedule(k).protocol_rows:
        raise ConfigError(f"split needs n >= 3k (a new item has 3K..N rows), got n={n}, k={k}")


def _item_order(table: pa.Table, schema: LogSchema) -> tuple[npt.NDArray[np.int64], ...]:
    """Sort rows by (item, time, file order).

    Returns:
        ``(order, rank, count)``, each shape [R]: ``order`` the row permutation; for each
        position of it, the row's rank within its item and the item's row count.
    """
    for col in (schema.item_id, schema.timestamp):
        if col not in table.column_names:
            raise DataError(f"the log has no column '{col}'")
        if table.column(col).null_count:
            raise DataError(f"column '{col}' holds nulls; every row needs an item and a time")
    codes = np.asarray(
        pc.dictionary_encode(table.column(schema.item_id).combine_chunks()).indices, np.int64
    )
    ts = np.asarray(table.column(schema.timestamp).combine_chunks(), np.int64)
    order = np.lexsort((np.arange(len(codes)), ts, codes)).astype(np.int64)
    sorted_codes = codes[order]
    counts = np.bincount(codes).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(codes), dtype=np.int64) - starts[sorted_codes]
    return order, rank, counts[sorted_codes]


def _phase_parts(
    table: pa.Table, order: npt.NDArray[np.int64], rank: npt.NDArray[np.int64], k: int
) -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
    """Cut (already selected, sorted) rows into warm_a, warm_b, warm_c, test by rank."""
    chunk = WarmupSchedule(k).protocol_part(rank)
    parts = tuple(table.take(pa.array(order[chunk == c])) for c in range(len(WARM_PHASES) + 1))
    return parts[0], parts[1], parts[2], parts[3]


def split_log(log: InteractionLog, n: int | None = None, k: int | None = None) -> Split:
    """Apply the public split to a log.

    Args:
        log: The interaction log.
        n: Items with more than ``n`` rows are old (default: ``log.n``).
        k: Rows per warm-up phase (default: ``log.k``).

    Returns:
        The split.

    Raises:
        ConfigError: ``n < 3k`` or a non-positive ``n`` / ``k``.
        DataError: Null item ids or timestamps.
    """
    n = log.n if n is None else n
    k = log.k if k is None else k
    _check_nk(n, k)
    table = log.table
    order, rank, count = _item_order(table, log.schema)
    is_old = count > n
    is_new = (count >= WarmupSchedule(k).protocol_rows) & (count <= n)
    dropped = ~(is_old | is_new)
    warm_a, warm_b, warm_c, test = _phase_parts(table, order[is_new], rank[is_new], k)
    return Split(
        old=table.take(pa.array(order[is_old])),
        warm_a=warm_a,
        warm_b=warm_b,
        warm_c=warm_c,
        test=test,
        n=n,
        k=k,
        schema=log.schema,
        name=log.name,
        dropped_items=int(np.count_nonzero(dropped & (rank == 0))),
        dropped_rows=int(np.count_nonzero(dropped)),
        sources=dict(log.sources),
    )


#: How :func:`holdout_validation` picks its pseudo-new items.
HoldoutPick = Literal["random", "fewest_rows"]


def holdout_validation(
    split: Split,
    frac: float = 0.2,
    seed: int = 0,
    max_test_rows: int | None = None,
    pick: HoldoutPick = "random",
) -> Split:
    """A validation split made from old items only, for model selection.

    ``round(frac * #old items)`` old items become pseudo-new items: their time-sorted
    rows go to warm_a / warm_b / warm_c by K-chunks, the rest to test. The other old
    items stay ``old``. The real new items of ``split`` are never read.

    Which old items: drawn from the sorted old item ids with
    ``numpy.random.default_rng(seed)`` (so the choice depends only on the ids, not on row
    order). ``pick="random"`` draws them at random; ``pick="fewest_rows"`` holds out the
    items with the fewest rows, ties broken by a random permutation. Old items have more
    than N rows and new items at most N, so the least-rated old items are the ones most
    like new items (popularity-matched pseudo-new items).

    Args:
        split: The public split.
        frac: Fraction of old items held out, in (0, 1).
        seed: Seed of the draw.
        max_test_rows: Keep at most this many test rows per pseudo-new item (the first
            ones in time). ``split.n - 3 * split.k`` makes pseudo-new items look like
            real new items, which never have more; ``None`` keeps every row.
        pick: ``random`` or ``fewest_rows`` (above).

    Returns:
        The validation split (same n, k, schema, sources; name ``<name>.holdout``).

    Raises:
        ConfigError: ``frac`` outside (0, 1).
    """
    if not 0.0 < frac < 1.0:
        raise ConfigError(f"holdout frac must be in (0, 1), got {frac}")
    if pick not in ("random", "fewest_rows"):
        raise ConfigError(f"holdout pick must be 'random' or 'fewest_rows', got {pick!r}")
    old = split.old
    ids = old.column(split.schema.item_id).combine_chunks()
    counted = pc.value_counts(ids)
    names = np.asarray(counted.field("values").to_pylist(), dtype=object)
    by_id = np.argsort(names.astype(str), kind="stable")
    unique, counts = names[by_id], counted.field("counts").to_numpy()[by_id]
    n_hold = round(frac * len(unique))
    rng = np.random.default_rng(seed)
    if pick == "random":
        held = unique[rng.choice(len(unique), size=n_hold, replace=False)]
    else:
        order = rng.permutation(len(unique))
        held = unique[order[np.argsort(counts[order], kind="stable")][:n_hold]]
    is_held = np.asarray(pc.is_in(ids, value_set=pa.array(held.tolist(), pa.string())))
    keep = old.filter(pa.array(~is_held))
    pseudo = old.filter(pa.array(is_held))
    order, rank, _ = _item_order(pseudo, split.schema)
    if max_test_rows is not None:
        within = rank < WarmupSchedule(split.k).protocol_rows + max_test_rows
        order, rank = order[within], rank[within]
    warm_a, warm_b, warm_c, test = _phase_parts(pseudo, order, rank, split.k)
    return Split(
        old=keep,
        warm_a=warm_a,
        warm_b=warm_b,
        warm_c=warm_c,
        test=test,
        n=split.n,
        k=split.k,
        schema=split.schema,
        name=f"{split.name}.holdout",
        sources=dict(split.sources),
    )


def write_split(split: Split, out_dir: str | Path) -> dict[str, Any]:
    """Write each part as ``<part>.parquet`` plus ``manifest.json`` (written last).

    Args:
        split: The split.
        out_dir: Folder to write into (created if needed; existing parts are replaced).

    Returns:
        The manifest: name, n, k, schema, ``row_counts`` and ``item_counts`` per part,
        dropped items and rows, sha256 of every input file (``sources``) and of every
        written parquet (``files``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for p in PARTS:
        path = out / f"{p}.parquet"
        pq.write_table(split.part(p), path)
        files[path.name] = sha256_file(path)
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "name": split.name,
        "n": split.n,
        "k": split.k,
        "row_counts": split.row_counts(),
        "item_counts": split.item_counts(),
        "dropped_items": split.dropped_items,
        "dropped_rows": split.dropped_rows,
        "sources": dict(sorted(split.sources.items())),
        "files": files,
        "schema": schema_to_dict(split.schema),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf8")
    tmp.replace(out / MANIFEST)
    return manifest


def read_split(split_dir: str | Path) -> Split:
    """Read a split written by :func:`write_split`, checking every parquet's sha256.

    Args:
        split_dir: The folder holding ``manifest.json`` and the parts.

    Returns:
        The split.

    Raises:
        DataError: The manifest or a part is missing, unreadable, or a part's sha256 is
            not the one in the manifest.
    """
    folder = Path(split_dir)
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"missing split manifest: {path}")
    try:
        manifest = json.loads(path.read_text(encoding="utf8"))
        schema = schema_from_dict(manifest["schema"])
        n, k, name = int(manifest["n"]), int(manifest["k"]), str(manifest["name"])
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a valid split manifest: {exc}") from exc
    tables: dict[str, pa.Table] = {}
    for p in PARTS:
        part_path = folder / f"{p}.parquet"
        if not part_path.is_file():
            raise DataError(f"missing split part: {part_path}")
        digest = sha256_file(part_path)
        if digest != files.get(part_path.name):
            raise DataError(
                f"{part_path}: sha256 {digest} differs from the manifest's "
                f"{files.get(part_path.name)}; the split was changed after it was written"
            )
        tables[p] = pq.read_table(part_path)
    return Split(
        **tables,
        n=n,
        k=k,
        schema=schema,
        name=name,
        dropped_items=int(manifest.get("dropped_items", 0)),
        dropped_rows=int(manifest.get("dropped_rows", 0)),
        sources=dict(manifest.get("sources", {})),
    )
