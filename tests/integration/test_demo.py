"""``emerg-stream demo`` end to end on a small synthetic dataset, and its clean Ctrl-C.

The demo starts its own embedded broker (that is what it demonstrates), so these tests do
not use the ``bootstrap`` fixture; every process it starts listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synthetic_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learnable log: 24 old items (70 rows), 16 new items (30 rows; N=60, K=5)."""
    root = tmp_path_factory.mktemp("demo-data")
    rng = np.random.default_rng(0)
    lines = ["item,user,ts,label,genre,tags,price,group"]
    t = 0
    for i in range(40):
        n_rows = 70 if i < 24 else 30
        genre = i % 4
        for _ in range(n_rows):
            u = int(rng.integers(0, 50))
            group = u % 4
            p = 0.1 + 0.3 * (genre < 2) + 0.2 * (group == 0) + 0.3 * (group == genre)
            lines.append(
                f"i{i},u{u},{t},{int(rng.random() < p)},g{genre},a|b{genre},{i % 7},c{group}"
            )
            t += int(rng.integers(0, 3))  # ties in time on purpose
    (root / "log.csv").write_text("\n".join(lines) + "\n")
    (root / "ds.yaml").write_text(
        "name: synthetic\npath: log.csv\nitem_id: item\nuser_id: user\nlabel: label\n"
        "timestamp: ts\nitem_features:\n  - {name: genre, kind: categorical}\n"
        "  - {name: tags, kind: multi, separator: '|', max_len: 3}\n"
        "  - {name: price, kind: numeric}\nuser_features:\n  - {name: group, kind: categorical}\n"
        "split: {n: 60, k: 5}\n"
    )
    return root / "ds.yaml"


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo cache for the module: the second test reuses the first one's training."""
    return tmp_path_factory.mktemp("demo-work")


def demo_args(dataset: Path, work: Path, *extra: str) -> list[str]:
    return [
        "demo",
        "--dataset",
        str(dataset),
        "--work-dir",
        str(work),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The CLI in a child process (its logging setup must not leak into other tests)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMERG_")}
    return subprocess.run(
        [sys.executable, "-m", "emerg_stream.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_demo_matches_offline_and_reuses_its_checkpoint(
    synthetic_yaml: Path, work_dir: Path, tmp_path: Path
) -> None:
    work = work_dir
    out = tmp_path / "demo.json"
    done = run_cli(*demo_args(synthetic_yaml, work, "--json", str(out)))
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert "| stream |" in printed and "| offline |" in printed
    assert "demo wall time" in printed
    result = json.loads(out.read_text())
    assert not result["reused"]
    stream, offline = result["stream"]["stream"], result["offline"]
    for phase in ("cold", "warm_a", "warm_b", "warm_c"):
        assert abs(stream[phase]["auc"] - offline[phase]["auc"]) < 1e-3, phase
    assert result["stream"]["missing_items"] == []
    assert result["replay"]["items"] == 40
    assert result["replay"]["test_rows_left_out"] == 16 * 15
    assert result["dead_letters"] == 0
    inter = result["outcomes"]["interactions"]
    assert inter["dead_lettered"] == 0
    assert inter["applied"] == 16 * 15  # the new items' warm rows
    assert inter["ignored_old_item"] == 24 * 70

    done = run_cli(*demo_args(synthetic_yaml, work, "--reuse", "--json", str(out)))
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["reused"] and again["checkpoint"] == result["checkpoint"]
    assert again["offline"] == result["offline"]
    assert again["stream"]["stream"]["warm_c"]["auc"] == pytest.approx(
        stream["warm_c"]["auc"], abs=1e-9
    )


def _pids(lines: list[str], event: str) -> list[int]:
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event and "pid" in rec:
            out.append(int(rec["pid"]))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def start_demo(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMERG_")}
    return subprocess.Popen(
        [sys.executable, "-m", "emerg_stream.cli", "--log-json", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(proc: subprocess.Popen[str], event: str, timeout: float = 120) -> list[str]:
    """Log lines of ``proc`` up to the one with ``event`` (or its end)."""
    lines: list[str] = []
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if f'"{event}"' in line:
            break
    return lines


def test_ctrl_c_during_training_stops_at_once(synthetic_yaml: Path, tmp_path: Path) -> None:
    proc = start_demo(*demo_args(synthetic_yaml, tmp_path / "work"))
    lines = read_until(proc, "data_prepared")
    assert any('"data_prepared"' in line for line in lines), "".join(lines[-20:])
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert time.monotonic() - t0 < 30
    assert "broker_started" not in err


@pytest.mark.parametrize("after", ["worker_started", "replay_done"])
def test_ctrl_c_stops_worker_and_broker(synthetic_yaml: Path, work_dir: Path, after: str) -> None:
    work = work_dir
    if not any(work.glob("run-*/results.json")):
        # train first, so the interrupted run spends its time in the streaming part
        done = run_cli(*demo_args(synthetic_yaml, work))
        assert done.returncode == 0, done.stderr[-3000:]
    # interrupted in the replay, the log plays at 100x its event time (about 20 s), so the
    # demo cannot finish before the signal arrives; after the replay, at full speed
    speed = ("--speed", "100") if after == "worker_started" else ()
    proc = start_demo(*demo_args(synthetic_yaml, work, "--reuse", *speed))
    lines = read_until(proc, after)
    worker_pids, broker_pids = _pids(lines, "worker_started"), _pids(lines, "broker_started")
    assert worker_pids and broker_pids, "".join(lines[-20:])
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err[-2000:]
    assert "demo stopped" in err
    for pid in worker_pids + broker_pids:
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"process {pid} still running after Ctrl-C"
