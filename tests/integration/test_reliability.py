"""Reliability of the worker against a real broker: crashes, outages, stops, access.

(1) a crash (``EMERG_FAULT_INJECT``, ``os._exit(137)``) at every step of the checkpoint,
one after the other, then a clean run: the params equal the offline protocol and every
record is counted exactly once; (2) the broker frozen (SIGSTOP) for 20 s mid-run, and
absent at start; (3) SIGTERM under load: a final checkpoint, a restart that re-applies
nothing; (3b) a rebalance storm: three worker processes joining and leaving one group
mid-stream; (5) a broker that demands SASL, a tampered and a pickled checkpoint: refused in
one line, no secret printed. Figures of each run are printed (``-s``) for
docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import worker_world as ww
from test_worker import (
    DEAD,
    INTER,
    ITEM,
    PARAMS,
    ROOT,
    check_params,
    input_records,
    latest_marks,
    make_topics,
    mark_totals,
    produce,
    read_stats,
    read_values,
    settings_for,
    stop,
    wait_for,
    worker_proc,
)

from emerg_stream.config import TopicSettings
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.stream.broker import EmbeddedBroker, free_port
from emerg_stream.stream.worker import Worker

pytestmark = pytest.mark.integration


@pytest.fixture
def topics(kafka_conf: dict[str, str], unique_name: Callable[[str], str]) -> TopicSettings:
    return make_topics(kafka_conf, unique_name)


def expected_totals(world: ww.World, dupes: list[Any]) -> dict[str, dict[str, int]]:
    n_old = sum(1 for r in world.interactions if r["item_id"] in world.old_ids)
    dup_old = sum(1 for r in dupes if r["item_id"] in world.old_ids)
    return {
        "items": {
            "applied": len(world.new_ids),
            "duplicate": 0,
            "dead_lettered": 0,
            "ignored_old_item": len(world.old_ids),
            "conflicting_item": 0,
            "conflicting_event": 0,
        },
        "interactions": {
            "applied": len(world.interactions) - n_old,
            "duplicate": len(dupes) - dup_old,
            "dead_lettered": 0,
            "ignored_old_item": n_old + dup_old,
            "conflicting_item": 0,
            "conflicting_event": 0,
        },
    }


def all_marked(kafka_conf: dict[str, str], topics: TopicSettings, total: int) -> Callable[[], bool]:
    def cond() -> bool:
        return sum(mark_totals(latest_marks(kafka_conf, topics))["interactions"].values()) >= total

    return cond


def one_error_line(text: str) -> str:
    """The job's error line; fails unless there is exactly one and no traceback."""
    assert "Traceback" not in text, text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("{")]
    assert len(lines) == 1, text[-3000:]  # every other line is a JSON log event
    assert lines[0].startswith("emerg-stream worker: error:"), lines[0]
    return lines[0]


# -- (1) a crash at every step of the checkpoint ------------------------------------

#: Late enough that each crash lands with interactions checkpointed (runs have ~50 batches).
FAULTS = ["after_changelog:16", "mid_update:6", "after_commit:16", "during_restore:1"]


@pytest.mark.slow
def test_a_crash_at_every_checkpoint_step_then_restart_changes_nothing(
    world, checkpoint, offline, kafka_conf, bootstrap, topics, unique_name, tmp_path
):
    dupes = world.interactions[::9]
    produce(kafka_conf, input_records(world, topics, world.interactions + dupes))
    total_in = len(world.interactions) + len(dupes)
    group = unique_name("group")
    t0 = time.monotonic()
    progress = []
    for i, fault in enumerate(FAULTS):
        stats, log = tmp_path / f"run{i}.json", tmp_path / f"run{i}.log"
        proc = worker_proc(
            checkpoint, bootstrap, topics, group, stats, log, {"EMERG_FAULT_INJECT": fault}
        )
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        text = log.read_text()
        assert code == 137, text[-3000:]
        assert f"fault injected: {fault}" in text
        marked = sum(mark_totals(latest_marks(kafka_conf, topics))["interactions"].values())
        assert marked < total_in, f"{fault}: the stream ended before the crash"
        progress.append((fault, marked))
    marks = [m for _, m in progress]
    assert marks[0] > 0 and marks == sorted(marks), progress  # each run resumed, none lost
    stats, log = tmp_path / "final.json", tmp_path / "final.log"
    proc = worker_proc(checkpoint, bootstrap, topics, group, stats, log)
    try:
        wait_for(all_marked(kafka_conf, topics, total_in), 120, "the clean run", proc)
    finally:
        stop(proc, log)
    took = time.monotonic() - t0

    n = check_params(read_values(kafka_conf, topics.item_params, PARAMS), offline, world)
    totals = mark_totals(latest_marks(kafka_conf, topics))
    assert totals == expected_totals(world, dupes)
    print(
        f"\n[faults] {total_in} interactions + {len(world.items)} items in; marked after "
        f"each crash: {progress}; final {totals}; {n} params versions equal offline; "
        f"{took:.1f}s"
    )


