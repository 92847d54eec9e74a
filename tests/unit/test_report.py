"""``emerg-stream report`` on a tiny fake run: plots, heatmaps, prequential AUC."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emerg_stream import cli
from emerg_stream.errors import ConfigError, DataError
from emerg_stream.meta.checkpoint import save_checkpoint
from emerg_stream.model import ModelConfig, build_model
from emerg_stream.report import load_results, pick_items, write_report
from emerg_stream.report.predictions import (
    compare_methods,
    prequential_curve,
    read_predictions,
    read_roles,
)

F = 6
PHASES = ("cold", "warm_a", "warm_b", "warm_c")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """cli.main would bind structlog to this test's captured stderr, closed afterwards."""
    monkeypatch.setattr("emerg_stream.logging.configure_logging", lambda **_: None)


def summary(base: float) -> dict[str, dict[str, float]]:
    return {
        p: {
            "auc_mean": base + 0.01 * i,
            "auc_std": 0.005,
            "f1_mean": 0.6 + 0.01 * i,
            "f1_std": 0.01,
        }
        for i, p in enumerate(PHASES)
    }


def make_run(root: Path, methods: tuple[str, ...] = ("emerg", "deepfm"), n_items: int = 6) -> Path:
    """A run directory shaped like reproduce's: results.json, phis npz, a checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    results = {
        "dataset": "tiny",
        "command": "emerg-stream reproduce --dataset tiny",
        "device": "cpu",
        "methods": {
            m: {
                "summary": summary(0.70 + 0.02 * k),
                "seeds": {str(s): {} for s in range(3)},
                "protocol": {"warmup": {"steps": 1}},
            }
            for k, m in enumerate(methods)
        },
        "wall_time_s": 1.0,
    }
    (root / "results.json").write_text(json.dumps(results))
    if "emerg" in methods:
        torch.manual_seed(0)
        cfg = ModelConfig(
            kind="emerg", n_fields=F, n_item_fields=3, side_fields=(1, 2), vocab_size=61, dim=8
        )
        spec = {"fields": [{"name": n} for n in ("item", "year", "genre", "user", "age", "zip")]}
        meta = {"noise_salt": 0, "warmup": {}, "split": {"k": 2}}
        save_checkpoint(root / "checkpoints" / "emerg-seed0", build_model(cfg), spec, meta)
        rng = np.random.default_rng(0)
        cold = rng.normal(size=(n_items, F, F)).astype(np.float32)
        arrays = {"item_ids": np.array([f"i{i}" for i in range(n_items)]), "cold.adj": cold}
        for step, phase in enumerate(PHASES[1:], start=1):
            # item i drifts i times as fast; item i0 never changes
            scale = (np.arange(n_items) * step)[:, None, None]
            arrays[f"{phase}.adj"] = (cold + scale * rng.normal(size=cold.shape)).astype(np.float32)
        np.savez_compressed(root / "phis-emerg.npz", **arrays)
    return root


def write_predictions(path: Path, n: int = 400) -> None:
    """First half: random scores; second half: perfect ones. Shuffled, with duplicates."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        label = int(rng.random() < 0.4)
        score = rng.random() if i < n // 2 else 0.8 * label + 0.1
        phase = "old" if i % 10 == 0 else "warm_a"
        rows.append(
            {
                "event_id": f"e{i}",
                "event_time": 1_700_000_000_000 + 1000 * i,
                "label": label,
                "score": score,
                "phase": phase,
                "item_id": "x",
            }
        )
    rows.append(dict(rows[5], score=0.99))  # a re-scored duplicate: the first one wins
    order = [*rng.permutation(len(rows) - 1).tolist(), len(rows) - 1]
    if path.suffix == ".csv":
        cols = list(rows[0])
        lines = [",".join(cols)] + [",".join(str(rows[i][c]) for c in cols) for i in order]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text("".join(json.dumps(rows[i]) + "\n" for i in order))


def test_report_writes_a_self_contained_page_with_every_section(tmp_path: Path):
    run = make_run(tmp_path / "run")
    preds = tmp_path / "preds.csv"
    write_predictions(preds)
    report = write_report(run, stream_predictions=preds)
    page = report.html.read_text()
    assert report.html == run / "report.html"
    assert report.notes == []
    # 1 metrics plot + 3 items + 1 prequential plot, all real PNGs, all embedded
    assert len(report.figures) == 5
    for png in report.figures:
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert page.count("data:image/png;base64,") == 5
    assert 'src="report/' not in page  # nothing points outside the page
    assert len(report.items) == 3
    for item in report.items:
        assert f"item {item}" in page
    # the table: mean ± std in %, best AUC of each phase in bold (deepfm here)
    assert "<b>72.00 ± 0.50</b>" in page
    assert "70.00 ± 0.50" in page
    # a run written before the within/between-item AUC existed: the columns say so
    assert "<th>within-item AUC C</th>" in page and "<td>–</td>" in page
    assert "Prequential AUC over stream time" in page
    assert "duplicates dropped (same event id)</th><td>1" in page


