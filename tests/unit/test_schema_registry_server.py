"""The test schema registry's launcher without Java: cache folder, cached build, refusals.

The registry itself runs in tests/integration/test_schema_registry.py
(``make test-registry``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from emerg_stream.errors import ConfigError
from emerg_stream.stream.schema_registry_server import (
    APICURIO_VERSION,
    SchemaRegistryServer,
    build_registry,
    registry_cache_dir,
)


def test_cache_dir_is_outside_the_repo_and_can_be_moved(monkeypatch, tmp_path):
    monkeypatch.delenv("EMERG_REGISTRY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry_cache_dir() == tmp_path / "xdg" / "emerg-stream" / (
        f"apicurio-registry-{APICURIO_VERSION}"
    )
    monkeypatch.setenv("EMERG_REGISTRY_CACHE", str(tmp_path / "mine"))
    assert registry_cache_dir("9.9") == tmp_path / "mine" / "apicurio-registry-9.9"


def test_a_finished_build_is_reused_without_maven(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no mvn, no java
    jar = tmp_path / "app" / f"apicurio-registry-runner-{APICURIO_VERSION}-runner.jar"
    jar.parent.mkdir()
    jar.write_bytes(b"PK")
    (tmp_path / ".complete").write_text(APICURIO_VERSION)
    assert build_registry(cache=tmp_path) == jar


def test_without_maven_the_build_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"needs Maven \(`mvn`\).*EMERG_SCHEMA_REGISTRY_URL"):
        build_registry(cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / ".complete").exists()


def test_bad_arguments_and_a_stopped_server_are_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="compatibility 'SOMETIMES'"):
        SchemaRegistryServer(compatibility="SOMETIMES")
    with pytest.raises(ConfigError, match="port 70000 out of range"):
        SchemaRegistryServer(port=70000)
    server = SchemaRegistryServer(data_dir=tmp_path)
    with pytest.raises(ConfigError, match="the schema registry is not running"):
        _ = server.url
    server.stop()  # idempotent on a server never started
    assert not server.running


def test_build_only_prints_the_runner_jar(monkeypatch, tmp_path, capsys):
    from emerg_stream.stream.schema_registry_server import main

    monkeypatch.setenv("EMERG_REGISTRY_CACHE", str(tmp_path))
    root = tmp_path / f"apicurio-registry-{APICURIO_VERSION}"
    jar = root / "app" / f"apicurio-registry-runner-{APICURIO_VERSION}-runner.jar"
    jar.parent.mkdir(parents=True)
    jar.write_bytes(b"PK")
    (root / ".complete").write_text(APICURIO_VERSION)
    assert main(["--build-only"]) == 0
    assert capsys.readouterr().out.strip() == str(jar)
