from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from emerg_stream.data import load_dataset, read_taobao
from emerg_stream.data.taobao import TAOBAO_SCHEMA
from emerg_stream.errors import DataError


def write_taobao(folder: Path, sample_rows: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = sample_rows or [
        "581738,1494137644,1,430548_1007,1,0",
        "449818,1494638778,3,430548_1007,0,1",
        "914836,1494650879,1,430548_1007,1,0",
    ]
    (folder / "raw_sample.csv").write_text(
        "user,time_stamp,adgroup_id,pid,nonclk,clk\n" + "\n".join(rows) + "\n"
    )
    (folder / "ad_feature.csv").write_text(
        "adgroup_id,cate_id,campaign_id,customer,brand,price\n"
        "1,6406,83237,1,95471,170.0\n"
        "3,4520,387991,6,NULL,48.5\n"
    )
    # The real header ends in a stray space; user 914836 has no profile; one empty field.
    (folder / "user_profile.csv").write_text(
        "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,"
        "occupation,new_user_class_level \n"
        "581738,0,5,2,5,,3,0,3\n"
        "449818,0,12,2,6,3,3,0,\n"
    )
    return folder


def test_taobao_reader_joins_ads_and_profiles(tmp_path) -> None:
    log = read_taobao(write_taobao(tmp_path / "taobao-ad"))
    t = log.table
    assert log.schema == TAOBAO_SCHEMA
    assert (log.n, log.k) == (2000, 500)
    assert t.column("item_id").to_pylist() == ["1", "3", "1"]
    assert t.column("user_id").to_pylist() == ["581738", "449818", "914836"]
    assert t.column("label").type == pa.int8() and t.column("label").to_pylist() == [0, 1, 0]
    assert t.column("timestamp").to_pylist() == [1494137644, 1494638778, 1494650879]
    assert t.column("brand").to_pylist() == ["95471", None, "95471"]  # NULL -> null
    assert t.column("price").type == pa.float64() and t.column("price").to_pylist() == [
        170.0,
        48.5,
        170.0,
    ]
    assert t.column("cate_id").to_pylist() == ["6406", "4520", "6406"]
    assert t.column("pvalue_level").to_pylist() == [None, "3", None]  # empty / no profile -> null
    assert t.column("new_user_class_level").to_pylist() == ["3", None, None]
    assert t.column("cms_group_id").to_pylist() == ["5", "12", None]
    assert set(log.sources) == {
        "taobao-ad/raw_sample.csv",
        "taobao-ad/ad_feature.csv",
        "taobao-ad/user_profile.csv",
    }


def test_taobao_preset(tmp_path) -> None:
    write_taobao(tmp_path / "taobao-ad")
    log = load_dataset("taobao", tmp_path)
    assert (log.name, log.table.num_rows) == ("taobao", 3)


def test_taobao_bad_click_value(tmp_path) -> None:
    folder = write_taobao(tmp_path / "t", ["1,1494137644,1,p,1,0", "2,1494137645,1,p,0,2"])
    with pytest.raises(DataError, match=r"raw_sample\.csv: line 3: clk 2 is outside \[0, 1\]"):
        read_taobao(folder)


def test_taobao_wrong_field_count(tmp_path) -> None:
    folder = write_taobao(tmp_path / "t", ["1,1494137644,1,p,1,0", "2,1494137645,1"])
    with pytest.raises(DataError, match=r"raw_sample\.csv: line 3: expected 6 fields, got 3"):
        read_taobao(folder)


def test_taobao_missing_header_column(tmp_path) -> None:
    folder = write_taobao(tmp_path / "t")
    (folder / "ad_feature.csv").write_text(
        "adgroup_id,cate_id,campaign_id,customer,price\n1,2,3,4,5.0\n"
    )
    with pytest.raises(
        DataError, match=r"ad_feature\.csv: line 1: .*lacks column\(s\) \['brand'\]"
    ):
        read_taobao(folder)
