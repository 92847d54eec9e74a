"""What only Apache Kafka can show: transactions, real authentication, the log cleaner.

Marked ``kafka``: they run with ``EMERG_TEST_BROKER=kafka`` (``make test-kafka``) and are
skipped on the embedded broker, except the refusal of ``exactly_once`` on a broker without
transaction isolation, which starts its own Tansu. (1) exactly_once end to end and with a
crash at every checkpoint step: a read-committed reader sees each prediction once; (2) a
worker frozen (SIGSTOP) past its session timeout while another member takes over, then
resumed: nothing it wrote afterwards is visible; (3) a changelog that the log cleaner
really compacted restores the same states and marks; (4) SCRAM-SHA-512 over TLS works,
a read-only principal and a wrong CA are refused in one line without the secret. Figures
are printed (``-s``) for docs/RELIABILITY.md.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from test_reliability import expected_totals, one_error_line
from test_worker import (
    INTER,
    PARAMS,
    PARTITIONS,
    PRED,
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
from topic_names import topic_names

from emerg_stream.config import KafkaSettings, TopicSettings
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.stream.apache_kafka import ApacheKafka
from emerg_stream.stream.broker import EmbeddedBroker
from emerg_stream.stream.changelog import ChangelogFold, restore_partitions
from emerg_stream.stream.reader import read_to_end, reader_conf
from emerg_stream.stream.topics import ensure_topics, load_topic_specs
from emerg_stream.stream.worker import Worker

pytestmark = pytest.mark.integration
kafka_only = pytest.mark.kafka

EOS = {"EMERG_PROCESSING_GUARANTEE": "exactly_once"}


@pytest.fixture
def topics(kafka_conf: dict[str, str], unique_name: Callable[[str], str]) -> TopicSettings:
    return make_topics(kafka_conf, unique_name)


@pytest.fixture
def handler(checkpoint: Path) -> Iterator[TorchWarmupHandler]:
    yield TorchWarmupHandler.from_checkpoint(checkpoint, "cpu")


def assert_each_prediction_once(
    kafka_conf: dict[str, str], topics: TopicSettings, world: Any, dupes: list[Any]
) -> int:
    """Predictions as a read-committed reader sees them: one per input record scored.

    A repeated event id of a new item is a duplicate (not scored again); an old item's
    records are scored every time they arrive (no dedupe state), so its repeats count.
    """
    preds = read_values(kafka_conf, topics.predictions, PRED)
    seen = Counter(p["event_id"] for p in preds)
    expected = Counter(r["event_id"] for r in world.interactions)
    expected.update(r["event_id"] for r in dupes if r["item_id"] in world.old_ids)
    extra = seen - expected
    assert not extra, f"{len(extra)} predictions seen more than once: {list(extra)[:5]}"
    assert seen == expected
    return len(preds)


def assert_each_version_once(
    kafka_conf: dict[str, str], topics: TopicSettings, offline, world
) -> int:
    params = read_values(kafka_conf, topics.item_params, PARAMS)
    versions = Counter((r["item_id"], r["version"]) for r in params)
    assert max(versions.values()) == 1, [k for k, n in versions.items() if n > 1][:5]
    return check_params(params, offline, world)


# -- (1) exactly once ---------------------------------------------------------------


@kafka_only
def test_exactly_once_end_to_end_every_output_once(
    world, handler, offline, kafka_conf, bootstrap, topics, unique_name
):
    dupes = world.interactions[::6]
    produce(kafka_conf, input_records(world, topics, world.interactions + dupes))
    settings = settings_for(
        bootstrap,
        topics,
        unique_name("group"),
        batch_max_records=64,
        processing_guarantee="exactly_once",
        member_name="m1",
    )
    worker = Worker(settings, handler)
    thread = threading.Thread(target=worker.run)
    t0 = time.monotonic()
    thread.start()
    total_in = len(world.interactions) + len(dupes)
    try:
        wait_for(lambda: worker.counts.total("interactions") == total_in, 90, "the worker")
        took = time.monotonic() - t0
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive(), "worker did not stop"
    assert worker._txn is not None and worker._txn.transactions > 0
    n_preds = assert_each_prediction_once(kafka_conf, topics, world, dupes)
    n_versions = assert_each_version_once(kafka_conf, topics, offline, world)
    assert mark_totals(latest_marks(kafka_conf, topics)) == expected_totals(world, dupes)
    print(
        f"\n[eos-e2e] {total_in} interactions, {n_preds} predictions, {n_versions} params "
        f"versions, {worker._txn.transactions} transactions, {took:.1f}s"
    )


#: Each crash lands mid-stream (runs have ~50 batches of 8); ``after_changelog`` is right
#: before ``commit_transaction`` with exactly_once.
EOS_FAULTS = ["after_changelog:16", "mid_update:6", "after_commit:16", "during_restore:1"]


@kafka_only
def test_exactly_once_a_crash_at_every_checkpoint_step_shows_no_duplicate(
    world, checkpoint, offline, kafka_conf, bootstrap, topics, unique_name, tmp_path
):
    dupes = world.interactions[::9]
    produce(kafka_conf, input_records(world, topics, world.interactions + dupes))
    total_in = len(world.interactions) + len(dupes)
    group = unique_name("group")
    # one member name for every run: a restart fences its predecessor's open transaction
    env = {**EOS, "EMERG_MEMBER_NAME": "crashy"}
    t0 = time.monotonic()
    progress = []
    for i, fault in enumerate(EOS_FAULTS):
        stats, log = tmp_path / f"run{i}.json", tmp_path / f"run{i}.log"
        proc = worker_proc(
            checkpoint, bootstrap, topics, group, stats, log, {**env, "EMERG_FAULT_INJECT": fault}
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
    stats, log = tmp_path / "final.json", tmp_path / "final.log"
    proc = worker_proc(checkpoint, bootstrap, topics, group, stats, log, env)
    try:

        def all_marked() -> bool:
            fold = latest_marks(kafka_conf, topics)
            return sum(mark_totals(fold)["interactions"].values()) >= total_in

        wait_for(all_marked, 120, "the clean run", proc)
    finally:
        stop(proc, log)
    took = time.monotonic() - t0
    n_preds = assert_each_prediction_once(kafka_conf, topics, world, dupes)
    n_versions = assert_each_version_once(kafka_conf, topics, offline, world)
    totals = mark_totals(latest_marks(kafka_conf, topics))
    assert totals == expected_totals(world, dupes)
    print(
        f"\n[eos-faults] {total_in} interactions + {len(world.items)} items in; marked after "
        f"each crash: {progress}; final {totals}; predictions read committed: {n_preds} "
        f"(duplicates 0); {n_versions} params versions, each once, equal offline; {took:.1f}s"
    )


def test_exactly_once_is_refused_on_a_broker_without_transactions(checkpoint, tmp_path):
    with EmbeddedBroker() as broker:
        names = make_topics(
            {"bootstrap.servers": broker.bootstrap},
            lambda kind: f"t-eos-refused-{kind}",
        )
        log = tmp_path / "w.log"
        proc = worker_proc(
            checkpoint, broker.bootstrap, names, "g-eos", tmp_path / "s.json", log, EOS
        )
        code = proc.wait(90)
    line = one_error_line(log.read_text())
    assert code != 0
    assert "exactly_once" in line and "transaction isolation" in line and "at_least_once" in line


# -- (2) a zombie -------------------------------------------------------------------


@kafka_only
def test_a_frozen_worker_past_its_session_timeout_leaves_no_visible_output(
    world, checkpoint, offline, kafka_conf, bootstrap, topics, unique_name, tmp_path
):
    """A and B share the group (exactly_once); A is frozen (SIGSTOP) while the stream
    arrives, B takes A's partitions after the session timeout (6 s) and moves on, then A
    is resumed (SIGCONT): its late batch must not become visible."""
    dupes = world.interactions[::9]
    stream = world.interactions + dupes
    total_in = len(stream)
    group = unique_name("group")
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
                time.sleep(0.4)
        except BaseException as exc:
            errors.append(exc)

    files = {n: (tmp_path / f"{n}.json", tmp_path / f"{n}.log") for n in ("A", "B")}
    procs = {
        n: worker_proc(
            checkpoint, bootstrap, topics, group, *files[n], {**EOS, "EMERG_MEMBER_NAME": n}
        )
        for n in ("A", "B")
    }

    def partitions(name: str) -> list[int]:
        s = read_stats(files[name][0])
        return [] if s is None else list(s["partitions"])

    feeder = threading.Thread(target=feed)
    t0 = time.monotonic()
    try:
        wait_for(
            lambda: partitions("A") and partitions("B"), 90, "A and B to join", *procs.values()
        )
        feeder.start()
        wait_for(lambda: produced[0] > total_in // 4, 60, "a quarter of the stream")
        procs["A"].send_signal(signal.SIGSTOP)
        frozen_at = produced[0]
        a_partitions = partitions("A")
        wait_for(lambda: len(partitions("B")) == PARTITIONS, 60, "B to take over", procs["B"])
        took_over = time.monotonic()
        time.sleep(3)  # B moves on with A's partitions
        procs["A"].send_signal(signal.SIGCONT)
        resumed_at = produced[0]
        feeder.join(120)
        assert not errors and not feeder.is_alive(), errors
        # A either had a transaction open or in flight (refused: fenced, it exits) or was
        # between batches (it finds its session gone, rejoins and goes on as a member)
        wait_for(
            lambda: (
                sum(mark_totals(latest_marks(kafka_conf, topics))["interactions"].values())
                >= total_in
            ),
            120,
            "the group to finish",
            procs["B"],
        )
        a_code = procs["A"].poll()
        if a_code is None:
            stop(procs["A"], files["A"][1])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        if procs["B"].poll() is None:
            stop(procs["B"], files["B"][1])
        if procs["A"].poll() is None:
            procs["A"].kill()
            procs["A"].wait(30)
        feeder.join(60)
    took = time.monotonic() - t0
    a_log = files["A"][1].read_text()
    fenced = [
        ln for ln in a_log.splitlines() if "transaction" in ln and ("abort" in ln or "fenc" in ln)
    ]
    n_preds = assert_each_prediction_once(kafka_conf, topics, world, dupes)
    n_versions = assert_each_version_once(kafka_conf, topics, offline, world)
    totals = mark_totals(latest_marks(kafka_conf, topics))
    assert totals == expected_totals(world, dupes)
    assert (a_code not in (None, 0) and fenced) or "partitions_lost" in a_log, a_log[-3000:]
    if a_code is not None:  # fenced: one error line, no traceback (librdkafka's own % lines aside)
        assert "Traceback" not in a_log, a_log[-3000:]
        lines = [ln for ln in a_log.splitlines() if ln.strip() and ln[0] not in "{%"]
        assert len(lines) == 1 and lines[0].startswith("emerg-stream worker: error:"), lines
        assert "fenced" in lines[0]
    print(
        f"\n[zombie] {total_in} interactions; A frozen with partitions {a_partitions} at "
        f"{frozen_at} produced, B took over after {took_over - t0:.1f}s, A resumed at "
        f"{resumed_at}; A exit {a_code} (None: it rejoined and was stopped), its "
        f"fenced/aborted lines: {len(fenced)}, partitions lost: {'partitions_lost' in a_log} "
        f"({fenced[-1][:200] if fenced else '-'}); predictions read committed {n_preds} "
        f"(duplicates 0), {n_versions} params versions each once = offline; final {totals}; "
        f"{took:.1f}s"
    )


# -- (3) compaction ------------------------------------------------------------------


#: Changelog settings that let the cleaner compact within seconds.
FAST_COMPACTION = {
    "cleanup.policy": "compact",
    "segment.ms": "500",
    "min.cleanable.dirty.ratio": "0.01",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "1000",
}


def changelog_fold(kafka_conf: dict[str, str], topic: str) -> ChangelogFold:
    fold = ChangelogFold(list(range(PARTITIONS)), ItemStateCodec(dedupe_window=1000), topic)
    for m in read_to_end(kafka_conf, topic, timeout_s=60):
        fold.feed(m.partition(), m.key(), m.value())
    return fold


@kafka_only
def test_a_changelog_compacted_by_the_log_cleaner_restores_the_same_state(
    world, handler, kafka_conf, bootstrap, unique_name
):
    names = topic_names(unique_name, PARTITIONS)
    specs = [
        dataclasses.replace(s, config=FAST_COMPACTION) if s.role == "changelog" else s
        for s in load_topic_specs(None, names)
    ]
    ensure_topics(kafka_conf, specs)
    half = len(world.interactions) // 2
    group = unique_name("group")
    # two runs 2 s apart: the first run's segments roll and become cleanable
    runs = [
        (input_records(world, names, world.interactions[:half]), half),
        (input_records(world, names, world.interactions[half:])[len(world.items) :], None),
    ]
    for records, done in runs:
        produce(kafka_conf, records)
        target = len(world.interactions) if done is None else done
        worker = Worker(settings_for(bootstrap, names, group, batch_max_records=8), handler)
        thread = threading.Thread(target=worker.run)
        thread.start()
        try:
            wait_for(
                lambda t=target: (
                    sum(mark_totals(latest_marks(kafka_conf, names))["interactions"].values()) >= t
                ),
                90,
                "the worker",
            )
        finally:
            worker.stop()
            thread.join(60)
        time.sleep(2)
    before = changelog_fold(kafka_conf, names.changelog)
    records_before = sum(r.records for r in before.out.values())
    # one record per partition rolls the active segment (a tombstone of a key that is no
    # item, after the last mark: discarded by a restore); the cleaner compacts the rest
    roll = Producer({**kafka_conf, "enable.idempotence": True})
    for p in range(PARTITIONS):
        roll.produce(names.changelog, None, b"\x00emerg:test-roll", p)
    assert roll.flush(30) == 0
    deadline = time.monotonic() + 60
    while True:
        after = changelog_fold(kafka_conf, names.changelog)
        records_after = sum(r.records for r in after.out.values())
        if records_after < records_before * 0.7 or time.monotonic() > deadline:
            break
        time.sleep(1)
    waited = 60 - (deadline - time.monotonic())
    assert records_after < records_before * 0.7, (records_before, records_after)
    state_before, state_after = before.result(), after.result()
    for p in range(PARTITIONS):
        assert state_after[p].mark is not None and state_after[p].mark == state_before[p].mark
        assert state_after[p].discarded == 1  # the roll record only
        assert after._committed[p] == before._committed[p], p
    restorer = Consumer(reader_conf(kafka_conf))
    try:
        codec = ItemStateCodec(dedupe_window=1000)
        restored = restore_partitions(restorer, names.changelog, list(range(PARTITIONS)), codec)
    finally:
        restorer.close()
    assert {p: r.mark for p, r in restored.items()} == {p: b.mark for p, b in state_before.items()}
    n_items = sum(len(b.items) for b in state_before.values())
    assert n_items >= len(world.new_ids)
    assert {p: len(r.items) for p, r in restored.items()} == {
        p: len(b.items) for p, b in state_before.items()
    }
    print(
        f"\n[compaction] changelog records {records_before} -> {records_after} after the "
        f"cleaner ({waited:.0f}s); {n_items} item states and {PARTITIONS} marks "
        f"restored equal"
    )


# -- (4) authentication and authorization --------------------------------------------


@kafka_only
def test_scram_over_tls_runs_the_worker(
    world, handler, offline, apache_kafka, kafka_conf, unique_name
):
    topics = make_topics(kafka_conf, unique_name)
    produce(kafka_conf, input_records(world, topics))
    secure = KafkaSettings(**apache_kafka.settings_overrides("emerg-worker"))
    settings = settings_for("unused:1", topics, unique_name("group"), batch_max_records=64)
    settings = settings.model_copy(update={"kafka": secure})
    worker = Worker(settings, handler)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(
            lambda: worker.counts.total("interactions") == len(world.interactions), 90, "worker"
        )
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive()
    check_params(read_values(kafka_conf, topics.item_params, PARAMS), offline, world)


def _secure_env(kafka: ApacheKafka, user: str, ca: Path | None = None) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in kafka.env_file(user).read_text().splitlines():
        k, _, v = line.partition("=")
        env[k] = v
    if ca is not None:
        env["EMERG_KAFKA__SSL_CA_LOCATION"] = str(ca)
    env.update({"EMERG_STARTUP_RETRIES": "1", "EMERG_STARTUP_BACKOFF_MS": "200"})
    return env


def _refused(apache_kafka, checkpoint, topics, unique_name, tmp_path, env):
    """Run a worker on the SASL_SSL listener with ``env``; it must fail with one line.

    Returns (exit code, the whole log, the error line)."""
    log = tmp_path / "w.log"
    proc = worker_proc(
        checkpoint, apache_kafka.sasl_bootstrap, topics, unique_name("g"), tmp_path / "s", log, env
    )
    code = proc.wait(90)
    text = log.read_text()
    line = one_error_line(text)
    assert code != 0
    return code, text, line


@kafka_only
def test_a_principal_without_write_on_params_is_refused_in_one_line(
    apache_kafka, checkpoint, kafka_conf, unique_name, tmp_path
):
    topics = make_topics(kafka_conf, unique_name)
    env = _secure_env(apache_kafka, "emerg-ranker")
    code, text, line = _refused(apache_kafka, checkpoint, topics, unique_name, tmp_path, env)
    assert "emerg-ranker" in line and "WRITE" in line and topics.item_params in line
    assert env["EMERG_KAFKA__SASL_PASSWORD"] not in text
    print(f"\n[acl] exit {code}: {line}")


@kafka_only
def test_a_wrong_ca_is_refused_in_one_line(
    apache_kafka, checkpoint, kafka_conf, unique_name, tmp_path
):
    topics = make_topics(kafka_conf, unique_name)
    other_ca = tmp_path / "other-ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
         str(tmp_path / "k.pem"), "-out", str(other_ca), "-days", "1", "-subj", "/CN=other"],
        check=True, capture_output=True,
    )  # fmt: skip
    env = _secure_env(apache_kafka, "emerg-worker", ca=other_ca)
    code, text, line = _refused(apache_kafka, checkpoint, topics, unique_name, tmp_path, env)
    assert "TLS" in line and "SSL_CA_LOCATION" in line and apache_kafka.sasl_bootstrap in line
    assert env["EMERG_KAFKA__SASL_PASSWORD"] not in text
    print(f"\n[tls] exit {code}: {line}")