def test_report_tables_show_within_and_between_item_auc(tmp_path: Path):
    run = make_run(tmp_path / "run", methods=("deepfm", "metae"))
    results = json.loads((run / "results.json").read_text())
    for k, res in enumerate(results["methods"].values()):
        for i, p in enumerate(PHASES):
            res["summary"][p].update(
                auc_within_mean=0.61 + 0.01 * i + 0.1 * k,
                auc_within_std=0.002,
                auc_between_mean=0.83 - 0.1 * k,
                auc_between_std=0.001,
            )
    (run / "results.json").write_text(json.dumps(results))
    page = write_report(run).html.read_text()
    for p in ("cold", "A", "B", "C"):
        assert f"<th>within-item AUC {p}</th>" in page and f"<th>between-item AUC {p}</th>" in page
    # each from its own summary key, the best of the phase in bold
    assert "<td>64.00 ± 0.20</td>" in page and "<b>74.00 ± 0.20</b>" in page  # within, C
    assert "<b>83.00 ± 0.10</b>" in page and "<td>73.00 ± 0.10</td>" in page  # between
    assert "<td>–</td>" not in page
    assert "Within-item AUC</i> = Σ" in page


def test_heatmap_items_span_the_range_of_change(tmp_path: Path):
    run = make_run(tmp_path / "run")
    picks = pick_items(run, "emerg", 3)
    ids = [i for i, _ in picks]
    assert len(set(ids)) == 3
    assert ids[-1] == "i0"  # never changed: the smallest change
    assert "smallest change (mean |Δ| = 0.000)" in picks[-1][1]
    assert "largest change" in picks[0][1]
    assert ids[0] != "i0"


def test_chosen_items_and_missing_graph_method(tmp_path: Path):
    run = make_run(tmp_path / "run")
    assert write_report(run, items=["i2"]).items == ["i2"]
    with pytest.raises(ConfigError, match="not a new item"):
        # an unknown item is a user error, reported as a note, never a crash
        from emerg_stream.meta.explain import item_graphs

        item_graphs(run, "nope")
    rep = write_report(run, items=["nope"])
    assert rep.items == [] and "is not a new item" in rep.notes[0]
    only_deepfm = make_run(tmp_path / "run2", methods=("deepfm",))
    rep = write_report(only_deepfm)
    assert rep.notes == ["feature graphs: method 'emerg' is not in this run"]
    assert "Left out" in rep.html.read_text()
    assert len(rep.figures) == 1


def test_missing_or_broken_results_are_clear_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="emerg-stream reproduce"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"methods": {"emerg": {"summary": {}}}}))
    with pytest.raises(ConfigError, match="phase 'cold' lacks"):
        load_results(tmp_path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_prequential_curve_sees_the_stream_get_better(tmp_path: Path, suffix: str):
    path = tmp_path / f"preds{suffix}"
    write_predictions(path)
    pred = read_predictions(path)
    assert len(pred) == 400 and pred.duplicates == 1
    assert np.all(np.diff(pred.event_time) >= 0)
    assert pred.has_phase and pred.new_item.sum() == 360
    curve = prequential_curve(pred, windows=4, min_window_rows=50)
    assert len(curve.window_auc) == 4
    assert curve.window_auc[-1] == 1.0 and curve.window_auc[-2] == 1.0
    assert abs(curve.window_auc[0] - 0.5) < 0.2
    assert curve.cumulative_auc[-1] > curve.cumulative_auc[0]
    assert curve.cumulative_auc_new is not None and curve.auc_new is not None
    assert curve.window_end[-1] == pred.event_time[-1]


def test_gzip_iso_times_and_few_rows(tmp_path: Path):
    path = tmp_path / "p.jsonl.gz"
    rows = [
        {"event_time": "2024-01-01T00:00:01Z", "label": 1, "score": 0.9},
        {"event_time": "2024-01-01T00:00:00+00:00", "label": 0, "score": 0.2},
    ]
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    pred = read_predictions(path)
    assert pred.event_time.tolist() == [1704067200000, 1704067201000]
    assert not pred.has_phase
    curve = prequential_curve(pred)
    assert len(curve.window_auc) == 1 and curve.auc == 1.0 and curve.cumulative_auc_new is None


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("event_time,score\n1,0.5\n", r"header lacks \['label'\]"),
        ("event_time,label,score\n1,2,0.5\n", r":2: label must be 0 or 1"),
        ("event_time,label,score\n1,1,0.5\n1,0,abc\n", r":3: could not convert"),
        ("event_time,label,score\n", "no predictions"),
        ("event_time,label,score\n2024-01-01T00:00:00,1,0.5\n", "no time zone"),
    ],
)
def test_bad_prediction_files_name_the_line(tmp_path: Path, content: str, match: str):
    path = tmp_path / "p.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_predictions(path)


