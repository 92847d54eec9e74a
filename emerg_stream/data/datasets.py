"""Named dataset presets and the one entry point :func:`load_dataset`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from emerg_stream.data.generic import read_generic
from emerg_stream.data.log import InteractionLog
from emerg_stream.data.movielens import (
    ML1M_UNTIMED_RATINGS,
    read_movielens_1m,
    read_movielens_1m_untimed,
    read_movielens_100k,
)
from emerg_stream.data.synthetic import NAME as SYNTHETIC
from emerg_stream.data.synthetic import generate, parse_name
from emerg_stream.data.taobao import read_taobao
from emerg_stream.errors import ConfigError, DataError

#: Environment variable naming the folder that holds the dataset folders.
DATA_DIR_ENV = "EMERG_DATA_DIR"


@dataclass(frozen=True)
class Preset:
    """A named dataset: which reader, which folder (under the data dir), N and K.

    Args:
        reader: ``ml-100k``, ``ml-1m``, ``ml-1m-untimed`` or ``taobao``.
        folder: Folder name under the data directory.
        n: The split's N.
        k: The split's K.
        ratings_file: For the ``ml-1m`` readers: the ratings file inside the folder.
    """

    reader: str
    folder: str
    n: int
    k: int
    ratings_file: str = "ratings.dat"


PRESETS: dict[str, Preset] = {
    "ml-100k": Preset("ml-100k", "ml-100k", n=100, k=10),
    "ml-1m": Preset("ml-1m", "ml-1m", n=200, k=20, ratings_file="ratings.dat"),
    "ml-1m-u2999": Preset("ml-1m", "ml-1m", n=200, k=20, ratings_file="ratings_users0001-2999.dat"),
    # All 6,040 users, but no timestamps: a seeded order stands in for time (see
    # read_movielens_1m_untimed), so it is not the paper's protocol.
    "ml-1m-all": Preset("ml-1m-untimed", "ml-1m", n=200, k=20, ratings_file=ML1M_UNTIMED_RATINGS),
    "taobao": Preset("taobao", "taobao-ad", n=2000, k=500),
}


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The folder that holds the dataset folders.

    Args:
        data_dir: Explicit folder; wins when given.

    Returns:
        ``data_dir``, else ``$EMERG_DATA_DIR``, else ``../shared/data`` relative to the
        current working directory when that exists, else the cache that
        ``emerg-stream data fetch`` fills (``~/.cache/emerg-stream/data``) when it exists.

    Raises:
        DataError: None of them names an existing folder.
    """
    if data_dir is not None:
        chosen, how = Path(data_dir), "--data-dir"
    elif os.environ.get(DATA_DIR_ENV):
        chosen, how = Path(os.environ[DATA_DIR_ENV]), DATA_DIR_ENV
    else:
        fallback = Path.cwd() / ".." / "shared" / "data"
        cache = Path.home() / ".cache" / "emerg-stream" / "data"
        for candidate in (fallback, cache):
            if candidate.is_dir():
                return candidate.resolve()
        raise DataError(
            f"no data directory: pass --data-dir, set {DATA_DIR_ENV} to the folder that "
            f"holds the dataset folders, or run `emerg-stream data fetch ml-100k` "
            f"(looked for {fallback.resolve()} and {cache})"
        )
    if not chosen.is_dir():
        raise DataError(f"data directory {chosen} (from {how}) does not exist")
    return chosen


def load_dataset(name_or_yaml: str, data_dir: str | Path | None = None) -> InteractionLog:
    """Load a preset by name, or a user's dataset from its YAML description.

    Args:
        name_or_yaml: A preset name (``ml-100k``, ``ml-1m``, ``ml-1m-u2999``,
            ``ml-1m-all``, ``taobao``),
            the generated log ``synthetic-pairs`` (optionally with parameters,
            ``synthetic-pairs:seed=1,new_items=600``; see
            :mod:`emerg_stream.data.synthetic`) or the path of a dataset YAML
            (``*.yaml`` / ``*.yml``).
        data_dir: Folder holding the preset folders (see :func:`resolve_data_dir`);
            unused for a YAML, whose paths are relative to the YAML file, and for the
            generated log.

    Returns:
        The interaction log.

    Raises:
        ConfigError: Neither a preset nor a YAML path, or an invalid YAML.
        DataError: A missing or corrupt file (the message names the exact path).
    """
    if name_or_yaml.lower().endswith((".yaml", ".yml")):
        return read_generic(name_or_yaml)
    synthetic = parse_name(name_or_yaml)
    if synthetic is not None:
        return generate(synthetic, name=name_or_yaml)
    preset = PRESETS.get(name_or_yaml)
    if preset is None:
        raise ConfigError(
            f"unknown dataset {name_or_yaml!r}: use one of {[*sorted(PRESETS), SYNTHETIC]} "
            "or the path of a dataset YAML (*.yaml)"
        )
    folder = resolve_data_dir(data_dir) / preset.folder
    if preset.reader == "ml-100k":
        return read_movielens_100k(folder, n=preset.n, k=preset.k, name=name_or_yaml)
    if preset.reader == "ml-1m":
        return read_movielens_1m(
            folder, ratings_file=preset.ratings_file, n=preset.n, k=preset.k, name=name_or_yaml
        )
    if preset.reader == "ml-1m-untimed":
        return read_movielens_1m_untimed(
            folder, ratings_file=preset.ratings_file, n=preset.n, k=preset.k, name=name_or_yaml
        )
    return read_taobao(folder, n=preset.n, k=preset.k, name=name_or_yaml)
