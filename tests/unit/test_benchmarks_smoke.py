"""The benchmark scripts run at their smallest sizes (keeps them from rotting; no timings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import cold_start, growth, inner_loop, run_all, training  # noqa: E402

# the scripts set torch threads and quieten structlog: give both back
pytestmark = pytest.mark.usefixtures("restore_benchmark_globals")

CPU = ["--device", "cpu", "--reps", "1", "--threads", "1"]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_inner_loop_smallest(capsys):
    res = inner_loop.run(
        [
            *CPU,
            "--quick",
            "--sizes",
            "3",
            "--fix-items",
            "3",
            "--chunk-items",
            "4",
            "--thread-items",
            "3",
            "--procs-items",
            "0",
        ]
    )
    assert last_json(capsys.readouterr().out)["benchmark"] == "inner_loop"
    assert {r["config"] for r in res["results"]} == set(inner_loop.CONFIGS)
    assert all(r["f32_ok"] and r["f64_ok"] for r in res["results"])
    assert res["flops"]["matmul_flops_per_row_step"] > 0
    assert res["memory"]["saved_for_backward_bytes_per_item"] > 0
    assert res["attention_fix"]["max_abs_diff"] <= 1e-4
    assert res["warmup_chunking"]["max_abs_diff"] <= 1e-6


def test_inner_loop_extrapolates_a_sample(capsys):
    res = inner_loop.run(
        [*CPU, "--quick", "--sizes", "6", "--ref-full-max", "2", "--ref-sample", "2", "--no-extras"]
    )
    capsys.readouterr()
    assert all(
        r["per_item_extrapolated"] and r["per_item_items_timed"] == 2 for r in res["results"]
    )


def test_cold_start_smallest(capsys):
    res = cold_start.run([*CPU, "--quick", "--sizes", "8", "--ref-full-max", "4"])
    assert last_json(capsys.readouterr().out)["benchmark"] == "cold_start"
    (row,) = res["results"]
    assert row["per_item_extrapolated"] and row["max_abs_diff"] <= 1e-5
    assert res["chunking"] is None or res["chunking"]["max_abs_diff"] <= 1e-5


def test_training_smallest_on_synthetic_tasks(capsys):
    res = training.run(
        [
            *CPU,
            "--quick",
            "--synthetic",
            "--quick-items",
            "6",
            "--batches",
            "1",
            "--meta-batch",
            "4",
        ]
    )
    assert last_json(capsys.readouterr().out)["benchmark"] == "training"
    (cmp,) = res["meta_step_compare"]
    # the per-task loop is the same math: the meta-gradients agree
    assert cmp["max_abs_diff_meta_grad"] <= 1e-5 * max(1.0, cmp["max_abs_meta_grad"])
    assert res["pretrain"]["wall_s"] > 0 and res["meta_train"]["wall_s"] > 0
    # with a C++ compiler the batched step is the kernel's, timed beside autograd's
    assert set(cmp["alternatives"]) == (
        {"batched_autograd", "per_task_kernel"} if cmp["backend"] == "kernel" else set()
    )
    for alt in cmp["alternatives"].values():
        assert alt["max_abs_diff_meta_grad"] <= 1e-5 * max(1.0, cmp["max_abs_meta_grad"])


def test_training_skips_cleanly_without_data(capsys, tmp_path):
    res = training.run([*CPU, "--quick", "--data-dir", str(tmp_path / "absent")])
    assert "skipped" in res
    assert "skipped" in last_json(capsys.readouterr().out)


def test_growth_smallest_writes_the_plot(capsys, tmp_path):
    png = tmp_path / "growth.png"
    res = growth.run([*CPU, "--quick", "--sizes", "4", "--ref-full-max", "4", "--png", str(png)])
    capsys.readouterr()
    assert png.stat().st_size > 0
    assert {p["series"] for p in res["points"]} == set(growth.SERIES)


def test_run_all_summarises_the_targets(capsys):
    res = cold_start.run([*CPU, "--sizes", "4", "--no-extras"])
    capsys.readouterr()
    (line,) = run_all.targets({"cold_start": res})
    assert line["benchmark"] == "cold_start" and line["met"] in ("yes", "no")


def test_model_variants_smallest(capsys):
    from benchmarks import capability, model_variants

    model_variants.main(
        [
            *CPU,
            "--quick",
            "--dataset",
            f"synthetic-pairs:{capability.QUICK_PARAMS}",
            "--variants",
            "emerg-joint,deepfm",
        ]
    )
    res = last_json(capsys.readouterr().out)
    assert [r["variant"] for r in res["runs"]] == ["emerg-joint", "deepfm"]
    for r in res["runs"]:
        assert set(r["metrics"]) == {"cold", "warm_a", "warm_b", "warm_c"}
        assert 0.0 < r["metrics"]["warm_a"]["auc"] < 1.0


def test_model_variants_in_two_processes_give_the_units_of_one(capsys):
    from benchmarks import capability, model_variants

    args = [
        *CPU,
        "--quick",
        "--dataset",
        f"synthetic-pairs:{capability.QUICK_PARAMS}",
        "--variants",
        "emerg-joint,deepfm",
        "--seeds",
        "0,1",
    ]
    model_variants.main(args)
    alone = last_json(capsys.readouterr().out)["runs"]
    model_variants.main([*args, "--processes", "2"])
    pooled = last_json(capsys.readouterr().out)["runs"]
    assert [(r["seed"], r["variant"]) for r in pooled] == [
        (0, "emerg-joint"),
        (0, "deepfm"),
        (1, "emerg-joint"),
        (1, "deepfm"),
    ]
    for a, b in zip(alone, pooled, strict=True):
        assert a["metrics"] == b["metrics"]


def test_multi_hot_sum_turns_every_multi_field_mean_into_a_sum_and_nothing_else():
    from types import SimpleNamespace

    import numpy as np
    import torch

    from benchmarks.model_variants import multi_hot_sum
    from emerg_stream.meta.evaluate import NewItemData
    from emerg_stream.meta.pipeline import Prepared
    from emerg_stream.meta.rows import ItemSet, Rows

    kinds = ["categorical", "multi", "numeric"]
    spec = SimpleNamespace(fields=[SimpleNamespace(kind=k) for k in kinds])
    # row 0: 3 of 4 slots kept (1/3 each); row 1: an empty list's OOV token (weight 1)
    w = torch.zeros(2, 3, 4)
    w[:, 0, 0] = 1.0
    w[0, 1, :3] = 1 / 3
    w[1, 1, 0] = 1.0
    w[:, 2, 0] = torch.tensor([0.25, -1.5])  # a numeric field's normalised value
    tokens = torch.ones(2, 3, 4, dtype=torch.long)

    def rows() -> Rows:
        return Rows(tokens, w.clone(), torch.zeros(2), torch.zeros(2, dtype=torch.long))

    items = ItemSet(["a", "b"], tokens, w.clone())
    data = Prepared(items, rows(), np.zeros(2), NewItemData(items, {"warm_a": rows()}, rows()))
    out = multi_hot_sum(data, spec)
    want = w.clone()
    want[0, 1, :3] = 1.0
    for got in (
        out.old_rows.weights,
        out.old_items.weights,
        out.new.items.weights,
        out.new.warm["warm_a"].weights,
        out.new.test.weights,
    ):
        assert torch.equal(got, want)
    assert torch.equal(data.old_rows.weights, w)  # the input is left as it was