# -- (2) broker outage and absence --------------------------------------------------


@pytest.mark.slow
def test_a_frozen_broker_for_20s_loses_nothing_and_the_worker_catches_up(
    world, checkpoint, offline, unique_name
):
    with EmbeddedBroker() as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        topics = make_topics(conf, unique_name)
        dupes = world.interactions[::9]
        produce(conf, input_records(world, topics, world.interactions + dupes))
        total_in = len(world.interactions) + len(dupes)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        handler = TorchWarmupHandler.from_checkpoint(checkpoint, "cpu")
        settings = settings_for(broker.bootstrap, topics, unique_name("group"), batch_max_records=4)
        worker = Worker(settings, handler)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                worker.run()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        t0 = time.monotonic()
        thread.start()
        try:
            wait_for(lambda: worker.counts.total("interactions") >= total_in // 4, 90, "progress")
            broker.pause()
            at_pause = worker.counts.total("interactions")
            time.sleep(20)
            broker.resume()
            assert thread.is_alive(), f"the worker died during the outage: {errors}"
            wait_for(
                lambda: bool(errors) or worker.counts.total("interactions") >= total_in,
                120,
                "catch-up",
            )
            assert not errors, errors
        finally:
            if broker._paused:
                broker.resume()
            worker.stop()
            thread.join(60)
            torch.set_num_threads(threads)
        took = time.monotonic() - t0
        assert not thread.is_alive() and not errors, errors
        assert at_pause < total_in, "the outage did not land mid-stream"
        check_params(read_values(conf, topics.item_params, PARAMS), offline, world)
        totals = mark_totals(latest_marks(conf, topics))
        assert totals == expected_totals(world, dupes)
        assert worker.rebalances >= 2, "the outage did not cost the assignment"
    print(
        f"\n[outage] paused the broker 20 s after {at_pause}/{total_in} interactions; "
        f"final {totals}; {worker.rebalances} assignments; {took:.1f}s"
    )


def test_no_broker_at_start_retries_then_exits_with_one_line(checkpoint, topics, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = {"EMERG_STARTUP_RETRIES": "1", "EMERG_STARTUP_BACKOFF_MS": "200"}
    log = tmp_path / "absent.log"
    t0 = time.monotonic()
    proc = worker_proc(checkpoint, address, topics, "g-absent", tmp_path / "s.json", log, env)
    code = proc.wait(60)
    took = time.monotonic() - t0
    text = log.read_text()
    line = one_error_line(text)
    assert code != 0
    assert address in line and "after 2 attempts" in line
    assert text.count('"brokers_unreachable"') == 1  # one retry, logged once
    print(f"\n[absent] exit {code} after {took:.1f}s: {line}")


# -- (3) SIGTERM under load ---------------------------------------------------------


def test_sigterm_under_load_checkpoints_and_the_restart_reapplies_nothing(
    world, checkpoint, offline, kafka_conf, bootstrap, topics, unique_name, tmp_path
):
    produce(kafka_conf, input_records(world, topics))
    total_in = len(world.interactions)
    group = unique_name("group")
    stats1, stats2 = tmp_path / "run1.json", tmp_path / "run2.json"
    log1, log2 = tmp_path / "run1.log", tmp_path / "run2.log"
    run1 = worker_proc(checkpoint, bootstrap, topics, group, stats1, log1)

    def progressed() -> bool:
        s = read_stats(stats1)
        return s is not None and sum(s["process"]["interactions"].values()) >= total_in // 4

    wait_for(progressed, 120, "run 1 to get a quarter through", run1)
    stop(run1, log1)  # SIGTERM, exit 0
    s1 = read_stats(stats1)
    assert s1 is not None
    done1 = sum(s1["process"]["interactions"].values())
    assert 0 < done1 < total_in, "the stop did not land mid-stream"
    # the final checkpoint holds everything run 1 counted
    assert mark_totals(latest_marks(kafka_conf, topics)) == s1["process"]

    run2 = worker_proc(checkpoint, bootstrap, topics, group, stats2, log2)
    try:
        wait_for(all_marked(kafka_conf, topics, total_in), 120, "run 2 to finish", run2)
    finally:
        stop(run2, log2)
    s2 = read_stats(stats2)
    assert s2 is not None
    c2 = s2["process"]["interactions"]
    assert c2["duplicate"] == 0  # nothing run 1 applied came back
    assert sum(c2.values()) == total_in - done1
    check_params(read_values(kafka_conf, topics.item_params, PARAMS), offline, world)
    totals = mark_totals(latest_marks(kafka_conf, topics))
    assert totals == expected_totals(world, [])
    print(
        f"\n[sigterm] run 1 stopped after {done1}/{total_in} (checkpointed); run 2 counted "
        f"{sum(c2.values())} ({c2}); final {totals}"
    )


# -- (3b) a rebalance storm ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_rebalance_storm_of_three_workers_loses_nothing_and_applies_nothing_twice(
    world, checkpoint, offline, kafka_conf, bootstrap, topics, unique_name, tmp_path
):
    """A, B, C in one group over 4 partitions join and leave while the stream arrives
    (8 interactions every 0.6 s, ~27 s): A; +B; A stops (SIGTERM); +C; B stops; A again;
    then C and A drain and exit by themselves when idle."""
    dupes = world.interactions[::9]
    stream = world.interactions + dupes  # the dupes last: each one a replay of an applied id
    total_in = len(stream)
    group = unique_name("group")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    files: dict[str, tuple[Path, Path]] = {}
    events: list[tuple[str, int]] = []  # (who joined or left, interactions produced by then)
    marked_at: list[tuple[str, int]] = []  # (who left, interactions marked after its stop)
    produced = [0]
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            produce(kafka_conf, input_records(world, topics, []))
            for i in range(0, total_in, 8):
                rows = stream[i : i + 8]
                produce(
                    kafka_conf, [(topics.interactions, r["item_id"], INTER.encode(r)) for r in rows]
                )
                produced[0] = i + len(rows)
                time.sleep(0.6)
        except BaseException as exc:
            errors.append(exc)

    def start(name: str, idle_exit: bool = False) -> None:
        files[name] = (tmp_path / f"{name}.json", tmp_path / f"{name}.log")
        args = ["--exit-when-idle", "10"] if idle_exit else []
        procs[name] = worker_proc(checkpoint, bootstrap, topics, group, *files[name], args=args)
        wait_for(assigned(name), 90, f"{name} to join", *procs.values())
        events.append((f"+{name}", produced[0]))

    def assigned(name: str) -> Callable[[], bool]:
        def cond() -> bool:
            s = read_stats(files[name][0])
            return s is not None and len(s["partitions"]) > 0

        return cond

    def leave(name: str) -> None:
        stop(procs.pop(name), files[name][1])  # SIGTERM: exit 0 after a final checkpoint
        m = sum(mark_totals(latest_marks(kafka_conf, topics))["interactions"].values())
        marked_at.append((name, m))
        events.append((f"-{name}", produced[0]))

    producer = threading.Thread(target=feed)
    t0 = time.monotonic()
    try:
        producer.start()
        start("A")
        start("B")
        leave("A")
        start("C", idle_exit=True)
        leave("B")
        start("A2", idle_exit=True)
        producer.join(120)
        assert not errors and not producer.is_alive(), errors
        for name in ("C", "A2"):  # the survivors drain, then exit by themselves
            code = procs[name].wait(120)
            assert code == 0, files[name][1].read_text()[-3000:]
            procs.pop(name)
    finally:
        for p in procs.values():
            p.kill()
            p.wait(30)
        producer.join(60)
    took = time.monotonic() - t0

    assert all(n < total_in for _, n in events), events  # every join and stop mid-stream
    n = check_params(read_values(kafka_conf, topics.item_params, PARAMS), offline, world)
    totals = mark_totals(latest_marks(kafka_conf, topics))
    assert totals == expected_totals(world, dupes)
    stats = {name: read_stats(files[name][0]) for name in files}
    counted = {}
    for name, s in stats.items():
        assert s is not None, name
        counted[name] = sum(s["process"]["interactions"].values())
        assert s["rebalances"] >= 1, name
    assert all(counted.values()), f"a worker processed nothing: {counted}"
    joins = {k: s["rebalances"] for k, s in stats.items() if s}
    restored = {k: s["restored_items"] for k, s in stats.items() if s}
    assert sum(restored.values()) > 0, "no partition moved with its state"
    print(
        f"\n[storm] {total_in} interactions + {len(world.items)} items; (join/leave, produced "
        f"by then): {events}; marked after each stop: {marked_at}; counted per process "
        f"{counted}; assignments {joins}; restored items {restored}; final {totals}; "
        f"{n} params versions equal offline; {took:.1f}s"
    )


# -- (4) dead letters replayed after the fix ---------------------------------------


@pytest.fixture(scope="module")
def handler(checkpoint: Path) -> Iterator[TorchWarmupHandler]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchWarmupHandler.from_checkpoint(checkpoint, "cpu")
    torch.set_num_threads(threads)


def test_a_dead_letter_replayed_after_the_fix_is_applied(
    world, handler, kafka_conf, bootstrap, topics, unique_name
):
    item = dict(world.items[0], item_id="late-item")
    click = dict(world.interactions[0], item_id="late-item", event_id="late-1")
    clock = dict(world.items[1], item_id="clock", event_time=click["event_time"] + 10_000)
    # partition 0: a click of an item not announced, then item time passes the 5 s cap
    produce(kafka_conf, [(topics.interactions, "late-item", INTER.encode(click))], 0)
    produce(kafka_conf, [(topics.items, "clock", ITEM.encode(clock))], 0)
    settings = settings_for(bootstrap, topics, unique_name("group"), pending_max_age_ms=5_000)
    worker = Worker(settings, handler)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: worker.counts.interactions["dead_lettered"] == 1, 60, "the dead letter")
        produce(kafka_conf, [(topics.items, "late-item", ITEM.encode(item))], 0)  # the fix
        wait_for(lambda: worker.counts.items["applied"] == 2, 60, "the announcement")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMERG_")}
        env.update({f"EMERG_TOPICS__{r.upper()}": n for r, n in topics.names().items()})
        cmd = [sys.executable, "-m", "emerg_stream.cli", "dlq", "replay"]
        cmd += ["--kind", "unknown_item", "--limit", "5", "--bootstrap", bootstrap]
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "replayed 1 " in out.stdout, out.stdout
        wait_for(lambda: worker.counts.interactions["applied"] == 1, 60, "the replayed click")
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive()
    dead = read_values(kafka_conf, topics.dead_letter, DEAD)
    assert [(d["error_kind"], d["value"], d["source_partition"]) for d in dead] == [
        ("unknown_item", INTER.encode(click), 0)
    ]
    assert worker.counts.interactions == {
        "applied": 1,
        "duplicate": 0,
        "dead_lettered": 1,
        "ignored_old_item": 0,
        "conflicting_item": 0,
        "conflicting_event": 0,
    }
    print(f"\n[dlq] {out.stdout.strip()}; worker counts {worker.counts.interactions}")


