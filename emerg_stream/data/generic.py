"""A user's own interaction log, described by a YAML file.

Example (paths are relative to the YAML file)::

    name: shop-clicks            # optional; default: the YAML file's stem
    path: clicks.parquet         # or a .csv file
    format: parquet              # optional; default: from the file suffix
    delimiter: ","               # CSV only
    item_id: ad
    user_id: visitor
    label: clicked               # values 0/1 (or true/false) ...
    label_threshold: 4           # ... or: label = value >= threshold
    timestamp: ts                # integer time, a timestamp column (kept in its unit), ISO text
    item_features:
      - {name: category, kind: categorical}
      - {name: tags, kind: multi, separator: "|", max_len: 5}
      - {name: price, kind: numeric}
    user_features:
      - {name: age_band, kind: categorical}
    split: {n: 200, k: 20}

Column types in the log follow :mod:`emerg_stream.data.log`: ids and categorical
features become strings, multi features ``list<string>`` (split on ``separator`` when the
column holds strings; a parquet list column is taken as is), numeric ``float64``.
Errors about values name the file, the column and the data row (counted from 1, the
CSV header not counted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from emerg_stream.data._files import sha256_file, source_key
from emerg_stream.data.log import ColumnSpec, InteractionLog, LogSchema
from emerg_stream.errors import ConfigError, DataError
from emerg_stream.phases import WarmupSchedule

#: max_len of a multi feature whose YAML gives none.
DEFAULT_MULTI_MAX_LEN = 8


class FeatureConfig(BaseModel):
    """One feature column of a generic dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    kind: Literal["categorical", "multi", "numeric"]
    separator: str | None = Field(default=None, min_length=1)
    max_len: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _multi_only(self) -> FeatureConfig:
        if self.kind != "multi" and self.separator is not None:
            raise ValueError(f"'separator' only applies to kind 'multi' (got kind {self.kind!r})")
        if self.kind != "multi" and self.max_len not in (None, 1):
            raise ValueError(f"'max_len' only applies to kind 'multi' (got kind {self.kind!r})")
        return self


class SplitConfig(BaseModel):
    """The split's N and K."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(ge=1)
    k: int = Field(ge=1)

    @model_validator(mode="after")
    def _n_holds_three_phases(self) -> SplitConfig:
        need = WarmupSchedule(self.k).protocol_rows
        if self.n < need:
            raise ValueError(f"n ({self.n}) must be at least 3*k ({need})")
        return self


class DatasetConfig(BaseModel):
    """The whole dataset YAML (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, min_length=1)
    path: str = Field(min_length=1)
    format: Literal["parquet", "csv"] | None = None
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    item_id: str = Field(min_length=1)
    user_id: str = Field(min_length=1)
    label: str = Field(min_length=1)
    label_threshold: float | None = None
    timestamp: str = Field(min_length=1)
    item_features: list[FeatureConfig] = Field(default_factory=list)
    user_features: list[FeatureConfig] = Field(default_factory=list)
    split: SplitConfig

    @model_validator(mode="after")
    def _distinct_columns(self) -> DatasetConfig:
        names = [self.item_id, self.user_id, self.label, self.timestamp]
        names += [f.name for f in (*self.item_features, *self.user_features)]
        seen: set[str] = set()
        for column in names:
            if column in seen:
                raise ValueError(f"column {column!r} is named twice; every role needs its own")
            seen.add(column)
        return self


