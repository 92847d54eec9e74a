"""Scale-out on one machine: the worker job with 1 and with N members (processes).

The job (``emerg-stream worker --members N``, a subprocess, one torch thread per member)
is started on fresh topics and waits until its members hold every partition; then the
events (the ml-100k replay, as in ``stream_throughput.py``) are produced and the clock
runs from the first record produced to the last one counted (the members' stats files,
rewritten at each checkpoint, polled every 50 ms). Group joins and process start-up are
outside the clock; producing is inside it for every case alike. Cases alternate
(1, N, N, 1, ...) on the same broker.

    python benchmarks/members.py                 # 1 vs 2 members, 3 reps
    python benchmarks/members.py --quick         # 5,000 events, 1 rep
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import stream_inputs as si
from benchmarks.common import (
    REPO_ROOT,
    base_parser,
    emit,
    fmt,
    header,
    markdown_table,
    setup,
)
from emerg_stream.config import TopicSettings
from emerg_stream.stream.members import member_path


def read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def counted(stats: dict[str, Any] | None) -> int:
    """Records a member has counted (every outcome of items and interactions)."""
    if stats is None:
        return 0
    return sum(sum(v.values()) for v in stats["process"].values())


def run_job(
    bootstrap: str,
    inputs: TopicSettings,
    events: si.Events,
    members: int,
    partitions: int,
    workdir: Path,
) -> tuple[float, list[int]]:
    """(seconds from the first record produced to the last counted, records per member)."""
    conf = {"bootstrap.servers": bootstrap}
    topics = si.fresh_topics(conf, partitions, f"m{members}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMERG_")}
    for role, name in topics.names().items():
        env[f"EMERG_TOPICS__{role.upper()}"] = name
    env.update({"EMERG_HEARTBEAT_INTERVAL_MS": "500", "PYTHONPATH": str(REPO_ROOT)})
    stats = workdir / f"stats-{uuid.uuid4().hex[:6]}.json"
    log = workdir / f"{stats.stem}.log"
    cmd = [sys.executable, "-m", "emerg_stream.cli", "--log-json", "worker"]
    cmd += ["--checkpoint", str(events.checkpoint), "--bootstrap", bootstrap]
    cmd += ["--group", f"bm-{uuid.uuid4().hex[:8]}", "--device", "cpu"]
    cmd += ["--stats-file", str(stats), "--members", str(members)]
    paths = [member_path(stats, i, members) for i in range(members)]
    job = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            held = [set(s["partitions"]) if (s := read_json(p)) else set() for p in paths]
            busy = min(members, partitions)
            if sum(len(h) for h in held) == partitions and sum(1 for h in held if h) == busy:
                break
            if job.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the job did not take its partitions; see {log}")
            time.sleep(0.05)
        t0 = time.perf_counter()
        si.produce_all(conf, topics, events)
        n = len(events.records)
        deadline = time.monotonic() + 900
        while sum(counted(read_json(p)) for p in paths) < n:
            if job.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the job did not count every record; see {log}")
            time.sleep(0.05)
        took = time.perf_counter() - t0
        per_member = [counted(read_json(p)) for p in paths]
    finally:
        job.send_signal(signal.SIGTERM)
        try:
            job.wait(90)
        except subprocess.TimeoutExpired:
            job.kill()
    return took, per_member


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.splitlines()[0])
    si.add_arguments(p)
    p.add_argument("--members", type=int, default=2, help="members of the scaled-out case")
    args = p.parse_args(argv)
    setup(args)
    reps = args.reps or (1 if args.quick else 3)
    limit = 5000 if args.quick and not args.limit else args.limit
    events = si.load_events(limit, args.checkpoint)
    n = len(events.records)
    cases = [1, args.members]
    samples: dict[int, list[float]] = {c: [] for c in cases}
    split: dict[int, list[int]] = {}
    load = os.getloadavg()[0]

    from emerg_stream.stream.broker import EmbeddedBroker

    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        conf = {"bootstrap.servers": broker.bootstrap}
        inputs = si.fresh_topics(conf, args.partitions, "in")
        for rep in range(reps):
            for members in cases if rep % 2 == 0 else cases[::-1]:
                took, split[members] = run_job(
                    broker.bootstrap, inputs, events, members, args.partitions, Path(tmp)
                )
                samples[members].append(took)
    rate = {c: n / statistics.median(v) for c, v in samples.items()}
    speedup = rate[args.members] / rate[1]
    rows = [
        [
            f"{c} member{'s' if c > 1 else ''}",
            fmt(rate[c], 4),
            fmt(statistics.median(samples[c])),
            ", ".join(fmt(x) for x in samples[c]),
            " / ".join(str(x) for x in split[c]),
        ]
        for c in cases
    ]
    md = markdown_table(
        ["job", "events/s (median)", "seconds (median)", "seconds (reps)", "records per member"],
        rows,
    )
    md += (
        f"\n{args.members} members vs 1: **{speedup:.2f}x**; {n} events from {events.source}, "
        f"{args.partitions} partitions, load average {load:.2f} at start\n"
    )
    result = {
        **header("members.py", argv, torch.device("cpu")),
        "events": n,
        "source": events.source,
        "partitions": args.partitions,
        "reps": reps,
        "seconds": {str(c): v for c, v in samples.items()},
        "events_per_s": {str(c): r for c, r in rate.items()},
        "records_per_member": {str(c): v for c, v in split.items()},
        "speedup": speedup,
    }
    emit(result, md, args.json)
    return result


if __name__ == "__main__":
    main()
