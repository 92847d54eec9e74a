"""Reader of the Taobao display-ad click data (Tianchi dataset 56), original CSV format.

Files (each with a header line):

* ``raw_sample.csv``: ``user,time_stamp,adgroup_id,pid,nonclk,clk`` — one impression.
* ``ad_feature.csv``: ``adgroup_id,cate_id,campaign_id,customer,brand,price``.
* ``user_profile.csv``: ``userid,cms_segid,cms_group_id,final_gender_code,age_level,
  pvalue_level,shopping_level,occupation,new_user_class_level`` (the real header ends in a
  stray space, which is tolerated).

Columns of the log: ``item_id`` (adgroup_id), ``cate_id``, ``campaign_id``, ``customer``,
``brand`` (categorical), ``price`` (numeric), ``user_id`` and the eight profile columns
(categorical; null for a user without a profile, or an empty / ``NULL`` field),
``label`` (= clk), ``timestamp`` (= time_stamp) and ``pid`` (the ad slot; kept, not a
feature).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from emerg_stream.data._files import (
    check_range,
    check_unique,
    empty_to_null,
    int_ids_to_str,
    read_delimited,
    require_file,
    sha256_file,
    source_key,
    take_rows,
)
from emerg_stream.data.log import ColumnSpec, InteractionLog, LogSchema

log = structlog.get_logger(__name__)

AD_COLUMNS = ("cate_id", "campaign_id", "customer", "brand")
PROFILE_COLUMNS = (
    "cms_segid",
    "cms_group_id",
    "final_gender_code",
    "age_level",
    "pvalue_level",
    "shopping_level",
    "occupation",
    "new_user_class_level",
)

TAOBAO_SCHEMA = LogSchema(
    item_id="item_id",
    user_id="user_id",
    label="label",
    timestamp="timestamp",
    item_features=(
        *(ColumnSpec(c, "categorical", "item") for c in AD_COLUMNS),
        ColumnSpec("price", "numeric", "item"),
    ),
    user_features=tuple(ColumnSpec(c, "categorical", "user") for c in PROFILE_COLUMNS),
)

_HINT = "set EMERG_DATA_DIR (or pass --data-dir) to the folder that holds the dataset folders"
_NULLS = ("NULL",)


def read_taobao(
    folder: str | Path, *, n: int = 2000, k: int = 500, name: str = "taobao"
) -> InteractionLog:
    """Read the Taobao display-ad CSVs.

    Args:
        folder: The folder holding ``raw_sample.csv``, ``ad_feature.csv`` and
            ``user_profile.csv``.
        n: The split's N (2000 in the paper).
        k: The split's K (500 in the paper).
        name: Dataset name recorded in the log.

    Returns:
        The log; columns as in the module docstring.

    Raises:
        DataError: A file is missing, lacks a column or holds a row that cannot be parsed.
    """
    folder = Path(folder)
    sample_p = require_file(folder / "raw_sample.csv", _HINT)
    ad_p = require_file(folder / "ad_feature.csv", _HINT)
    user_p = require_file(folder / "user_profile.csv", _HINT)
    i64 = pa.int64()

    sample = read_delimited(
        sample_p,
        ["user", "time_stamp", "adgroup_id", "pid", "clk"],
        {"user": i64, "time_stamp": i64, "adgroup_id": i64, "clk": i64},
        delimiter=",",
        header=True,
    )
    clk = sample.column("clk").to_numpy()
    check_range(clk, 0, 1, path=sample_p, column="clk", first_line=2)

    ads = read_delimited(
        ad_p,
        ["adgroup_id", *AD_COLUMNS, "price"],
        {"adgroup_id": i64, "price": pa.float64()},
        delimiter=",",
        header=True,
    )
    check_unique(ads.column("adgroup_id").to_numpy(), path=ad_p, column="adgroup_id", first_line=2)
    ad_table = pa.table(
        {
            "item_id": int_ids_to_str(ads.column("adgroup_id")),
            **{c: empty_to_null(ads.column(c), _NULLS) for c in AD_COLUMNS},
            "price": ads.column("price").combine_chunks(),
        }
    )

    users = read_delimited(
        user_p, ["userid", *PROFILE_COLUMNS], {"userid": i64}, delimiter=",", header=True
    )
    check_unique(users.column("userid").to_numpy(), path=user_p, column="userid", first_line=2)
    user_table = pa.table(
        {
            "user_id": int_ids_to_str(users.column("userid")),
            **{c: empty_to_null(users.column(c), _NULLS) for c in PROFILE_COLUMNS},
        }
    )

    item_key = int_ids_to_str(sample.column("adgroup_id"))
    user_key = int_ids_to_str(sample.column("user"))
    ad_rows, unknown_ads = take_rows(ad_table, item_key, ad_table.column("item_id"))
    profile_rows, no_profile = take_rows(user_table, user_key, user_table.column("user_id"))
    if unknown_ads:
        log.warning("impressions_with_unknown_ads", path=str(sample_p), rows=unknown_ads)
    log.info("taobao_read", rows=sample.num_rows, rows_without_profile=no_profile)

    columns: dict[str, pa.Array | pa.ChunkedArray] = {"item_id": item_key}
    columns.update({c: ad_rows.column(c) for c in (*AD_COLUMNS, "price")})
    columns["user_id"] = user_key
    columns.update({c: profile_rows.column(c) for c in PROFILE_COLUMNS})
    columns["label"] = pc.cast(sample.column("clk"), pa.int8())
    columns["timestamp"] = sample.column("time_stamp")
    columns["pid"] = empty_to_null(sample.column("pid"))
    return InteractionLog(
        name=name,
        table=pa.table(columns),
        schema=TAOBAO_SCHEMA,
        n=n,
        k=k,
        sources={source_key(p): sha256_file(p) for p in (sample_p, ad_p, user_p)},
    )