def load_dataset_config(yaml_path: str | Path) -> DatasetConfig:
    """Read and validate a dataset YAML.

    Args:
        yaml_path: The YAML file.

    Returns:
        The validated config.

    Raises:
        DataError: The YAML file is missing or unreadable.
        ConfigError: It is not valid YAML or breaks the schema; the message names the key.
    """
    yaml_path = Path(yaml_path)
    if not yaml_path.is_file():
        raise DataError(f"missing dataset YAML: {yaml_path}")
    try:
        raw = yaml.safe_load(yaml_path.read_text(encoding="utf8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{yaml_path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{yaml_path}: must be a mapping of keys, got {type(raw).__name__}")
    try:
        return DatasetConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            key = key.lstrip(".") or "(top level)"
            msg = err["msg"]
            if err["type"] == "missing":
                msg = "required key is missing"
            elif err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif "input" in err and err["type"] not in ("model_type", "value_error"):
                msg = f"{msg} (got {err['input']!r})"
            problems.append(f"{key}: {msg}")
        raise ConfigError(f"{yaml_path}: " + "; ".join(problems)) from exc


def read_generic(yaml_path: str | Path) -> InteractionLog:
    """Read a user's log as described by a dataset YAML.

    Args:
        yaml_path: The YAML file (the log's ``path`` is relative to it).

    Returns:
        The log.

    Raises:
        ConfigError: The YAML is invalid, or names a column the log lacks, or a multi
            feature stored as text has no ``separator``.
        DataError: The log file is missing or unreadable, or holds values that do not fit
            their role (a label that is not 0/1, a null id or timestamp).
    """
    yaml_path = Path(yaml_path)
    cfg = load_dataset_config(yaml_path)
    log_path = (yaml_path.parent / cfg.path).resolve()
    if not log_path.is_file():
        raise DataError(f"{yaml_path}: path: missing log file {log_path}")
    fmt = cfg.format or _format_from_suffix(yaml_path, log_path)
    features = [*cfg.item_features, *cfg.user_features]
    needed = [cfg.item_id, cfg.user_id, cfg.label, cfg.timestamp, *(f.name for f in features)]
    as_text = [cfg.item_id, cfg.user_id]
    as_text += [f.name for f in features if f.kind != "numeric"]
    raw = _read(log_path, fmt, needed, as_text, cfg.delimiter, yaml_path)

    columns: dict[str, pa.Array] = {}
    columns[cfg.item_id] = _ids(raw, cfg.item_id, log_path)
    columns[cfg.user_id] = _ids(raw, cfg.user_id, log_path)
    columns[cfg.label] = _labels(raw, cfg.label, cfg.label_threshold, log_path)
    columns[cfg.timestamp] = _timestamps(raw, cfg.timestamp, log_path)
    for f in features:
        columns[f.name] = _feature(raw, f, log_path, yaml_path)

    def specs(items: list[FeatureConfig], side: Literal["item", "user"]) -> tuple[ColumnSpec, ...]:
        return tuple(
            ColumnSpec(f.name, f.kind, side, max_len=f.max_len or _default_max_len(f.kind))
            for f in items
        )

    schema = LogSchema(
        item_id=cfg.item_id,
        user_id=cfg.user_id,
        label=cfg.label,
        timestamp=cfg.timestamp,
        item_features=specs(cfg.item_features, "item"),
        user_features=specs(cfg.user_features, "user"),
    )
    return InteractionLog(
        name=cfg.name or yaml_path.stem,
        table=pa.table(columns),
        schema=schema,
        n=cfg.split.n,
        k=cfg.split.k,
        sources={source_key(p): sha256_file(p) for p in (yaml_path, log_path)},
    )


def _default_max_len(kind: str) -> int:
    return DEFAULT_MULTI_MAX_LEN if kind == "multi" else 1


def _format_from_suffix(yaml_path: Path, log_path: Path) -> Literal["parquet", "csv"]:
    suffix = log_path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv", ".txt") or log_path.name.lower().endswith(".csv.gz"):
        return "csv"
    raise ConfigError(
        f"{yaml_path}: format: cannot tell the format of {log_path.name}; "
        "set 'format: parquet' or 'format: csv'"
    )


def _read(
    path: Path,
    fmt: str,
    needed: list[str],
    as_text: list[str],
    delimiter: str,
    yaml_path: Path,
) -> pa.Table:
    """Read the needed columns, checking first that each exists."""
    try:
        if fmt == "parquet":
            present = list(pq.read_schema(path).names)
        else:
            reader = pcsv.open_csv(
                path,
                read_options=pcsv.ReadOptions(use_threads=False),
                parse_options=pcsv.ParseOptions(delimiter=delimiter),
            )
            present = list(reader.schema.names)
            reader.close()
    except pa.ArrowCancelled as exc:  # Ctrl-C while arrow read: the user's interrupt
        raise KeyboardInterrupt(str(exc)) from exc
    except (OSError, pa.ArrowException, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    missing = [c for c in needed if c not in present]
    if missing:
        raise ConfigError(
            f"{yaml_path}: column(s) {missing} named in the YAML are not in {path} "
            f"(it has {list(present)})"
        )
    try:
        if fmt == "parquet":
            return pq.read_table(path, columns=needed)
        return pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(use_threads=False),
            parse_options=pcsv.ParseOptions(delimiter=delimiter),
            convert_options=pcsv.ConvertOptions(
                include_columns=needed, column_types=dict.fromkeys(as_text, pa.string())
            ),
        )
    except pa.ArrowCancelled as exc:  # arrow turns SIGINT into this; it is Ctrl-C
        raise KeyboardInterrupt(str(exc)) from exc
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc


def _first_null(col: pa.ChunkedArray) -> int:
    return int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])


