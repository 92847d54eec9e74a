"""File helpers shared by the dataset readers: hashing, strict delimited parsing.

Every parse error becomes a :class:`~emerg_stream.errors.DataError` that names the file
and the physical line number (1-based, header and empty lines counted), so a user can
open the file at the broken row.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from emerg_stream.errors import DataError

_CHUNK = 1 << 20
#: Stands in for a multi-character separator (``::``) so pyarrow's one-byte parser works.
_SUBST = b"\x1f"
_ROW_RE = re.compile(r"Row #(\d+)")
_COL_RE = re.compile(r"In CSV column #(\d+)")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Args:
        path: File to hash.

    Returns:
        The lowercase hex digest.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_key(path: Path) -> str:
    """How a file is named in ``InteractionLog.sources``: ``<folder>/<file>``.

    Portable across machines (no absolute path), and enough to tell the files apart.
    """
    return f"{path.parent.name}/{path.name}"


def require_file(path: Path, hint: str) -> Path:
    """Return ``path`` if it is a file, else raise a :class:`DataError` saying how to fix it.

    Args:
        path: The file a reader needs.
        hint: What to tell the user (e.g. how to set ``EMERG_DATA_DIR``).

    Raises:
        DataError: The file does not exist.
    """
    if not path.is_file():
        raise DataError(f"missing dataset file: {path} ({hint})")
    return path


def read_delimited(
    path: Path,
    columns: Sequence[str],
    types: Mapping[str, pa.DataType],
    *,
    delimiter: str,
    encoding: str = "utf8",
    header: bool = False,
) -> pa.Table:
    """Parse a delimited text file strictly into a table.

    No quoting, no escapes (MovieLens titles hold quotes and commas); empty lines are
    rows (and so an error for any non-string column); a string field is never null (an
    empty field is ``""``). Only ``types`` columns are converted; the rest stay strings.

    Args:
        path: The file.
        columns: Expected column names, in file order. With ``header=True`` the header
            line (whitespace-stripped names) must contain them, in any order.
        types: Column name -> arrow type to convert to (e.g. ``pa.int64()``).
        delimiter: Field separator; may be several characters (``"::"``).
        encoding: Text encoding of the file (``"latin-1"`` for MovieLens titles).
        header: Whether the first line is a header.

    Returns:
        The table with ``columns`` (in the given order).

    Raises:
        DataError: A row with the wrong number of fields or a value that does not
            convert, naming the file and line; a header without a required column.
    """
    first_line = 0
    names = list(columns)
    if header:
        with path.open("rb") as fh:
            head = fh.readline().decode(encoding).rstrip("\r\n")
        names = [c.strip() for c in head.split(delimiter)]
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path}: line 1: header {names} lacks column(s) {missing}")
        first_line = 1

    source: pa.NativeFile | str
    if len(delimiter.encode(encoding)) == 1:
        source = str(path)
        sep = delimiter
    else:
        raw = path.read_bytes()
        if _SUBST in raw:
            raise DataError(f"{path}: holds the control byte 0x1f; cannot parse {delimiter!r}")
        source = pa.BufferReader(raw.rstrip(b"\r\n").replace(delimiter.encode(encoding), _SUBST))
        sep = _SUBST.decode()

    bad_rows: list[tuple[int | None, int, int, str]] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:
        bad_rows.append((row.number, row.expected_columns, row.actual_columns, row.text))
        return "error"

    try:
        table = pcsv.read_csv(
            source,
            read_options=pcsv.ReadOptions(
                column_names=names,
                skip_rows=first_line,
                encoding=encoding,
                use_threads=False,  # physical row numbers are only known single-threaded
                block_size=1 << 24,
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=sep,
                quote_char=False,
                escape_char=False,
                ignore_empty_lines=False,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={c: types.get(c, pa.string()) for c in columns},
                include_columns=list(columns),
                null_values=[],
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowCancelled as exc:  # arrow turns SIGINT into this; it is Ctrl-C
        raise KeyboardInterrupt(str(exc)) from exc
    except pa.ArrowInvalid as exc:
        raise _parse_error(path, exc, bad_rows, names, delimiter, sep) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    return table


def _parse_error(
    path: Path,
    exc: pa.ArrowInvalid,
    bad_rows: list[tuple[int | None, int, int, str]],
    names: Sequence[str],
    delimiter: str,
    sep: str,
) -> DataError:
    if bad_rows:
        number, expected, actual, text = bad_rows[0]
        where = f"line {number}" if number is not None else "a line"
        shown = text.replace(sep, delimiter)
        return DataError(f"{path}: {where}: expected {expected} fields, got {actual}: {shown!r}")
    msg = str(exc)
    row = _ROW_RE.search(msg)
    col = _COL_RE.search(msg)
    where = f"line {row.group(1)}" if row else "a line"
    what = msg.split(":", 2)[-1].strip() if row else msg
    if col is not None and int(col.group(1)) < len(names):
        what = f"column '{names[int(col.group(1))]}': {what}"
    return DataError(f"{path}: {where}: {what}")


def check_range(
    values: npt.NDArray[np.int64],
    low: int,
    high: int,
    *,
    path: Path,
    column: str,
    first_line: int = 1,
) -> None:
    """Raise a :class:`DataError` at the first value outside ``[low, high]``.

    Args:
        values: Parsed integers, one per data row, shape [N].
        low: Smallest allowed value.
        high: Largest allowed value.
        path: File the values came from (for the message).
        column: Column name (for the message).
        first_line: Physical line number of the first data row.
    """
    bad = np.flatnonzero((values < low) | (values > high))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{path}: line {first_line + i}: {column} {int(values[i])} is outside [{low}, {high}]"
        )


def check_unique(
    ids: npt.NDArray[np.int64], *, path: Path, column: str, first_line: int = 1
) -> None:
    """Raise a :class:`DataError` at the first repeated id of a lookup table.

    Args:
        ids: One id per data row, shape [N].
        path: File the ids came from.
        column: Column name.
        first_line: Physical line number of the first data row.
    """
    _, first = np.unique(ids, return_index=True)
    if first.size == ids.size:
        return
    repeated = np.ones(ids.size, dtype=bool)
    repeated[first] = False
    i = int(np.flatnonzero(repeated)[0])
    raise DataError(f"{path}: line {first_line + i}: {column} {int(ids[i])} appears twice")


def int_ids_to_str(values: pa.ChunkedArray) -> pa.Array:
    """Integer ids -> their canonical decimal strings (``"007"`` and ``"7"`` agree)."""
    return pc.cast(values.combine_chunks(), pa.string())


def empty_to_null(values: pa.ChunkedArray, extra: Sequence[str] = ()) -> pa.Array:
    """Strip a string column; ``""`` and the ``extra`` markers (e.g. ``"NULL"``) -> null."""
    stripped = pc.utf8_trim_whitespace(values.combine_chunks())
    nulls = pc.is_in(stripped, value_set=pa.array(["", *extra], pa.string()))
    return pc.if_else(nulls, pa.scalar(None, pa.string()), stripped)


def take_rows(table: pa.Table, key: pa.Array, lookup: pa.Array) -> tuple[pa.Table, int]:
    """Join a lookup table onto rows by key, keeping the rows' order.

    Args:
        table: The lookup table (one row per key), e.g. the items file.
        key: The key of every interaction row, shape [N].
        lookup: The key column of ``table``.

    Returns:
        ``table``'s rows in the order of ``key`` (all-null where a key is unknown), and
        the number of rows whose key was unknown.
    """
    idx = pc.index_in(key, value_set=lookup)
    return table.take(idx), int(idx.null_count)
