"""Pieces of the reliability story that need no broker.

SASL_SSL settings render to librdkafka keys (the secret only where librdkafka needs
it); the fault-injection spec is parsed strictly; the access description never holds a
secret; and nothing in the package unpickles untrusted bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from emerg_stream.config import KafkaSettings
from emerg_stream.errors import ConfigError
from emerg_stream.stream.connect import describe_access
from emerg_stream.stream.faults import FaultInjector

PACKAGE = Path(__file__).resolve().parents[2] / "emerg_stream"
SECRET = "pa55-w0rd-xyz"


def sasl_ssl() -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers="b1:9093,b2:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="worker",
        sasl_password=SECRET,  # type: ignore[arg-type]
        ssl_ca_location=Path("/etc/kafka/ca.pem"),
    )


def test_sasl_ssl_settings_render_librdkafka_keys():
    k = sasl_ssl()
    assert k.as_librdkafka() == {
        "bootstrap.servers": "b1:9093,b2:9093",
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "worker",
        "sasl.password": SECRET,
        "ssl.ca.location": "/etc/kafka/ca.pem",
        "client.id": "emerg-stream",
    }
    assert k.as_librdkafka(redact=True)["sasl.password"] == "***"
    assert SECRET not in repr(k) and SECRET not in str(k.model_dump())


def test_the_access_description_names_the_mechanism_not_the_secret():
    text = describe_access(sasl_ssl())
    assert text == "b1:9093,b2:9093 (SASL_SSL, SASL SCRAM-SHA-512 as user 'worker')"
    assert SECRET not in text


def test_fault_spec_is_parsed_strictly():
    f = FaultInjector("after_commit:3, mid_update:1")
    assert f.armed == {"after_commit": 3, "mid_update": 1}
    f.hit("after_commit")
    f.hit("after_commit")  # armed for the 3rd: still alive
    assert f.reached["after_commit"] == 2
    assert FaultInjector(None).armed == {}
    for bad in ("nowhere:1", "after_commit", "after_commit:0", "after_commit:x"):
        with pytest.raises(ConfigError, match="EMERG_FAULT_INJECT"):
            FaultInjector(bad)


def test_nothing_in_the_package_unpickles():
    """Checkpoints are loaded with weights_only=True; no other untrusted deserializer."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for lineno, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\b(c?[Pp]ickle|dill|joblib|marshal|shelve)\b", code):
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
            if "allow_pickle=True" in code:
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{path.name}: {m.group(0)}")
    assert offenders == []
    assert "torch.load(" in (PACKAGE / "meta" / "checkpoint.py").read_text()
