"""The thread rule: affinity, cgroup quota (v1 and v2, read from fake files), EMERG_THREADS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from emerg_stream.errors import ConfigError
from emerg_stream.stream.members import resolve_members
from emerg_stream.threads import (
    THREADS_ENV,
    ThreadBudget,
    cgroup_cpu_limit,
    resolve_threads,
    threads_per_process,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def v2(tmp_path: Path, cpu_max: str | None, path: str = "/", parent: str | None = None) -> Path:
    """A cgroup v2 tree at tmp_path/root and a /proc/self/cgroup naming ``path``."""
    root = tmp_path / "root"
    own = root / path.strip("/") if path.strip("/") else root
    own.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    if cpu_max is not None:
        (own / "cpu.max").write_text(cpu_max + "\n")
    if parent is not None:
        (own.parent / "cpu.max").write_text(parent + "\n")
    (tmp_path / "cgroup").write_text(f"0::{path}\n")
    return root


def v1(tmp_path: Path, quota: str, period: str = "100000", path: str = "/job") -> Path:
    """A cgroup v1 tree (cpu,cpuacct mounted, a hybrid v2 line too) at tmp_path/root."""
    root = tmp_path / "root"
    own = root / "cpu,cpuacct" / path.strip("/")
    own.mkdir(parents=True)
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")  # the root: unlimited
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    (own / "cpu.cfs_quota_us").write_text(quota + "\n")
    (own / "cpu.cfs_period_us").write_text(period + "\n")
    (tmp_path / "cgroup").write_text(f"4:memory:{path}\n2:cpu,cpuacct:{path}\n0::/\n")
    return root


def resolve(tmp_path: Path, root: Path, affinity: int = 8, **env: str) -> ThreadBudget:
    return resolve_threads(
        env=env, cgroup_root=root, proc_cgroup=tmp_path / "cgroup", affinity=affinity
    )


def test_no_quota_gives_the_affinity(tmp_path: Path) -> None:
    b = resolve(tmp_path, v2(tmp_path, "max 100000"), affinity=6)
    assert (b.threads, b.source, b.quota_cpus) == (6, "affinity", None)


def test_a_v2_quota_is_floored_to_whole_cpus(tmp_path: Path) -> None:
    b = resolve(tmp_path, v2(tmp_path, "150000 100000"))
    assert (b.threads, b.source, b.quota_cpus) == (1, "cgroup-v2", 1.5)
    b = resolve(tmp_path, v2(tmp_path, "250000 100000"))
    assert (b.threads, b.source) == (2, "cgroup-v2")


def test_a_quota_below_one_cpu_still_gives_one_thread(tmp_path: Path) -> None:
    b = resolve(tmp_path, v2(tmp_path, "20000 100000"))
    assert (b.threads, b.source, b.quota_cpus) == (1, "cgroup-v2", 0.2)


def test_a_quota_above_the_affinity_leaves_the_affinity(tmp_path: Path) -> None:
    b = resolve(tmp_path, v2(tmp_path, "800000 100000"), affinity=2)
    assert (b.threads, b.source, b.quota_cpus) == (2, "affinity", 8.0)


def test_the_tightest_quota_on_the_path_wins(tmp_path: Path) -> None:
    root = v2(tmp_path, "max 100000", path="/kubepods/pod1", parent="300000 100000")
    b = resolve(tmp_path, root)
    assert (b.threads, b.source) == (3, "cgroup-v2")


def test_a_container_path_not_under_the_mount_reads_the_mount_itself(tmp_path: Path) -> None:
    root = v2(tmp_path, "200000 100000")  # the container's own cgroup mounted at root
    (tmp_path / "cgroup").write_text("0::/host/slice/that/is/not/visible\n")
    assert resolve(tmp_path, root).threads == 2


@pytest.mark.parametrize(
    ("quota", "period", "threads", "cpus"),
    [("150000", "100000", 1, 1.5), ("300000", "50000", 6, 6.0), ("50000", "100000", 1, 0.5)],
)
def test_v1_quota_and_period(
    tmp_path: Path, quota: str, period: str, threads: int, cpus: float
) -> None:
    b = resolve(tmp_path, v1(tmp_path, quota, period))
    assert (b.threads, b.source, b.quota_cpus) == (threads, "cgroup-v1", cpus)


def test_v1_unlimited(tmp_path: Path) -> None:
    b = resolve(tmp_path, v1(tmp_path, "-1"), affinity=4)
    assert (b.threads, b.source, b.quota_cpus) == (4, "affinity", None)


def test_emerg_threads_caps_but_never_raises(tmp_path: Path) -> None:
    root = v2(tmp_path, "400000 100000")
    b = resolve(tmp_path, root, **{THREADS_ENV: "2"})
    assert (b.threads, b.source, b.setting) == (2, THREADS_ENV, 2)
    b = resolve(tmp_path, root, **{THREADS_ENV: "16"})
    assert (b.threads, b.source) == (4, "cgroup-v2")


def test_emerg_threads_wins_over_omp_num_threads(tmp_path: Path) -> None:
    root = v2(tmp_path, None)
    assert resolve(tmp_path, root, OMP_NUM_THREADS="1").threads == 1
    b = resolve(tmp_path, root, OMP_NUM_THREADS="1", **{THREADS_ENV: "3"})
    assert (b.threads, b.source) == (3, THREADS_ENV)
    b = resolve(tmp_path, root, OMP_NUM_THREADS="2,1")  # nested OpenMP levels: the outer one
    assert (b.threads, b.source) == (2, "OMP_NUM_THREADS")


def test_an_explicit_number_replaces_the_setting(tmp_path: Path) -> None:
    root = v2(tmp_path, "300000 100000")
    b = resolve_threads(
        1, env={THREADS_ENV: "2"}, cgroup_root=root, proc_cgroup=tmp_path / "cgroup", affinity=8
    )
    assert (b.threads, b.source) == (1, "flag")


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_a_bad_setting_is_a_clear_error(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match=THREADS_ENV):
        resolve(tmp_path, v2(tmp_path, None), **{THREADS_ENV: bad})


def test_a_bad_omp_num_threads_is_ignored(tmp_path: Path) -> None:
    b = resolve(tmp_path, v2(tmp_path, None), affinity=3, OMP_NUM_THREADS="lots")
    assert (b.threads, b.source, b.setting) == (3, "affinity", None)


@pytest.mark.parametrize("content", ["", "abc 100000", "0 100000", "1 2 3"])
def test_an_unreadable_cgroup_file_is_ignored(tmp_path: Path, content: str) -> None:
    root = v2(tmp_path, content)
    assert cgroup_cpu_limit(root, tmp_path / "cgroup") is None
    assert resolve(tmp_path, root, affinity=2).threads == 2


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "nothing", tmp_path / "no-such-file") is None


def test_processes_share_the_budget(tmp_path: Path) -> None:
    b = resolve(tmp_path, v2(tmp_path, "400000 100000"))
    assert [threads_per_process(b, n) for n in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]


def test_members_auto_counts_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "1")
    assert resolve_members("auto") == 1


def run_cli(args: list[str], env: dict[str, str], affinity: str | None = None) -> str:
    """A job's stderr, run as a user would (torch imported after the rule is applied)."""
    cmd = [sys.executable, "-m", "emerg_stream.cli", "--log-json", *args]
    if affinity is not None:
        cmd = ["taskset", "-c", affinity, *cmd]
    full = {k: v for k, v in os.environ.items() if not k.startswith(("EMERG_", "OMP_", "MKL_"))}
    full.update(env, PYTHONPATH=str(REPO_ROOT))
    res = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    return res.stderr


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_a_job_logs_and_applies_the_rule_once() -> None:
    import json

    err = run_cli(["config", "show"], {THREADS_ENV: "1"})
    lines = [json.loads(x) for x in err.splitlines() if '"threads_resolved"' in x]
    assert len(lines) == 1
    assert lines[0]["threads"] == 1
    want = "affinity" if len(os.sched_getaffinity(0)) == 1 else THREADS_ENV
    assert lines[0]["source"] == want