def _ids(raw: pa.Table, name: str, path: Path) -> pa.Array:
    col = raw.column(name)
    if col.null_count:
        row = _first_null(col) + 1
        raise DataError(f"{path}: id column '{name}' is empty in data row {row}")
    try:
        return pc.cast(col.combine_chunks(), pa.string())
    except pa.ArrowException as exc:
        raise DataError(f"{path}: id column '{name}' cannot be read as text: {exc}") from exc


def _labels(raw: pa.Table, name: str, threshold: float | None, path: Path) -> pa.Array:
    col = raw.column(name).combine_chunks()
    if col.null_count:
        row = _first_null(col) + 1
        raise DataError(f"{path}: label column '{name}' is empty in data row {row}")
    try:
        values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowException as exc:
        raise DataError(f"{path}: label column '{name}' is not numeric: {exc}") from exc
    if threshold is not None:
        return pa.array((values >= threshold).astype(np.int8))
    bad = np.flatnonzero((values != 0) & (values != 1))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{path}: label column '{name}' must hold 0/1 (or set label_threshold): "
            f"data row {i + 1} has {col[i].as_py()!r}"
        )
    return pa.array(values.astype(np.int8))


def _timestamps(raw: pa.Table, name: str, path: Path) -> pa.Array:
    """The timestamp column as int64, shape [R].

    Integers as is; a timestamp column in its own unit (no rounding, so no new ties);
    dates in seconds; text holding integers or ISO times.
    """
    col = raw.column(name).combine_chunks()
    if col.null_count:
        raise DataError(
            f"{path}: timestamp column '{name}' is empty in data row {_first_null(col) + 1}"
        )
    typ = col.type
    if pa.types.is_integer(typ):
        return pc.cast(col, pa.int64())
    if pa.types.is_timestamp(typ):
        return pc.cast(col, pa.int64())
    if pa.types.is_date(typ):
        return pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
    if pa.types.is_floating(typ):
        values = col.to_numpy(zero_copy_only=False)
        if np.all(np.isfinite(values)) and np.all(values == np.round(values)):
            return pa.array(values.astype(np.int64))
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        text = pc.utf8_trim_whitespace(col)
        is_int = np.asarray(pc.match_substring_regex(text, r"^-?\d+$"), dtype=bool)
        try:
            if is_int.all():
                return pc.cast(text, pa.int64())
            return pc.cast(pc.cast(text, pa.timestamp("s")), pa.int64())
        except pa.ArrowException:
            i = int(np.flatnonzero(~is_int)[0]) if not is_int.all() else 0
            raise DataError(
                f"{path}: timestamp column '{name}': data row {i + 1} has {col[i].as_py()!r}, "
                "not an integer or an ISO time"
            ) from None
    raise DataError(
        f"{path}: timestamp column '{name}' must hold integers or timestamps, got {typ}"
    )


def _feature(raw: pa.Table, f: FeatureConfig, path: Path, yaml_path: Path) -> pa.Array:
    col = raw.column(f.name).combine_chunks()
    try:
        if f.kind == "numeric":
            return pc.cast(col, pa.float64())
        if f.kind == "categorical":
            return pc.cast(col, pa.string())
    except pa.ArrowException as exc:
        raise DataError(f"{path}: {f.kind} column '{f.name}' has type {col.type}: {exc}") from exc
    # multi
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        try:
            return pc.cast(col, pa.list_(pa.string()))
        except pa.ArrowException as exc:
            raise DataError(f"{path}: multi column '{f.name}' ({col.type}): {exc}") from exc
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise DataError(f"{path}: multi column '{f.name}' must hold text or lists, got {col.type}")
    if f.separator is None:
        raise ConfigError(
            f"{yaml_path}: feature '{f.name}' is kind multi stored as text; give its 'separator'"
        )
    parts = pc.split_pattern(pc.cast(col, pa.string()), f.separator)
    flat = pc.utf8_trim_whitespace(pc.list_flatten(parts))
    lengths = pc.list_value_length(parts).fill_null(0).to_numpy(zero_copy_only=False)
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner[keep], minlength=len(lengths)))])
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), flat.filter(pa.array(keep)), mask=pc.is_null(col)
    )