def test_unknown_format_and_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match="no stream predictions file"):
        read_predictions(tmp_path / "nope.csv")
    (tmp_path / "p.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="unknown predictions format"):
        read_predictions(tmp_path / "p.parquet")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run = make_run(tmp_path / "run")
    preds = tmp_path / "p.jsonl"
    write_predictions(preds)
    argv = ["report", "--run", str(run), "--stream-predictions", str(preds), "--item", "i1"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run / "report.html")
    assert cli.main(["report", "--run", str(tmp_path / "none")]) == 2
    assert "results.json not found" in capsys.readouterr().err


def test_no_old_items_means_one_cumulative_curve(tmp_path: Path):
    path = tmp_path / "p.csv"
    lines = ["event_time,label,score,phase"]
    lines += [f"{i},{i % 2},{0.1 + 0.8 * (i % 2)},warm_a" for i in range(100)]
    path.write_text("\n".join(lines) + "\n")
    curve = prequential_curve(read_predictions(path))
    assert curve.cumulative_auc_new is None
    assert curve.auc_new == curve.auc == 1.0


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_shadow_methods_rows_are_read_apart_and_compared_on_the_same_clicks(
    tmp_path: Path, suffix: str
):
    """The primary's curve ignores the shadow's rows; the report sets both side by side
    on the clicks both scored (here the shadow missed the first 100: a late start)."""
    plain = tmp_path / f"plain{suffix}"
    write_predictions(plain)
    both = tmp_path / f"both{suffix}"
    write_predictions(both)
    text = both.read_text()
    if suffix == ".csv":
        head, *lines = text.splitlines()
        cols = head.split(",")
        rows = [dict(zip(cols, line.split(","), strict=True)) for line in lines]
        shadow = [
            {**r, "score": "0.5", "method": "deepfm", "shadow": "true"}
            for r in rows
            if int(r["event_id"][1:]) >= 100
        ]
        rows = [{**r, "method": "emerg", "shadow": "false"} for r in rows] + shadow
        cols += ["method", "shadow"]
        out = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]
        both.write_text("\n".join(out) + "\n")
    else:
        rows = [json.loads(line) for line in text.splitlines()]
        shadow = [
            {**r, "score": 0.5, "method": "deepfm", "shadow": True}
            for r in rows
            if int(r["event_id"][1:]) >= 100
        ]
        rows = [{**r, "method": "emerg", "shadow": False} for r in rows] + shadow
        both.write_text("".join(json.dumps(r) + "\n" for r in rows))
    primary, want = read_predictions(both), read_predictions(plain)
    np.testing.assert_array_equal(primary.score, want.score)
    assert primary.duplicates == want.duplicates == 1 and primary.method == "emerg"
    theirs = read_predictions(both, shadow=True)
    assert len(theirs) == 300 and theirs.method == "deepfm"
    one_pass = read_roles(both)  # both roles in one read: the same as the two reads
    assert one_pass[1] is not None and one_pass[1].event_id == theirs.event_id
    np.testing.assert_array_equal(one_pass[0].score, primary.score)
    assert one_pass[0].duplicates == primary.duplicates and read_roles(plain)[1] is None
    cmp = compare_methods(primary, theirs)
    assert cmp.methods == ("emerg", "deepfm (shadow)") and cmp.n == 300
    assert cmp.auc[1] == 0.5 and cmp.auc[0] > 0.7
    run = make_run(tmp_path / "run")
    page = write_report(run, stream_predictions=both).html.read_text()
    assert "Shadow method beside the primary" in page and "deepfm (shadow)" in page
    assert "Shadow method" not in write_report(run, stream_predictions=plain).html.read_text()
