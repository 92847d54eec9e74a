"""docs/CONFIGURATION.md is generated from the settings classes and cannot drift."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import structlog
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from emerg_stream import cli
from emerg_stream.config import Settings, WorkerSettings, load_settings
from emerg_stream.config_doc import (
    effective_values,
    env_vars,
    other_variables,
    render_markdown,
    settings_classes,
)
from emerg_stream.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "CONFIGURATION.md"
REGENERATE = "emerg-stream config doc > docs/CONFIGURATION.md"


@pytest.fixture(autouse=True)
def no_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """cli.main would bind structlog to this test's captured stderr, closed afterwards.

    Its log lines (``threads_resolved``) still go to stderr, not into the generated doc on
    stdout; tests/conftest.py resets structlog after each test.
    """
    monkeypatch.setattr(
        "emerg_stream.logging.configure_logging",
        lambda **_: structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr)),
    )


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EMERG_"):
            monkeypatch.delenv(name)


def test_committed_reference_is_up_to_date():
    current = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    if current != render_markdown():
        pytest.fail(f"{DOC.relative_to(REPO)} is out of date: run `{REGENERATE}` and commit it")


def test_every_settings_variable_is_documented_and_resolves():
    """Each documented name, set in the environment, reaches the field it claims to."""
    names = [v.name for cls in settings_classes() for v in env_vars(cls)]
    assert len(names) == len(set(names))
    assert {"EMERG_KAFKA__SASL_PASSWORD", "EMERG_GROUP_ID", "EMERG_TOPICS__ITEMS"} <= set(names)
    for cls in settings_classes():
        for v in env_vars(cls):
            assert v.description, v.name
    # the worker class reads its own variables and the shared ones
    assert {v.name for v in env_vars(WorkerSettings)}.isdisjoint(
        {v.name for v in env_vars(Settings)}
    )


def test_secrets_are_marked_and_never_shown(monkeypatch: pytest.MonkeyPatch):
    secrets = {v.name for cls in settings_classes() for v in env_vars(cls) if v.secret}
    assert secrets == {"EMERG_KAFKA__SASL_PASSWORD", "EMERG_KAFKA__SSL_KEY_PASSWORD"}
    text = render_markdown()
    for name in secrets:
        assert f"`{name}` 🔒" in text
    monkeypatch.setenv("EMERG_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("EMERG_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("EMERG_KAFKA__SASL_USERNAME", "u")
    monkeypatch.setenv("EMERG_KAFKA__SASL_PASSWORD", "hunter2-pw")
    rows = {name: (value, env) for name, value, env in effective_values(load_settings(Settings))}
    assert rows["EMERG_KAFKA__SASL_PASSWORD"] == ("***", True)
    assert rows["EMERG_KAFKA__SASL_USERNAME"] == ("u", True)
    assert rows["EMERG_KAFKA__CLIENT_ID"] == ("emerg-stream", False)
    assert "hunter2-pw" not in repr(rows)


def test_every_emerg_variable_in_the_source_is_documented():
    """A new EMERG_* variable read anywhere in the package must appear in the reference."""
    text = render_markdown()
    documented = set(re.findall(r"`(EMERG_[A-Z0-9_]+)`", text))
    used: dict[str, str] = {}
    for root in ("emerg_stream", "jobs"):
        for path in (REPO / root).rglob("*.py"):
            for name in re.findall(r"\bEMERG_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
                used.setdefault(name, str(path.relative_to(REPO)))
    missing = {n: p for n, p in used.items() if n not in documented}
    assert missing == {}, f"undocumented variables (name: first file): {missing}"
    assert all(f"| `{n}` |" in text for n, _ in other_variables())


def test_a_field_without_description_is_refused():
    class Bad(BaseSettings):
        """No Args section."""

        model_config = SettingsConfigDict(env_prefix="EMERG_")
        knob: int = 1
        good: int = Field(default=2, description="Has  one.")

    with pytest.raises(ConfigError, match=r"Bad\.knob has no description"):
        env_vars(Bad)


def test_types_defaults_and_bounds_are_rendered():
    rows = {v.name: v for v in env_vars(WorkerSettings)}
    assert rows["EMERG_BATCH_MAX_RECORDS"].type == "int, ≥ 1"
    assert rows["EMERG_BATCH_MAX_RECORDS"].default == "`512`"
    assert rows["EMERG_DEVICE"].type == "`auto` \\| `cpu` \\| `cuda`"
    assert rows["EMERG_METRICS_PORT"].default == "unset"
    shared = {v.name: v for v in env_vars(Settings)}
    assert shared["EMERG_KAFKA__EXTRA"].type == "JSON object"
    assert shared["EMERG_KAFKA__SASL_PASSWORD"].type == "secret string (optional)"


def test_cli_doc_check_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "CONFIGURATION.md"
    assert cli.main(["config", "doc"]) == 0
    out.write_text(capsys.readouterr().out, encoding="utf-8")
    assert cli.main(["config", "doc", "--check", str(out)]) == 0
    out.write_text("stale\n")
    assert cli.main(["config", "doc", "--check", str(out)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert cli.main(["config", "show", "--worker"]) == 0
    shown = capsys.readouterr().out
    assert "EMERG_GROUP_ID" in shown
    assert "emerg-worker   (default)" in shown
