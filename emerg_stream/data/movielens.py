"""MovieLens-100K and MovieLens-1M readers.

Both produce the same columns, so one feature configuration serves both:

===============  ============  =====  ====================================================
column           arrow type    side   content
===============  ============  =====  ====================================================
``item_id``      string        item   movie id (the item id field)
``year``         string        item   the year in the title's trailing ``(1995)``; null if none
``title_words``  list<string>  item   lowercase word tokens of the title without the year
``genres``       list<string>  item   genre names
``user_id``      string        user   user id
``gender``       string        user   ``M`` / ``F``
``age``          string        user   age (100K: years; 1M: the age-group code)
``occupation``   string        user   occupation (100K: name; 1M: code)
``zip``          string        user   zip code as written
``label``        int8          -      1 if rating >= 4
``timestamp``    int64         -      unix seconds
``rating``       int8          -      the raw 1..5 rating (not a feature)
``title``        string        -      the raw title (not a feature; for people reading output)
===============  ============  =====  ====================================================
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog

from emerg_stream.data._files import (
    check_range,
    check_unique,
    int_ids_to_str,
    read_delimited,
    require_file,
    sha256_file,
    source_key,
    take_rows,
)
from emerg_stream.data.log import ColumnSpec, InteractionLog, LogSchema
from emerg_stream.errors import DataError

log = structlog.get_logger(__name__)

#: sha256 of the official MovieLens-1M ``ratings.dat`` (1,000,209 lines).
ML1M_RATINGS_SHA256 = "506d64ca44484487c11dc2d9a28de5c54948213e6b96285e298afe28d6ea4e0f"

#: The untimed copy of all MovieLens-1M ratings, inside the ``ml-1m`` folder
#: (``ml-1m-all``; its PROVENANCE.md says where it comes from).
ML1M_UNTIMED_RATINGS = "supplementary/ratings_all_no_timestamp.csv"

#: Seed of the random order that stands in for time in the untimed ratings.
UNTIMED_ORDER_SEED = 0

#: The 19 genre flags of ``u.item``, in file order (``u.genre``).
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

TITLE_MAX_LEN = 8
GENRES_MAX_LEN = 6

MOVIELENS_SCHEMA = LogSchema(
    item_id="item_id",
    user_id="user_id",
    label="label",
    timestamp="timestamp",
    item_features=(
        ColumnSpec("year", "categorical", "item"),
        ColumnSpec("title_words", "multi", "item", max_len=TITLE_MAX_LEN),
        ColumnSpec("genres", "multi", "item", max_len=GENRES_MAX_LEN),
    ),
    user_features=(
        ColumnSpec("gender", "categorical", "user"),
        ColumnSpec("age", "categorical", "user"),
        ColumnSpec("occupation", "categorical", "user"),
        ColumnSpec("zip", "categorical", "user"),
    ),
)

_YEAR_RE = r"\((?P<year>\d{4})\)\s*$"
_HINT = "set EMERG_DATA_DIR (or pass --data-dir) to the folder that holds the dataset folders"

_I64 = pa.int64()


def read_movielens_100k(
    folder: str | Path, *, n: int = 100, k: int = 10, name: str = "ml-100k"
) -> InteractionLog:
    """Read MovieLens-100K (``u.data``, ``u.item``, ``u.user``).

    Args:
        folder: The ``ml-100k`` folder.
        n: The split's N.
        k: The split's K.
        name: Dataset name recorded in the log.

    Returns:
        The log; columns as in the module docstring.

    Raises:
        DataError: A file is missing or holds a row that cannot be parsed.
    """
    folder = Path(folder)
    data_p = require_file(folder / "u.data", _HINT)
    item_p = require_file(folder / "u.item", _HINT)
    user_p = require_file(folder / "u.user", _HINT)

    ratings = read_delimited(
        data_p,
        ["user", "item", "rating", "ts"],
        {"user": _I64, "item": _I64, "rating": _I64, "ts": _I64},
        delimiter="\t",
    )
    flags = [f"g{i}" for i in range(len(ML100K_GENRES))]
    items = read_delimited(
        item_p,
        ["id", "title", "release", "video", "url", *flags],
        {"id": _I64, **dict.fromkeys(flags, pa.int8())},
        delimiter="|",
        encoding="latin-1",
    )
    users = read_delimited(
        user_p,
        ["id", "age", "gender", "occupation", "zip"],
        {"id": _I64, "age": _I64},
        delimiter="|",
    )

    ids = items.column("id").to_numpy()
    check_unique(ids, path=item_p, column="movie id")
    flag_matrix = np.stack([items.column(f).to_numpy() for f in flags], axis=1)  # [I, 19]
    for j, genre in enumerate(ML100K_GENRES):
        check_range(flag_matrix[:, j], 0, 1, path=item_p, column=f"genre flag {genre!r}")
    rows, cols = np.nonzero(flag_matrix)  # row-major: genres of an item stay in file order
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(ids)))])
    genres = pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(np.asarray(ML100K_GENRES, dtype=object)[cols])
    )
    item_table = _item_table(items.column("id"), items.column("title").combine_chunks(), genres)

    uids = users.column("id").to_numpy()
    check_unique(uids, path=user_p, column="user id")
    user_table = pa.table(
        {
            "user_id": int_ids_to_str(users.column("id")),
            "gender": users.column("gender").combine_chunks(),
            "age": pc.cast(users.column("age").combine_chunks(), pa.string()),
            "occupation": users.column("occupation").combine_chunks(),
            "zip": users.column("zip").combine_chunks(),
        }
    )
    return _assemble(
        name, ratings, data_p, item_table, user_table, (data_p, item_p, user_p), n=n, k=k
    )


def read_movielens_1m(
    folder: str | Path,
    *,
    ratings_file: str = "ratings.dat",
    n: int = 200,
    k: int = 20,
    name: str = "ml-1m",
) -> InteractionLog:
    """Read MovieLens-1M in its official ``::`` format.

    ``ratings_file`` may be the official ``ratings.dat`` or any file in the same format
    (e.g. ``ratings_users0001-2999.dat``). When it is named ``ratings.dat`` and its
    sha256 is not the official one, a warning is logged and reading goes on.

    Args:
        folder: The ``ml-1m`` folder (holds ``users.dat``, ``movies.dat``).
        ratings_file: The ratings file inside ``folder``
            (``UserID::MovieID::Rating::Timestamp``).
        n: The split's N.
        k: The split's K.
        name: Dataset name recorded in the log.

    Returns:
        The log; columns as in the module docstring.

    Raises:
        DataError: A file is missing or holds a row that cannot be parsed.
    """
    folder = Path(folder)
    ratings_p = require_file(folder / ratings_file, _HINT)
    ratings = read_delimited(
        ratings_p,
        ["user", "item", "rating", "ts"],
        {"user": _I64, "item": _I64, "rating": _I64, "ts": _I64},
        delimiter="::",
    )
    item_table, user_table, movies_p, users_p = _ml1m_items_and_users(folder)
    out = _assemble(
        name, ratings, ratings_p, item_table, user_table, (ratings_p, movies_p, users_p), n=n, k=k
    )
    if ratings_p.name == "ratings.dat":
        digest = out.sources[source_key(ratings_p)]
        if digest != ML1M_RATINGS_SHA256:
            log.warning(
                "ratings_sha256_mismatch",
                path=str(ratings_p),
                expected=ML1M_RATINGS_SHA256,
                actual=digest,
                rows=out.table.num_rows,
            )
    return out


def read_movielens_1m_untimed(
    folder: str | Path,
    *,
    ratings_file: str = ML1M_UNTIMED_RATINGS,
    n: int = 200,
    k: int = 20,
    name: str = "ml-1m-all",
    order_seed: int = UNTIMED_ORDER_SEED,
) -> InteractionLog:
    """Read all 1,000,209 MovieLens-1M ratings from the untimed CSV copy.

    The file (``user_id,movie_id,rating,...`` with a header; PROVENANCE.md of the data
    folder) has every user's ratings but **no timestamps**. The ``timestamp`` column is
    therefore a seeded random order: row r gets entry r of a random permutation of
    0..R−1 drawn with ``order_seed`` (R = the rows kept). The split takes each item's
    rows in that order, so a new item's warm-up and test rows are a random partition of
    its ratings, where the paper's protocol takes them in time order. Rows whose
    ``movie_id`` is empty (the copy could not recover 20 movies' ids: 35 rows) are left
    out and logged (``ratings_without_movie_id``).

    Args:
        folder: The ``ml-1m`` folder (holds ``users.dat``, ``movies.dat``).
        ratings_file: The CSV inside ``folder``.
        n: The split's N.
        k: The split's K.
        name: Dataset name recorded in the log.
        order_seed: Seed of the order that stands in for time.

    Returns:
        The log; columns as in the module docstring (``timestamp`` = the seeded order).

    Raises:
        DataError: A file is missing or holds a row that cannot be parsed.
    """
    folder = Path(folder)
    ratings_p = require_file(folder / ratings_file, _HINT)
    raw = read_delimited(
        ratings_p,
        ["user_id", "movie_id", "rating"],
        {"user_id": _I64, "rating": _I64},
        delimiter=",",
        header=True,
    )
    movie = raw.column("movie_id").combine_chunks()
    known = pc.not_equal(movie, "")
    bad = pc.and_(known, pc.invert(pc.match_substring_regex(movie, r"^\d{1,18}$")))
    if pc.any(bad).as_py():
        first = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"{ratings_p}: line {first + 2}: movie_id {movie[first].as_py()!r} is not an "
            "integer (nor empty, which marks a movie the copy could not identify)"
        )
    unknown = len(movie) - int(pc.sum(known).as_py() or 0)
    if unknown:
        log.warning("ratings_without_movie_id", path=str(ratings_p), rows=unknown)
    raw = raw.filter(known)
    item = pc.cast(raw.column("movie_id"), _I64)
    order = np.random.default_rng(order_seed).permutation(raw.num_rows).astype(np.int64)
    ratings = pa.table(
        {
            "user": raw.column("user_id"),
            "item": item,
            "rating": raw.column("rating"),
            "ts": pa.array(order),
        }
    )
    item_table, user_table, movies_p, users_p = _ml1m_items_and_users(folder)
    return _assemble(
        name, ratings, ratings_p, item_table, user_table, (ratings_p, movies_p, users_p), n=n, k=k
    )


def _ml1m_items_and_users(folder: Path) -> tuple[pa.Table, pa.Table, Path, Path]:
    """MovieLens-1M's item and user tables from ``movies.dat`` and ``users.dat``."""
    movies_p = require_file(folder / "movies.dat", _HINT)
    users_p = require_file(folder / "users.dat", _HINT)
    movies = read_delimited(
        movies_p, ["id", "title", "genres"], {"id": _I64}, delimiter="::", encoding="latin-1"
    )
    users = read_delimited(
        users_p,
        ["id", "gender", "age", "occupation", "zip"],
        {"id": _I64, "age": _I64, "occupation": _I64},
        delimiter="::",
    )
    check_unique(movies.column("id").to_numpy(), path=movies_p, column="movie id")
    genres = _drop_empty(pc.split_pattern(movies.column("genres").combine_chunks(), "|"))
    item_table = _item_table(movies.column("id"), movies.column("title").combine_chunks(), genres)
    check_unique(users.column("id").to_numpy(), path=users_p, column="user id")
    user_table = pa.table(
        {
            "user_id": int_ids_to_str(users.column("id")),
            "gender": users.column("gender").combine_chunks(),
            "age": pc.cast(users.column("age").combine_chunks(), pa.string()),
            "occupation": pc.cast(users.column("occupation").combine_chunks(), pa.string()),
            "zip": users.column("zip").combine_chunks(),
        }
    )
    return item_table, user_table, movies_p, users_p


def title_features(titles: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Year and word tokens of MovieLens titles.

    Args:
        titles: Raw titles such as ``"Toy Story (1995)"``, shape [I].

    Returns:
        ``(year, words)``: the 4-digit year of the trailing ``(YYYY)`` as a string (null
        without one), shape [I]; and the lowercase letter/digit runs of the rest of the
        title (apostrophes dropped: ``"Schindler's"`` -> ``"schindlers"``), list<string> [I].
    """
    year = pc.struct_field(pc.extract_regex(titles, _YEAR_RE), "year")
    bare = pc.replace_substring_regex(titles, r"\s*\(\d{4}\)\s*$", "")
    bare = pc.replace_substring(pc.utf8_lower(bare), "'", "")
    words = _drop_empty(pc.split_pattern_regex(bare, r"[^\pL\pN]+"))
    return year, words


def _item_table(ids: pa.ChunkedArray, titles: pa.Array, genres: pa.Array) -> pa.Table:
    year, words = title_features(titles)
    return pa.table(
        {
            "item_id": int_ids_to_str(ids),
            "year": year,
            "title_words": words,
            "genres": genres,
            "title": titles,
        }
    )


def _drop_empty(lists: pa.Array) -> pa.Array:
    """Remove ``""`` tokens from a list<string> array (no nulls expected), shape [R]."""
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(lists)
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    kept = np.bincount(owner[keep], minlength=len(lengths))
    offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)))


def _assemble(
    name: str,
    ratings: pa.Table,
    ratings_path: Path,
    items: pa.Table,
    users: pa.Table,
    inputs: tuple[Path, ...],
    *,
    n: int,
    k: int,
) -> InteractionLog:
    """Join items and users onto the ratings (rating order kept) into the log."""
    rating = ratings.column("rating").to_numpy()
    check_range(rating, 1, 5, path=ratings_path, column="rating")
    item_key = int_ids_to_str(ratings.column("item"))
    user_key = int_ids_to_str(ratings.column("user"))
    item_rows, unknown_items = take_rows(items, item_key, items.column("item_id"))
    user_rows, unknown_users = take_rows(users, user_key, users.column("user_id"))
    if unknown_items or unknown_users:
        log.warning(
            "ratings_with_unknown_ids",
            path=str(ratings_path),
            unknown_item_rows=unknown_items,
            unknown_user_rows=unknown_users,
        )
    table = pa.table(
        {
            "item_id": item_key,
            "year": item_rows.column("year"),
            "title_words": item_rows.column("title_words"),
            "genres": item_rows.column("genres"),
            "user_id": user_key,
            "gender": user_rows.column("gender"),
            "age": user_rows.column("age"),
            "occupation": user_rows.column("occupation"),
            "zip": user_rows.column("zip"),
            "label": pa.array((rating >= 4).astype(np.int8)),
            "timestamp": ratings.column("ts").combine_chunks(),
            "rating": pa.array(rating.astype(np.int8)),
            "title": item_rows.column("title"),
        }
    )
    return InteractionLog(
        name=name,
        table=table,
        schema=MOVIELENS_SCHEMA,
        n=n,
        k=k,
        sources={source_key(p): sha256_file(p) for p in inputs},
    )
