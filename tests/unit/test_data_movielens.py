from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pytest
from structlog.testing import capture_logs

from emerg_stream.data import (
    load_dataset,
    read_movielens_1m,
    read_movielens_1m_untimed,
    read_movielens_100k,
)
from emerg_stream.data.movielens import ML1M_RATINGS_SHA256, MOVIELENS_SCHEMA
from emerg_stream.errors import ConfigError, DataError

GENRE_FLAGS_TOY = "0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0"  # Animation, Children's, Comedy
GENRE_FLAGS_NONE = "|".join(["0"] * 19)


def write_ml100k(folder: Path, data_lines: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = data_lines or ["1\t10\t5\t881250949", "2\t20\t3\t881250950", "1\t20\t4\t881250951"]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    items = [
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{GENRE_FLAGS_TOY}",
        f"20|Nénette et Boni (1996)|01-Jan-1996||http://y|{GENRE_FLAGS_NONE}",
    ]
    (folder / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    return folder


def write_ml1m(folder: Path, ratings_name: str = "ratings.dat", ratings: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = ratings or "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
    (folder / ratings_name).write_text(text)
    movies = (
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "3::City of Lost Children, The (Cité des enfants perdus, La) (1995)::Adventure|Sci-Fi\n"
    )
    (folder / "movies.dat").write_bytes(movies.encode("latin-1"))
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072-1234\n")
    return folder


def test_ml100k_columns_labels_and_features(tmp_path) -> None:
    log = read_movielens_100k(write_ml100k(tmp_path / "ml-100k"))
    t = log.table
    assert log.schema == MOVIELENS_SCHEMA
    assert (log.name, log.n, log.k) == ("ml-100k", 100, 10)
    assert t.column("item_id").to_pylist() == ["10", "20", "20"]
    assert t.column("user_id").to_pylist() == ["1", "2", "1"]
    assert t.column("label").type == pa.int8() and t.column("label").to_pylist() == [1, 0, 1]
    assert t.column("timestamp").type == pa.int64()
    assert t.column("year").to_pylist() == ["1995", "1996", "1996"]
    assert t.column("title_words").to_pylist()[:2] == [["toy", "story"], ["nénette", "et", "boni"]]
    assert t.column("genres").to_pylist()[:2] == [["Animation", "Children's", "Comedy"], []]
    assert t.column("age").to_pylist() == ["24", "53", "24"]
    assert t.column("gender").to_pylist() == ["M", "F", "M"]
    assert t.column("occupation").to_pylist()[0] == "technician"
    assert t.column("zip").to_pylist()[0] == "85711"
    data = (tmp_path / "ml-100k" / "u.data").read_bytes()
    assert log.sources["ml-100k/u.data"] == hashlib.sha256(data).hexdigest()
    assert set(log.sources) == {"ml-100k/u.data", "ml-100k/u.item", "ml-100k/u.user"}


def test_ml1m_double_colon_format(tmp_path) -> None:
    folder = write_ml1m(tmp_path / "ml-1m", ratings_name="ratings_sub.dat")
    log = read_movielens_1m(folder, ratings_file="ratings_sub.dat", name="sub")
    t = log.table
    assert t.column("item_id").to_pylist() == ["1193", "661", "1193"]
    assert t.column("label").to_pylist() == [1, 0, 1]
    assert t.column("year").to_pylist() == ["1975", "1996", "1975"]
    assert t.column("title_words").to_pylist()[0] == [
        "one",
        "flew",
        "over",
        "the",
        "cuckoos",
        "nest",
    ]
    assert t.column("genres").to_pylist()[1] == ["Animation", "Children's", "Musical"]
    assert t.column("age").to_pylist() == ["1", "1", "56"]
    assert t.column("occupation").to_pylist() == ["10", "10", "16"]
    assert t.column("zip").to_pylist()[2] == "70072-1234"
    assert "ml-1m/ratings_sub.dat" in log.sources


def test_ml1m_ratings_dat_hash_mismatch_warns_but_reads(tmp_path) -> None:
    folder = write_ml1m(tmp_path / "ml-1m")
    with capture_logs() as logs:
        log = read_movielens_1m(folder)
    assert log.table.num_rows == 3
    warned = [e for e in logs if e["event"] == "ratings_sha256_mismatch"]
    assert len(warned) == 1 and warned[0]["expected"] == ML1M_RATINGS_SHA256


def test_ml1m_other_ratings_file_does_not_warn(tmp_path) -> None:
    folder = write_ml1m(tmp_path / "ml-1m", ratings_name="mine.dat")
    with capture_logs() as logs:
        read_movielens_1m(folder, ratings_file="mine.dat")
    assert not [e for e in logs if e["event"] == "ratings_sha256_mismatch"]


@pytest.mark.parametrize(
    ("ratings", "message"),
    [
        ("1::1193::5::978300760\n1::661::3\n", r"ratings\.dat: line 2: expected 4 fields, got 3"),
        ("1::1193::5::978300760\n1::661::3::9::9\n", r"line 2: expected 4 fields, got 5"),
        ("1::1193::5::978300760\n1::661::x::978302109\n", r"line 2: column 'rating'.*'x'"),
        ("1::1193::4.5::978300760\n", r"line 1: column 'rating'.*'4.5'"),
        ("1::1193::5::97830x\n", r"line 1: column 'ts'"),
        ("1::1193::5::1\n\n2::661::3::2\n", r"line 2: column"),
        ("1::1193::5::1\n2::661::7::2\n", r"line 2: rating 7 is outside \[1, 5\]"),
    ],
)
def test_ml1m_corrupt_ratings_name_file_and_line(tmp_path, ratings: str, message: str) -> None:
    folder = write_ml1m(tmp_path / "ml-1m", ratings=ratings)
    with pytest.raises(DataError, match=message):
        read_movielens_1m(folder)


def test_ml100k_corrupt_item_row(tmp_path) -> None:
    folder = write_ml100k(tmp_path / "ml-100k")
    with (folder / "u.item").open("ab") as fh:
        fh.write(b"30|Broken (1990)|x\n")
    with pytest.raises(DataError, match=r"u\.item: line 3: expected 24 fields, got 3"):
        read_movielens_100k(folder)


def test_ml100k_duplicate_item_id(tmp_path) -> None:
    folder = write_ml100k(tmp_path / "ml-100k")
    with (folder / "u.item").open("ab") as fh:
        fh.write(f"10|Again (1990)|||u|{GENRE_FLAGS_NONE}\n".encode())
    with pytest.raises(DataError, match=r"u\.item: line 3: movie id 10 appears twice"):
        read_movielens_100k(folder)


def test_unknown_item_in_ratings_gets_null_features(tmp_path) -> None:
    folder = write_ml100k(tmp_path / "ml-100k", ["1\t10\t5\t1", "1\t99\t2\t2"])
    with capture_logs() as logs:
        t = read_movielens_100k(folder).table
    assert t.column("item_id").to_pylist() == ["10", "99"]
    assert t.column("year").to_pylist() == ["1995", None]
    assert any(e["event"] == "ratings_with_unknown_ids" for e in logs)


def test_load_dataset_presets_and_data_dir(tmp_path, monkeypatch) -> None:
    write_ml100k(tmp_path / "data" / "ml-100k")
    write_ml1m(tmp_path / "data" / "ml-1m", ratings_name="ratings_users0001-2999.dat")
    log = load_dataset("ml-100k", tmp_path / "data")
    assert (log.name, log.n, log.k, log.table.num_rows) == ("ml-100k", 100, 10, 3)
    monkeypatch.setenv("EMERG_DATA_DIR", str(tmp_path / "data"))
    log = load_dataset("ml-1m-u2999")
    assert (log.name, log.n, log.k, log.table.num_rows) == ("ml-1m-u2999", 200, 20, 3)
    monkeypatch.delenv("EMERG_DATA_DIR")
    monkeypatch.chdir(tmp_path / "data" / "ml-100k")  # no ../shared/data from here
    with pytest.raises(DataError, match="EMERG_DATA_DIR"):
        load_dataset("ml-100k")


def test_load_dataset_missing_file_names_path_and_env(tmp_path) -> None:
    write_ml1m(tmp_path / "ml-1m", ratings_name="ratings_users0001-2999.dat")
    expected = str(tmp_path / "ml-1m" / "ratings.dat")
    with pytest.raises(DataError, match="EMERG_DATA_DIR") as info:
        load_dataset("ml-1m", tmp_path)
    assert expected in str(info.value)


def test_load_dataset_unknown_name(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'ml-2m'"):
        load_dataset("ml-2m", tmp_path)


def write_ml1m_untimed(folder: Path, rows: list[str]) -> Path:
    write_ml1m(folder)
    (folder / "supplementary").mkdir()
    body = "user_id,movie_id,rating,r_item_index\n" + "\n".join(rows) + "\n"
    (folder / "supplementary" / "ratings_all_no_timestamp.csv").write_text(body)
    return folder


def test_ml1m_untimed_reads_all_rows_drops_unknown_ids_and_orders_by_seed(tmp_path) -> None:
    rows = [f"{1 + i % 2},{(1193, 661)[i % 2]},{1 + i % 5},{i % 2 + 1}" for i in range(12)]
    rows.append("2,,5,3")  # a movie whose id the copy could not recover
    folder = write_ml1m_untimed(tmp_path / "ml-1m", rows)
    with capture_logs() as logs:
        log = read_movielens_1m_untimed(folder)
    assert (log.name, log.n, log.k) == ("ml-1m-all", 200, 20)
    t = log.table
    assert t.num_rows == 12
    assert [e["rows"] for e in logs if e["event"] == "ratings_without_movie_id"] == [1]
    assert t.column("item_id").to_pylist()[:2] == ["1193", "661"]
    assert t.column("genres").to_pylist()[1] == ["Animation", "Children's", "Musical"]
    assert t.column("label").to_pylist()[:5] == [0, 0, 0, 1, 1]
    assert t.column("occupation").to_pylist()[:2] == ["10", "16"]
    # The stand-in for time: a permutation of the rows, fixed by the seed, other seeds differ.
    order = t.column("timestamp").to_pylist()
    assert sorted(order) == list(range(12))
    assert order == read_movielens_1m_untimed(folder).table.column("timestamp").to_pylist()
    assert (
        order
        != read_movielens_1m_untimed(folder, order_seed=1).table.column("timestamp").to_pylist()
    )
    assert load_dataset("ml-1m-all", tmp_path).table.num_rows == 12


def test_ml1m_untimed_bad_movie_id_names_the_file(tmp_path) -> None:
    folder = write_ml1m_untimed(tmp_path / "ml-1m", ["1,1193,5,1", "2,,4,3", "1,x661,4,2"])
    with pytest.raises(
        DataError, match=r"ratings_all_no_timestamp\.csv: line 4: movie_id 'x661' is not"
    ):
        read_movielens_1m_untimed(folder)