def test_torch_numpy_and_the_wait_policy_follow_the_rule() -> None:
    code = (
        "import os; from emerg_stream.threads import configure_threads; configure_threads(); "
        "import torch; print(torch.get_num_threads(), torch.get_num_interop_threads(), "
        "os.environ['OMP_WAIT_POLICY'], os.environ['OPENBLAS_NUM_THREADS'])"
    )
    full = {k: v for k, v in os.environ.items() if not k.startswith(("EMERG_", "OMP_", "MKL_"))}
    full.update({THREADS_ENV: "1", "PYTHONPATH": str(REPO_ROOT)})
    res = subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1].split() == ["1", "1", "PASSIVE", "1"]


def test_a_second_resolution_keeps_the_users_omp_cap() -> None:
    """The first application overwrites OMP_NUM_THREADS with the number applied; resolving
    again in the same process (a second command run in-process) still sees the user's 1."""
    code = (
        "from emerg_stream.threads import configure_threads as c; "
        "print(c().threads, c().threads, c().source)"
    )
    full = {k: v for k, v in os.environ.items() if not k.startswith(("EMERG_", "OMP_", "MKL_"))}
    full.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    res = subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    source = "affinity" if len(os.sched_getaffinity(0)) == 1 else "OMP_NUM_THREADS"
    assert res.stdout.splitlines()[-1].split() == ["1", "1", source]


def test_one_owner_sets_threads() -> None:
    """Only emerg_stream/threads.py counts CPUs or sets thread counts in the package and jobs."""
    owner = REPO_ROOT / "emerg_stream" / "threads.py"
    needles = ("set_num_threads(", "set_num_interop_threads(", "sched_getaffinity(", "cpu_count(")
    offenders = [
        f"{path.relative_to(REPO_ROOT)}: {needle}"
        for folder in ("emerg_stream", "jobs")
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        if path != owner
        for needle in needles
        if needle in path.read_text()
    ]
    assert offenders == []
