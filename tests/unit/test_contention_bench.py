"""benchmarks/contention.py without running jobs: the variants' environments, the quota
cgroup's files, and the ratios and targets of its report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import contention  # noqa: E402
from emerg_stream.threads import THREADS_ENV  # noqa: E402


def test_variants_run_without_inherited_thread_variables(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv(THREADS_ENV, "1")
    before = contention.child_env("before")
    assert not {"OMP_NUM_THREADS", "OMP_WAIT_POLICY", THREADS_ENV} & set(before)
    assert contention.child_env("one-thread")[THREADS_ENV] == "1"
    cmd = contention.child_command("before", "reproduce", "ml-100k", Path("out"), [])
    assert cmd[1] == "-c" and "reproduce" in cmd  # the job without the thread setup
    after = contention.child_command("after", "reproduce", "ml-100k", Path("out"), [])
    assert after[1:3] == ["-m", "emerg_stream.cli"]
    # threads in one process everywhere but the processes variant
    for variant, want in (("before", "1"), ("after", "1"), ("processes", "auto")):
        cmd = contention.child_command(variant, "reproduce", "ml-100k", Path("out"), [])
        assert cmd[cmd.index("--processes") + 1] == want


def test_worker_job_runs_the_drain_and_reads_its_seconds(tmp_path):
    out = tmp_path / "out"
    cmd = contention.child_command("after", "worker", "ml-100k", out, ["--quick"])
    assert cmd[1].endswith("stream_throughput.py") and cmd[2:6] == ["--cases", "c", "--reps", "1"]
    assert "--quick" in cmd and cmd[-2:] == ["--json", str(out / "results.json")]
    # a child that writes what stream_throughput writes: its drain seconds are the job's
    code = (
        "import json, sys; json.dump({'seconds': {'c': [3.25]}}, "
        f"open({str(out / 'results.json')!r}, 'w'))"
    )
    got = contention.run_child([sys.executable, "-c", code], {}, tmp_path, 60.0, None)
    assert got.job_s == pytest.approx(3.25) and got.wall_s > 0
    cells = {
        "alone": {"after": contention.Cell([contention.Run(30, 9, 1.0, 1.0, 1, 4.0)])},
        "spin1": {"after": contention.Cell([contention.Run(60, 9, 1.0, 1.0, 1, 5.0)])},
    }
    s = contention.summarise(cells, "job_s")
    assert s["spin1"]["after"]["vs_alone"] == pytest.approx(1.25)  # 5 / 4, not 60 / 30
    assert "| spin1 | 5.0 (1.25x)" in contention.markdown(cells, s, {}, "job_s")


def test_quota_cgroup_writes_v1_files_and_removes_the_group(tmp_path, monkeypatch):
    (tmp_path / "cpu").mkdir()
    monkeypatch.setattr(contention, "_own_path", lambda controllers: "/")
    with contention.quota_cgroup(1.5, root=tmp_path) as procs:
        group = procs.parent
        assert group.parent == tmp_path / "cpu"
        assert (group / "cpu.cfs_quota_us").read_text() == "150000"
        assert (group / "cpu.cfs_period_us").read_text() == "100000"
        for f in group.iterdir():  # a real cgroup's files go with it; these are plain files
            f.unlink()
    assert not group.exists()


def test_quota_cgroup_says_why_it_is_unavailable(tmp_path):
    with (
        pytest.raises(contention.QuotaUnavailableError, match="cpu controller"),
        contention.quota_cgroup(1.0, root=tmp_path),
    ):
        pass


def run(wall: float, threads: int | None = None) -> contention.Run:
    return contention.Run(wall, wall, 1.0, 1.0, threads, wall)


def test_summary_ratios_and_targets():
    cells = {
        "alone": {
            "before": contention.Cell([run(10)]),
            "after": contention.Cell([run(12, 2)]),
            "one-thread": contention.Cell([run(14, 1)]),
        },
        "spin1": {
            "before": contention.Cell([run(40)]),
            "after": contention.Cell([run(24, 2)]),
            "one-thread": contention.Cell([run(28, 1)]),
        },
        "pinned": {
            "before": contention.Cell([run(16)]),
            "after": contention.Cell([run(16, 1)]),
            "one-thread": contention.Cell([run(15, 1)]),
        },
    }
    cells["spin3"] = {
        "before": contention.Cell([contention.Run(90, 20, 5.0, 6.0, None, None, timed_out=True)]),
        "after": contention.Cell([run(36, 2)]),
        "one-thread": contention.Cell([run(30, 1)]),
    }
    s = contention.summarise(cells)
    assert s["spin3"]["before"]["timed_out"] and not s["spin3"]["after"]["timed_out"]
    assert s["spin1"]["after"]["vs_alone"] == pytest.approx(2.0)
    assert s["spin1"]["before"]["vs_alone"] == pytest.approx(4.0)
    assert s["spin1"]["after_vs_before"] == pytest.approx(0.6)
    assert s["targets"]["spin1"]["met"]
    assert s["pinned"]["after_vs_one_thread_alone"] == pytest.approx(16 / 14)
    assert s["targets"]["pinned"]["after"] == pytest.approx(16 / 15)  # the pinned one-thread
    assert s["targets"]["pinned"]["met"]
    assert not s["targets"]["spin3"]["met"]
    md = contention.markdown(cells, s, {"quota": "no cgroup"})
    assert "quota: skipped (no cgroup)" in md and "target spin3: after 3.00x" in md
    assert "| spin3 | >90.0 (9.00x) [5.0-6.0] |" in md
