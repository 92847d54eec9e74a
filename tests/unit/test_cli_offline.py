"""The offline jobs end to end through the CLI, on a small synthetic dataset YAML."""

import json

import numpy as np
import pytest

from emerg_stream.cli import main
from emerg_stream.meta.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def synthetic_yaml(tmp_path_factory):
    """A learnable log: clicks depend on the genre, the user group and their match."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    lines = ["item,user,ts,label,genre,tags,price,group"]
    t = 0
    for i in range(40):
        n_rows = 70 if i < 24 else 30  # N=60: old items have 70 rows; new ones 30 (3K=15)
        genre = i % 4
        for _ in range(n_rows):
            u = int(rng.integers(0, 50))
            group = u % 4
            p = 0.1 + 0.3 * (genre < 2) + 0.2 * (group == 0) + 0.3 * (group == genre)
            label = int(rng.random() < p)
            lines.append(f"i{i},u{u},{t},{label},g{genre},a|b{genre},{i % 7},c{group}")
            t += 1
    (root / "log.csv").write_text("\n".join(lines) + "\n")
    (root / "ds.yaml").write_text(
        "name: synthetic\npath: log.csv\nitem_id: item\nuser_id: user\nlabel: label\n"
        "timestamp: ts\nitem_features:\n  - {name: genre, kind: categorical}\n"
        "  - {name: tags, kind: multi, separator: '|', max_len: 3}\n"
        "  - {name: price, kind: numeric}\nuser_features:\n  - {name: group, kind: categorical}\n"
        "split: {n: 60, k: 5}\n"
    )
    return root / "ds.yaml"


def test_reproduce_evaluate_explain(synthetic_yaml, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "reproduce",
            "--dataset",
            str(synthetic_yaml),
            "--methods",
            "emerg,deepfm,metae",
            "--seeds",
            "2",
            "--out",
            str(run),
            "--pretrain-epochs",
            "3",
            "--meta-epochs",
            "1",
            "--batch-size",
            "64",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| emerg |" in out and "| metae |" in out
    assert "| method | within-item AUC cold |" in out and "between-item AUC C |" in out
    results = json.loads((run / "results.json").read_text())
    for method in ("emerg", "deepfm", "metae"):
        res = results["methods"][method]
        assert set(res["seeds"]) == {"0", "1"}
        for phase in ("cold", "warm_a", "warm_b", "warm_c"):
            assert 0.0 <= res["summary"][phase]["auc_mean"] <= 1.0
            for metric in ("auc_within", "auc_between"):
                seeds = [res["seeds"][s][phase][metric] for s in ("0", "1")]
                assert res["summary"][phase][f"{metric}_mean"] == pytest.approx(np.mean(seeds))
        assert res["protocol"]["warmup"]["steps"] >= 1
    # EmerG's reading of eq. (9) was chosen on pseudo-new items: both readings scored,
    # the better one trained (and recorded in the checkpoint's model config)
    emerg = results["methods"]["emerg"]
    readings = emerg["protocol"]["validation"]["readings"]
    assert set(readings) == {"joint", "joint+fm", "field", "field+fm"}
    best = max(readings, key=readings.get)
    with_fm = "+fm" in best  # the whole FM: pairwise and first-order terms
    assert emerg["model_overrides"] == {
        "attention": best.split("+")[0],
        "fm": with_fm,
        "linear": with_fm,
    }
    assert emerg["protocol"]["validation"]["score"] == max(readings.values())
    config = load_checkpoint(run / "checkpoints" / "emerg-seed1").model.config
    assert emerg["model_overrides"] == {
        "attention": config.attention,
        "fm": config.fm,
        "linear": config.linear,
    }
    assert "model_overrides" in results["methods"]["deepfm"]
    assert "readings" not in results["methods"]["deepfm"]["protocol"]["validation"]
    # the signal is learnable: after warm-up EmerG ranks clearly better than chance
    assert results["methods"]["emerg"]["summary"]["warm_c"]["auc_mean"] > 0.6

    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run / "checkpoints" / "emerg-seed0"),
                "--dataset",
                str(synthetic_yaml),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    seed0 = results["methods"]["emerg"]["seeds"]["0"]["warm_c"]["auc"]
    c0 = results["methods"]["emerg"]["seeds"]["0"]["warm_c"]
    # re-evaluation reproduces the run, every column
    assert (
        f"| C | {100 * seed0:.2f} | {100 * c0['auc_within']:.2f} | "
        f"{100 * c0['auc_between']:.2f} | {100 * c0['f1']:.2f} |"
    ) in table

    png = tmp_path / "graph.png"
    assert main(["explain", "--run", str(run), "--item", "i30", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # benchmarks/warmup_precision.py on the run: two backends of one function agree, and
    # the first backend's table is the run's own
    precision = _warmup_precision(
        ["--run", str(run), "--dataset", str(synthetic_yaml), "--backends", "kernel", "autograd"]
    )
    assert set(precision["seeds"]) == {"0", "1"}
    assert precision["seeds"]["0"]["kernel"]["warm_c"]["auc"] == pytest.approx(seed0, abs=1e-6)
    assert precision["largest_abs_difference"] < 1e-4


def _warmup_precision(argv: list[str]) -> dict:
    """benchmarks/warmup_precision.py's run, the globals it sets given back."""
    import structlog
    import torch

    from benchmarks.warmup_precision import run

    threads, config = torch.get_num_threads(), structlog.get_config()
    try:
        return run([*argv, "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
        structlog.reset_defaults()
        structlog.configure(**config)


def test_unknown_method_is_a_clear_error(synthetic_yaml, tmp_path, capsys):
    code = main(
        [
            "reproduce",
            "--dataset",
            str(synthetic_yaml),
            "--methods",
            "emerg,nope",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "unknown method" in capsys.readouterr().err


def test_explain_unknown_item_is_a_clear_error(tmp_path, capsys):
    assert main(["explain", "--run", str(tmp_path), "--item", "x"]) == 2
    assert "phis-emerg.npz" in capsys.readouterr().err


def test_reproduce_in_processes_equals_one_process(synthetic_yaml, tmp_path, capsys, monkeypatch):
    """--processes 2 runs every selection and final run in worker processes of one
    thread each; with this process on one thread too, the results are the same numbers."""
    import torch

    from emerg_stream.threads import THREADS_ENV

    args = ["--dataset", str(synthetic_yaml), "--methods", "emerg,deepfm", "--seeds", "2"]
    args += ["--pretrain-epochs", "2", "--meta-epochs", "1", "--batch-size", "64"]
    args += ["--no-progress", "--device", "cpu"]
    monkeypatch.setenv(THREADS_ENV, "1")  # this process on one thread, as each worker
    assert main(["reproduce", *args, "--out", str(tmp_path / "one")]) == 0
    monkeypatch.delenv(THREADS_ENV)
    assert main(["reproduce", *args, "--out", str(tmp_path / "two"), "--processes", "2"]) == 0
    capsys.readouterr()
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["machine"]["processes"] == 2 and two["machine"]["threads"] == 1
    for method in ("emerg", "deepfm"):
        a, b = one["methods"][method], two["methods"][method]
        assert b["seeds"] == a["seeds"]  # every seed, phase and metric
        assert b["protocol"] == a["protocol"] and b["model_overrides"] == a["model_overrides"]
    assert set(two["methods"]["emerg"]["protocol"]["validation"]["readings"]) == {
        "joint",
        "joint+fm",
        "field",
        "field+fm",
    }
    ck_one = load_checkpoint(tmp_path / "one" / "checkpoints" / "emerg-seed1").model
    ck_two = load_checkpoint(tmp_path / "two" / "checkpoints" / "emerg-seed1").model
    for (name, x), (_, y) in zip(
        ck_one.state_dict().items(), ck_two.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    assert main(["reproduce", *args, "--out", str(tmp_path / "bad"), "--processes", "0"]) == 2
    assert "--processes must be 'auto' or a positive integer" in capsys.readouterr().err
