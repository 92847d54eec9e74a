"""``emerg-stream worker --members N``: several processes of one job share the partitions,
publish what one worker does, and stop together (on SIGTERM, or when one fails)."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from test_worker import (
    PARAMS,
    PARTITIONS,
    check_params,
    input_records,
    latest_marks,
    make_topics,
    mark_totals,
    produce,
    read_stats,
    read_values,
    wait_for,
    worker_proc,
)

from emerg_stream.errors import ConfigError
from emerg_stream.stream.members import member_path, member_port, resolve_members

pytestmark = pytest.mark.integration


@pytest.fixture
def topics(kafka_conf, unique_name):
    return make_topics(kafka_conf, unique_name)


def test_member_names_and_counts(tmp_path):
    assert resolve_members("3") == 3 and resolve_members(1) == 1
    assert resolve_members("auto") >= 1
    for bad in ("0", "-2", "two", ""):
        with pytest.raises(ConfigError, match="members"):
            resolve_members(bad)
    stats = tmp_path / "stats.json"
    assert member_path(stats, 0, 1) == stats
    assert member_path(stats, 1, 2) == tmp_path / "stats.1.json"
    assert member_path(None, 1, 2) is None
    assert (member_port(9100, 2), member_port(0, 2), member_port(None, 1)) == (9102, 0, None)


def test_two_members_split_the_partitions_and_publish_what_one_worker_does(
    world, checkpoint, offline, kafka_conf, bootstrap, topics, unique_name, tmp_path
):
    stats, log = tmp_path / "stats.json", tmp_path / "job.log"
    job = worker_proc(
        checkpoint, bootstrap, topics, unique_name("group"), stats, log, args=["--members", "2"]
    )
    members = [member_path(stats, i, 2) for i in range(2)]
    owned: list[set[int]] = []
    try:

        def split() -> bool:
            got = [read_stats(m) for m in members if m]
            owned[:] = [set(s["partitions"]) if s else set() for s in got]
            return all(len(o) == PARTITIONS // 2 for o in owned)

        wait_for(split, 120, "the partitions to be split between the members", job)
        produce(kafka_conf, input_records(world, topics))  # now both members have work

        def finished() -> bool:
            fold = latest_marks(kafka_conf, topics)
            return sum(mark_totals(fold)["interactions"].values()) == len(world.interactions)

        wait_for(finished, 180, "the two members to finish", job)
    finally:
        job.send_signal(signal.SIGTERM)
        code = job.wait(90)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert not stats.exists(), "with --members the stats go to one file per member"
    assert owned[0].isdisjoint(owned[1])
    per_member = [read_stats(m) for m in members if m]
    assert all(s is not None and sum(s["process"]["interactions"].values()) > 0 for s in per_member)
    check_params(read_values(kafka_conf, topics.item_params, PARAMS), offline, world)
    assert text.count('"event": "member_exited"') == 2 and '"members_stopping"' in text


def test_a_failing_member_stops_the_job_with_its_code(
    checkpoint, bootstrap, topics, unique_name, tmp_path
):
    log = tmp_path / "job.log"
    job = worker_proc(
        checkpoint.parent / "missing-checkpoint",
        bootstrap,
        topics,
        unique_name("group"),
        tmp_path / "stats.json",
        log,
        args=["--members", "2"],
    )
    t0 = time.monotonic()
    try:
        code = job.wait(120)
    except subprocess.TimeoutExpired:
        job.kill()
        raise
    text = log.read_text()
    assert code == 2, text[-3000:]
    assert "member 0" in text or "member 1" in text
    assert time.monotonic() - t0 < 120
