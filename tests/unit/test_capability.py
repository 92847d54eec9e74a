"""benchmarks/capability.py: the truth-based references, and (slow) a small run of it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import capability  # noqa: E402
from emerg_stream.data import read_split  # noqa: E402
from emerg_stream.data.synthetic import TRUE_P  # noqa: E402
from emerg_stream.meta.evaluate import PHASES  # noqa: E402
from emerg_stream.meta.metrics import roc_auc, within_item_auc  # noqa: E402

pytestmark = pytest.mark.usefixtures("restore_benchmark_globals")


def test_references_score_the_test_rows_with_the_truth():
    name = capability.dataset_name(5, "old_items=30,new_items=60,users=200")
    refs = capability.references(name)
    # the truth ranks far better than chance; removing the pair costs a lot of it
    assert refs["oracle"]["auc"] > refs["additive"]["auc"] > 0.55
    assert refs["oracle"]["auc_within"] > refs["additive"]["auc_within"] + 0.05
    # a score constant per item ties every pair of an item's rows: within-item 50 exactly
    assert refs["item_bias"]["auc_within"] == 0.5
    assert capability.share(refs["oracle"]["auc"], refs["oracle"]["auc"]) == 1.0
    assert capability.share(0.5, refs["oracle"]["auc"]) == 0.0


@pytest.mark.slow
def test_small_capability_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    params = "old_items=150,new_items=300,users=600"
    res = capability.run(
        [
            "--quick",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--data-seeds",
            "1",
            "--params",
            params,
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "| emerg |" in out and "| *oracle* |" in out and "share within C" in out
    # the oracle is the true probability of the very test rows reproduce evaluated
    test = read_split(tmp_path / "data-seed0" / "split").test
    y = test.column("label").to_numpy()
    p = test.column(TRUE_P).to_numpy()
    items = np.asarray(test.column("item").to_pylist())
    oracle = res["per_data_seed"][0]["references"]["oracle"]
    assert oracle["auc"] == pytest.approx(roc_auc(y, p), abs=1e-12)
    assert oracle["auc_within"] == pytest.approx(within_item_auc(y, p, items), abs=1e-12)
    n_test = res["per_data_seed"][0]["split"]["row_counts"]["test"]
    assert len(y) == n_test
    for method in ("emerg", "deepfm", "metae"):
        for phase in PHASES:
            m = res["summary"]["methods"][method][phase]
            # every method beats chance, and none beats the truth
            assert 0.5 < m["auc"]["mean"] < oracle["auc"], (method, phase)
            assert 0.0 < m["share"]["mean"] < 1.0
        assert res["summary"]["methods"][method]["warm_c"]["auc_within"]["mean"] > 0.5
