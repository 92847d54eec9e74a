from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from emerg_stream.data import load_dataset, read_generic, split_log
from emerg_stream.data.log import ColumnSpec
from emerg_stream.errors import ConfigError, DataError

CSV_TEXT = (
    "ad,visitor,clicked,ts,category,tags,price,age_band\n"
    "007,u1,1,100,shoes,red|sale,9.5,20-30\n"
    "007,u2,0,101,shoes,,9.5,\n"
    "8,u1,1,99,hats,blue| sale ,,30-40\n"
)


def base_config(path: str) -> dict[str, Any]:
    return {
        "name": "shop",
        "path": path,
        "item_id": "ad",
        "user_id": "visitor",
        "label": "clicked",
        "timestamp": "ts",
        "item_features": [
            {"name": "category", "kind": "categorical"},
            {"name": "tags", "kind": "multi", "separator": "|", "max_len": 4},
            {"name": "price", "kind": "numeric"},
        ],
        "user_features": [{"name": "age_band", "kind": "categorical"}],
        "split": {"n": 30, "k": 5},
    }


def write_yaml(folder: Path, config: dict[str, Any], name: str = "ds.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_generic_csv(tmp_path) -> None:
    (tmp_path / "clicks.csv").write_text(CSV_TEXT)
    log = read_generic(write_yaml(tmp_path, base_config("clicks.csv")))
    t = log.table
    assert (log.name, log.n, log.k) == ("shop", 30, 5)
    assert t.column("ad").to_pylist() == ["007", "007", "8"]  # ids stay text, leading zeros kept
    assert t.column("clicked").type == pa.int8() and t.column("clicked").to_pylist() == [1, 0, 1]
    assert t.column("ts").type == pa.int64()
    assert t.column("tags").to_pylist() == [["red", "sale"], [], ["blue", "sale"]]
    assert t.column("price").type == pa.float64() and t.column("price").to_pylist() == [
        9.5,
        9.5,
        None,
    ]
    assert t.column("age_band").to_pylist()[0] == "20-30"
    assert log.schema.item_features[1] == ColumnSpec("tags", "multi", "item", max_len=4)
    assert log.schema.user_features == (ColumnSpec("age_band", "categorical", "user"),)
    assert set(log.sources) == {f"{tmp_path.name}/ds.yaml", f"{tmp_path.name}/clicks.csv"}


def test_generic_parquet_with_list_column_and_threshold(tmp_path) -> None:
    data = pa.table(
        {
            "ad": pa.array([7, 7, 8], pa.int64()),
            "visitor": ["u1", "u2", "u1"],
            "clicked": pa.array([5.0, 2.0, 4.0]),
            "ts": pa.array([1, 2, 3], pa.timestamp("ms")),
            "category": ["shoes", "shoes", None],
            "tags": pa.array([["a", "b"], [], None], pa.list_(pa.string())),
            "price": pa.array([1, 2, 3], pa.int32()),
            "age_band": ["x", "y", "x"],
        }
    )
    (tmp_path / "sub").mkdir()
    pq.write_table(data, tmp_path / "sub" / "log.parquet")
    config = base_config("sub/log.parquet")
    config["label_threshold"] = 4
    del config["item_features"][1]["separator"]  # a list column needs no separator
    log = load_dataset(str(write_yaml(tmp_path, config)))
    t = log.table
    assert t.column("ad").to_pylist() == ["7", "7", "8"]
    assert t.column("clicked").to_pylist() == [1, 0, 1]
    assert t.column("tags").to_pylist() == [["a", "b"], [], None]
    assert t.column("price").to_pylist() == [1.0, 2.0, 3.0]
    assert t.column("category").to_pylist() == ["shoes", "shoes", None]
    assert split_log(log).dropped_items == 2  # the log flows on into the split


def mutate(config: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    target = config
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return config


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("split",), DELETE, r"split: required key is missing"),
        (("item_id",), DELETE, r"item_id: required key is missing"),
        (
            ("item_features", 0, "kind"),
            "bucket",
            r"item_features\[0\]\.kind: .*'categorical'.*'bucket'",
        ),
        (("user_features", 0, "kind"), 3, r"user_features\[0\]\.kind"),
        (("split", "k"), 0, r"split\.k: .*greater than or equal to 1"),
        (("split", "n"), 10, r"split: .*n \(10\) must be at least 3\*k \(15\)"),
        (("item_featurs",), [], r"item_featurs: unknown key"),
        (("item_features", 0, "separator"), ",", r"item_features\[0\].*'separator' only applies"),
        (("label",), "ad", r"column 'ad' is named twice"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, path, value, message) -> None:
    (tmp_path / "clicks.csv").write_text(CSV_TEXT)
    yaml_path = write_yaml(tmp_path, mutate(base_config("clicks.csv"), path, value))
    with pytest.raises(ConfigError, match=message) as info:
        read_generic(yaml_path)
    assert str(yaml_path) in str(info.value)


def test_yaml_naming_a_missing_column(tmp_path) -> None:
    (tmp_path / "clicks.csv").write_text(CSV_TEXT)
    config = base_config("clicks.csv")
    config["user_features"].append({"name": "income", "kind": "numeric"})
    with pytest.raises(
        ConfigError, match=r"\['income'\] named in the YAML are not in .*clicks\.csv"
    ):
        read_generic(write_yaml(tmp_path, config))


def test_yaml_with_missing_log_file(tmp_path) -> None:
    with pytest.raises(DataError, match=r"missing log file .*nothere\.parquet"):
        read_generic(write_yaml(tmp_path, base_config("nothere.parquet")))


def test_missing_yaml_file(tmp_path) -> None:
    with pytest.raises(DataError, match=r"missing dataset YAML: .*absent\.yaml"):
        load_dataset(str(tmp_path / "absent.yaml"))


def test_yaml_that_is_not_a_mapping(tmp_path) -> None:
    (tmp_path / "ds.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_generic(tmp_path / "ds.yaml")


def test_labels_must_be_binary_without_threshold(tmp_path) -> None:
    (tmp_path / "clicks.csv").write_text(CSV_TEXT.replace("u2,0,101", "u2,4,101"))
    with pytest.raises(
        DataError, match=r"clicks\.csv: label column 'clicked' must hold 0/1.*row 2 has 4"
    ):
        read_generic(write_yaml(tmp_path, base_config("clicks.csv")))


def test_multi_text_column_needs_a_separator(tmp_path) -> None:
    (tmp_path / "clicks.csv").write_text(CSV_TEXT)
    config = base_config("clicks.csv")
    del config["item_features"][1]["separator"]
    with pytest.raises(
        ConfigError, match=r"'tags' is kind multi stored as text; give its 'separator'"
    ):
        read_generic(write_yaml(tmp_path, config))


def test_bad_timestamp_names_file_and_row(tmp_path) -> None:
    (tmp_path / "clicks.csv").write_text(CSV_TEXT + "9,u3,1,notatime,hats,,1.0,x\n")
    with pytest.raises(
        DataError, match=r"clicks\.csv: timestamp column 'ts': data row 4 has 'notatime'"
    ):
        read_generic(write_yaml(tmp_path, base_config("clicks.csv")))


def test_iso_timestamps_in_csv(tmp_path) -> None:
    text = (
        "ad,visitor,clicked,ts,category,tags,price,age_band\n9,u3,1,1970-01-01T00:01:40,h,,1.0,x\n"
    )
    (tmp_path / "clicks.csv").write_text(text)
    assert read_generic(write_yaml(tmp_path, base_config("clicks.csv"))).table.column(
        "ts"
    ).to_pylist() == [100]


def test_corrupt_csv_row_names_file_and_row(tmp_path) -> None:
    (tmp_path / "clicks.csv").write_text(CSV_TEXT + "9,u3,1,5\n")
    with pytest.raises(
        DataError, match=r"clicks\.csv: cannot read: .*Row #5.*Expected 8 columns, got 4"
    ):
        read_generic(write_yaml(tmp_path, base_config("clicks.csv")))


def test_ctrl_c_during_an_arrow_read_is_an_interrupt_not_bad_data(tmp_path, monkeypatch) -> None:
    """arrow turns SIGINT into ArrowCancelled ("received signal 2"); the job must see the
    user's Ctrl-C (exit 130), not a file it "cannot read" (exit 2)."""
    import pyarrow.csv as pcsv

    (tmp_path / "clicks.csv").write_text(CSV_TEXT)
    path = write_yaml(tmp_path, base_config("clicks.csv"))

    def cancelled(*args: Any, **kwargs: Any) -> pa.Table:
        raise pa.ArrowCancelled("Operation cancelled. Detail: received signal 2")

    monkeypatch.setattr(pcsv, "read_csv", cancelled)
    with pytest.raises(KeyboardInterrupt, match="received signal 2"):
        read_generic(path)
    monkeypatch.setattr(pcsv, "open_csv", cancelled)
    with pytest.raises(KeyboardInterrupt):
        read_generic(path)
