"""The Apache Kafka test broker's pieces that need no Java: cache, pom, ACLs, ids, settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka.admin import AclOperation, ResourceType

from emerg_stream.config import WorkerSettings, load_settings
from emerg_stream.errors import ConfigError
from emerg_stream.stream.apache_kafka import PRINCIPALS, _kafka_uuid
from emerg_stream.stream.kafka_acl import acl_bindings
from emerg_stream.stream.kafka_dist import KAFKA_VERSION, _pom, kafka_cache_dir
from emerg_stream.stream.transactions import transactional_id


def test_the_cache_is_outside_the_repo_and_per_version(monkeypatch, tmp_path):
    monkeypatch.delenv("EMERG_KAFKA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kafka_cache_dir() == tmp_path / "emerg-stream" / f"kafka-{KAFKA_VERSION}"
    monkeypatch.setenv("EMERG_KAFKA_CACHE", str(tmp_path / "k"))
    assert kafka_cache_dir("4.0.0") == tmp_path / "k" / "kafka-4.0.0"
    assert Path(__file__).resolve().parents[2] not in kafka_cache_dir().parents


def test_the_pom_asks_for_the_scala_build_and_a_log_binding():
    pom = _pom("4.4.0")
    assert "<artifactId>kafka_2.13</artifactId><version>4.4.0</version>" in pom
    assert "log4j-slf4j-impl" in pom


def test_the_ranker_may_only_read_and_the_worker_may_write():
    ops: dict[str, set[tuple[ResourceType, AclOperation]]] = {}
    for b in acl_bindings():
        ops.setdefault(b.principal, set()).add((b.restype, b.operation))
    ranker = ops["User:emerg-ranker"]
    assert (ResourceType.TOPIC, AclOperation.READ) in ranker
    assert not {op for _, op in ranker} & {AclOperation.WRITE, AclOperation.ALL}
    assert (ResourceType.TOPIC, AclOperation.ALL) in ops["User:emerg-worker"]
    assert (ResourceType.TRANSACTIONAL_ID, AclOperation.ALL) in ops["User:emerg-worker"]
    assert "User:emerg-admin" not in ops  # a super user
    assert {p.role for p in PRINCIPALS} == {"worker", "ranker", "admin"}


def test_transactional_ids_derive_from_group_and_member():
    assert transactional_id("g", "pod-0") == "g.pod-0"
    assert transactional_id("g", None).startswith("g.")
    assert transactional_id("g", None) == transactional_id("g", None)  # stable per process


def test_processing_guarantee_is_a_checked_setting(monkeypatch):
    monkeypatch.setenv("EMERG_PROCESSING_GUARANTEE", "exactly_once")
    monkeypatch.setenv("EMERG_MEMBER_NAME", "worker-0")
    s = load_settings(WorkerSettings)
    assert (s.processing_guarantee, s.member_name) == ("exactly_once", "worker-0")
    monkeypatch.setenv("EMERG_PROCESSING_GUARANTEE", "exactly-once")
    with pytest.raises(ConfigError, match="EMERG_PROCESSING_GUARANTEE"):
        load_settings(WorkerSettings)
    monkeypatch.setenv("EMERG_PROCESSING_GUARANTEE", "at_least_once")
    monkeypatch.setenv("EMERG_MEMBER_NAME", "has space")
    with pytest.raises(ConfigError, match="EMERG_MEMBER_NAME"):
        load_settings(WorkerSettings)


def test_cluster_ids_never_look_like_an_option():
    ids = [_kafka_uuid() for _ in range(2000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == len(ids)


def test_a_failed_start_leaves_no_run_folder(monkeypatch, tmp_path):
    import shutil

    import emerg_stream.stream.apache_kafka as ak

    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    monkeypatch.setattr(ak, "fetch_kafka", lambda version: tmp_path)
    monkeypatch.setattr(ak, "find_java", lambda: tmp_path / "java")
    made: list[Path] = []

    def refuse(self: ak.ApacheKafka, java: Path, lib: Path, props: Path) -> None:
        made.append(self._dir())
        raise ConfigError("format refused")

    monkeypatch.setattr(ak.ApacheKafka, "_format", refuse)
    with pytest.raises(ConfigError, match="format refused"):
        ak.ApacheKafka().start()
    assert made and not made[0].exists()
