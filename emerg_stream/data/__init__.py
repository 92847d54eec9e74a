"""Dataset readers, the interaction-log contract and the public cold-start split."""

from emerg_stream.data.datasets import PRESETS, Preset, load_dataset, resolve_data_dir
from emerg_stream.data.generic import DatasetConfig, load_dataset_config, read_generic
from emerg_stream.data.log import (
    ColumnSpec,
    FeatureKind,
    InteractionLog,
    LogSchema,
    Side,
    schema_from_dict,
    schema_to_dict,
)
from emerg_stream.data.movielens import (
    read_movielens_1m,
    read_movielens_1m_untimed,
    read_movielens_100k,
)
from emerg_stream.data.split import (
    PARTS,
    Split,
    holdout_validation,
    read_split,
    split_log,
    write_split,
)
from emerg_stream.data.taobao import read_taobao

__all__ = [
    "PARTS",
    "PRESETS",
    "ColumnSpec",
    "DatasetConfig",
    "FeatureKind",
    "InteractionLog",
    "LogSchema",
    "Preset",
    "Side",
    "Split",
    "holdout_validation",
    "load_dataset",
    "load_dataset_config",
    "read_generic",
    "read_movielens_1m",
    "read_movielens_1m_untimed",
    "read_movielens_100k",
    "read_split",
    "read_taobao",
    "resolve_data_dir",
    "schema_from_dict",
    "schema_to_dict",
    "split_log",
    "write_split",
]