# -- (5) access ---------------------------------------------------------------------


def test_a_broker_demanding_sasl_refuses_the_worker_in_one_line_without_the_secret(
    checkpoint, tmp_path
):
    secret = "s3cr3t-Never-Print-Me"
    names = TopicSettings(items="i", interactions="x", partitions=1)
    env = {
        "EMERG_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "EMERG_KAFKA__SASL_MECHANISM": "SCRAM-SHA-256",
        "EMERG_KAFKA__SASL_USERNAME": "worker",
        "EMERG_KAFKA__SASL_PASSWORD": secret,
        "EMERG_STARTUP_RETRIES": "1",
        "EMERG_STARTUP_BACKOFF_MS": "200",
    }
    log = tmp_path / "auth.log"
    with EmbeddedBroker(authentication=True) as broker:
        address = broker.bootstrap
        proc = worker_proc(checkpoint, address, names, "g-auth", tmp_path / "s.json", log, env)
        code = proc.wait(60)
    text = log.read_text()
    line = one_error_line(text)
    assert code != 0
    assert "SCRAM-SHA-256" in line and address in line and "refused access" in line
    assert secret not in text
    print(f"\n[auth] exit {code}: {line}")


def test_a_tampered_or_pickled_checkpoint_is_refused_at_start(checkpoint, topics, tmp_path):
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(checkpoint, tampered)
    with (tampered / "model.pt").open("ab") as f:
        f.write(b"\0")
    pickled = tmp_path / "pickled"
    shutil.copytree(checkpoint, pickled)
    payload = torch.load(checkpoint / "model.pt", weights_only=True)
    payload["meta"]["evil"] = Exec()
    torch.save(payload, pickled / "model.pt")
    import hashlib
    import json

    digest = hashlib.sha256((pickled / "model.pt").read_bytes()).hexdigest()
    manifest = json.loads((pickled / "manifest.json").read_text())
    manifest["files"]["model.pt"] = digest  # a consistent manifest: only the pickle is wrong
    (pickled / "manifest.json").write_text(json.dumps(manifest))
    for ck, want in ((tampered, "does not match its manifest"), (pickled, "not a plain weights")):
        log = tmp_path / f"{ck.name}.log"
        proc = worker_proc(ck, "127.0.0.1:1", topics, "g-ck", tmp_path / "s.json", log)
        code = proc.wait(60)
        text = log.read_text()
        line = one_error_line(text)
        assert code != 0 and want in line, line
        assert not PWNED.exists()
        print(f"\n[checkpoint] {ck.name}: exit {code}: {line}")


PWNED = Path(tempfile.gettempdir()) / f"emerg-pwned-{os.getpid()}"


class Exec:
    """An object whose unpickling would run code (it must never be unpickled)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {PWNED}",))
