"""Settings: environment parsing, librdkafka rendering, secrets never shown, validation."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from emerg_stream.config import (
    KafkaSettings,
    Settings,
    TopicSettings,
    WorkerSettings,
    load_settings,
)
from emerg_stream.errors import ConfigError

PASSWORD = "s3cr3t-Pa55"
KEY_PASSWORD = "k3y-Pa55"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No EMERG_* variable of the developer's shell leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("EMERG_"):
            monkeypatch.delenv(name)


def sasl_ssl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "EMERG_KAFKA__BOOTSTRAP_SERVERS": "b1:9093,b2:9093",
        "EMERG_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "EMERG_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "EMERG_KAFKA__SASL_USERNAME": "emerg",
        "EMERG_KAFKA__SASL_PASSWORD": PASSWORD,
        "EMERG_KAFKA__SSL_CA_LOCATION": "/etc/ssl/ca.pem",
        "EMERG_KAFKA__SSL_CERTIFICATE_LOCATION": "/etc/ssl/client.pem",
        "EMERG_KAFKA__SSL_KEY_LOCATION": "/etc/ssl/client.key",
        "EMERG_KAFKA__SSL_KEY_PASSWORD": KEY_PASSWORD,
        "EMERG_KAFKA__CLIENT_ID": "emerg-worker-1",
        "EMERG_KAFKA__EXTRA": (
            '{"linger.ms": "5", "ssl.endpoint.identification.algorithm": "https"}'
        ),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_defaults_point_at_the_local_broker_and_documented_topics() -> None:
    s = load_settings(WorkerSettings)
    assert s.kafka.as_librdkafka() == {
        "bootstrap.servers": "127.0.0.1:9092",
        "security.protocol": "plaintext",
        "client.id": "emerg-stream",
    }
    assert s.topics.names() == {
        "items": "emerg.items",
        "interactions": "emerg.interactions",
        "item_params": "emerg.item-params",
        "predictions": "emerg.predictions",
        "dead_letter": "emerg.dead-letter",
        "changelog": "emerg.state-changelog",
    }
    assert s.session_timeout_ms == 6000
    assert s.device == "auto"


def test_sasl_ssl_renders_every_librdkafka_key(monkeypatch: pytest.MonkeyPatch) -> None:
    sasl_ssl_env(monkeypatch)
    conf = load_settings(Settings).kafka.as_librdkafka()
    assert conf == {
        "bootstrap.servers": "b1:9093,b2:9093",
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "emerg",
        "sasl.password": PASSWORD,
        "ssl.ca.location": "/etc/ssl/ca.pem",
        "ssl.certificate.location": "/etc/ssl/client.pem",
        "ssl.key.location": "/etc/ssl/client.key",
        "ssl.key.password": KEY_PASSWORD,
        "client.id": "emerg-worker-1",
        "linger.ms": "5",
        "ssl.endpoint.identification.algorithm": "https",
    }


def test_secrets_never_show_in_repr_str_dump_or_redacted_conf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sasl_ssl_env(monkeypatch)
    s = load_settings(WorkerSettings)
    shown = [
        repr(s),
        str(s),
        repr(s.kafka),
        str(s.kafka),
        s.model_dump_json(),
        str(s.model_dump()),
        str(s.kafka.as_librdkafka(redact=True)),
    ]
    for text in shown:
        assert PASSWORD not in text
        assert KEY_PASSWORD not in text
    assert s.kafka.as_librdkafka(redact=True)["sasl.password"] == "***"
    assert isinstance(s.kafka.sasl_password, SecretStr)


def test_settings_are_frozen() -> None:
    s = load_settings(WorkerSettings)
    with pytest.raises(ValidationError):
        s.group_id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.kafka.bootstrap_servers = "elsewhere:9092"  # type: ignore[misc]


def test_nested_env_and_explicit_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMERG_TOPICS__ITEMS", "prod.items")
    monkeypatch.setenv("EMERG_TOPICS__PARTITIONS", "8")
    monkeypatch.setenv("EMERG_KAFKA__CLIENT_ID", "from-env")
    monkeypatch.setenv("EMERG_GROUP_ID", "g1")
    monkeypatch.setenv("EMERG_BATCH_MAX_RECORDS", "64")
    s = load_settings(WorkerSettings, {"kafka": {"bootstrap_servers": "127.0.0.1:1234"}})
    assert s.topics.items == "prod.items"
    assert s.topics.partitions == 8
    assert s.kafka.bootstrap_servers == "127.0.0.1:1234"
    assert s.kafka.client_id == "from-env"  # the override merges, it does not replace
    assert (s.group_id, s.batch_max_records) == ("g1", 64)


def test_unrelated_emerg_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMERG_TEST_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setenv("EMERG_DATA_DIR", "/data")
    load_settings(WorkerSettings)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"EMERG_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"}, "needs sasl_mechanism"),
        (
            {
                "EMERG_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "EMERG_KAFKA__SASL_MECHANISM": "PLAIN",
            },
            "needs sasl_username and sasl_password",
        ),
        ({"EMERG_KAFKA__SASL_MECHANISM": "PLAIN"}, "use SASL_SSL"),
        ({"EMERG_KAFKA__SECURITY_PROTOCOL": "TLS"}, "EMERG_KAFKA__SECURITY_PROTOCOL"),
        ({"EMERG_KAFKA__EXTRA": '{"sasl.password": "x"}'}, "repeats keys"),
        ({"EMERG_TOPICS__ITEMS": "emerg.interactions"}, "two roles"),
        ({"EMERG_SESSION_TIMEOUT_MS": "2000"}, "a third of session_timeout_ms"),
        ({"EMERG_DEVICE": "tpu"}, "EMERG_DEVICE"),
        ({"EMERG_BATCH_MAX_RECORDS": "0"}, "EMERG_BATCH_MAX_RECORDS"),
        ({"EMERG_WARMUP_BACKEND": "fast"}, "EMERG_WARMUP_BACKEND"),
        ({"EMERG_WARMUP_COMPILE": "true"}, "replaced by EMERG_WARMUP_BACKEND"),
    ],
)
def test_invalid_settings_raise_one_config_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragment: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=fragment):
        load_settings(WorkerSettings)


def test_sections_build_standalone() -> None:
    k = KafkaSettings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="u",
        sasl_password=SecretStr("p"),
    )
    assert k.as_librdkafka()["sasl.mechanism"] == "SCRAM-SHA-256"
    assert TopicSettings(items="a", interactions="b").names()["items"] == "a"
