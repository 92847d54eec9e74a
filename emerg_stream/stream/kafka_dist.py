"""Apache Kafka's distribution for the test broker: jars from Maven, Java, a TLS CA.

:func:`fetch_kafka` fetches ``org.apache.kafka:kafka_2.13`` and its runtime dependencies
(plus log4j2's binding of slf4j, as in Kafka's own distribution) once, with ``mvn
dependency:copy-dependencies``, into :func:`kafka_cache_dir` (outside the repository).
:func:`find_java` finds a Java 17+. :func:`make_tls` makes a self-signed CA and a server
certificate for 127.0.0.1 with openssl. Used by :mod:`emerg_stream.stream.apache_kafka`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import structlog

from emerg_stream.errors import ConfigError
from emerg_stream.stream.broker import HOST

__all__ = ["KAFKA_VERSION", "fetch_kafka", "find_java", "kafka_cache_dir", "make_tls"]

log = structlog.get_logger(__name__)

#: The Apache Kafka release (Maven Central, Scala 2.13 build) the project tests against.
KAFKA_VERSION = "4.4.0"
#: log4j2's binding for slf4j 1.7 (Kafka's slf4j-api), as in Kafka's own distribution.
_LOG4J_VERSION = "2.25.5"
_MAVEN_TIMEOUT_S = 900.0
_JAVA_MIN = 17


def kafka_cache_dir(version: str = KAFKA_VERSION) -> Path:
    """Where the jars of ``version`` are cached (``$EMERG_KAFKA_CACHE`` wins)."""
    explicit = os.environ.get("EMERG_KAFKA_CACHE")
    if explicit:
        return Path(explicit).expanduser() / f"kafka-{version}"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emerg-stream" / f"kafka-{version}"


def _pom(version: str) -> str:
    deps = (
        ("org.apache.kafka", "kafka_2.13", version),
        ("org.apache.logging.log4j", "log4j-slf4j-impl", _LOG4J_VERSION),
    )
    rendered = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>"
        for g, a, v in deps
    )
    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.emerg-stream</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{rendered}
  </dependencies>
</project>
"""


def fetch_kafka(version: str = KAFKA_VERSION, *, cache: Path | None = None) -> Path:
    """Return the folder of the Kafka jars, fetching them with Maven the first time.

    Args:
        version: Apache Kafka version (a ``kafka_2.13`` release on Maven Central).
        cache: Folder of this version (default :func:`kafka_cache_dir`).

    Returns:
        ``<cache>/lib``, holding ``kafka_2.13-<version>.jar`` and its runtime jars.

    Raises:
        ConfigError: No ``mvn`` on the PATH, or Maven could not resolve the artifacts.
    """
    root = cache or kafka_cache_dir(version)
    lib = root / "lib"
    if (root / ".complete").is_file() and (lib / f"kafka_2.13-{version}.jar").is_file():
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ConfigError(
            "the Apache Kafka test broker needs Maven (`mvn`) to fetch its jars once; "
            "install it, or use the embedded broker"
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / "pom.xml").write_text(_pom(version))
    staging = root / "lib.partial"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    argv = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(root / "pom.xml"),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            argv, capture_output=True, text=True, timeout=_MAVEN_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"Maven did not fetch Kafka {version} in {_MAVEN_TIMEOUT_S}s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ConfigError(f"Maven could not fetch Apache Kafka {version}:\n{tail}")
    shutil.rmtree(lib, ignore_errors=True)
    staging.rename(lib)
    (root / ".complete").write_text(version + "\n")
    log.info(
        "kafka_fetched",
        version=version,
        jars=len(list(lib.glob("*.jar"))),
        seconds=round(time.monotonic() - started, 1),
        cache=str(root),
    )
    return lib


def find_java() -> Path:
    """The ``java`` to run Kafka with: ``$JAVA_HOME/bin/java``, else ``java`` on the PATH.

    Raises:
        ConfigError: None found, or older than Java 17.
    """
    home = os.environ.get("JAVA_HOME")
    candidate = Path(home) / "bin" / "java" if home else None
    if candidate is None or not candidate.is_file():
        found = shutil.which("java")
        if found is None:
            raise ConfigError(
                f"the Apache Kafka test broker needs Java {_JAVA_MIN}+ (`java` or $JAVA_HOME)"
            )
        candidate = Path(found)
    done = subprocess.run(  # noqa: S603 - fixed argv, no shell
        [str(candidate), "-version"], capture_output=True, text=True, timeout=30, check=False
    )
    match = re.search(r'version "(\d+)', done.stderr + done.stdout)
    if match is None or int(match.group(1)) < _JAVA_MIN:
        raise ConfigError(f"{candidate} is not Java {_JAVA_MIN}+: {done.stderr.strip()[:200]}")
    return candidate


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise ConfigError("the Apache Kafka test broker needs `openssl` to make its TLS CA")
    done = subprocess.run(  # noqa: S603 - fixed argv, no shell
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise ConfigError(f"openssl {args[0]} failed: {done.stderr.strip()[-400:]}")


def make_tls(folder: Path) -> None:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost signed by it.

    Writes ``ca.pem`` (for clients) and ``server-keystore.pem`` (unencrypted PKCS#8 key
    and certificate, Kafka's ``PEM`` keystore type); the CA key is deleted afterwards.
    """
    folder.mkdir(parents=True, exist_ok=True)
    days = "7"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
        "ca.pem", "-days", days, "-subj", "/CN=emerg-stream test CA", cwd=folder,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
        "server.csr", "-subj", f"/CN={HOST}", cwd=folder,
    )  # fmt: skip
    (folder / "san.cnf").write_text(f"subjectAltName=IP:{HOST},DNS:localhost\n")
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", days, "-extfile", "san.cnf",
        cwd=folder,
    )  # fmt: skip
    key = (folder / "server.key").read_text()
    cert = (folder / "server.pem").read_text()
    fd = os.open(folder / "server-keystore.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + cert)
    for name in ("ca.key", "server.key", "server.csr", "ca.srl"):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
