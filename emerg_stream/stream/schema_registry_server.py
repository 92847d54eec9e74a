"""A real schema registry for tests and development: Apicurio Registry on 127.0.0.1.

Which one, and why this version: Apicurio Registry's application
(``io.apicurio:apicurio-registry-app``) with its Confluent-compatible API at
``/apis/ccompat/v7``, the path ``$EMERG_SCHEMA_REGISTRY_URL`` points at. Version
**2.4.2.Final** (Quarkus 2.16.4.Final, Java 17) is the newest whose modules all resolve
from Maven Central as this project reaches it. The 3.x line does not: the 3.3.3 (and
3.3.2) application jar is served, but its sibling modules are not
(``apicurio-registry-schema-util-provider``, ``-schema-util-avro``, ``-schema-util-common``,
``-contracts-rules``, ``-config-index``, ...), nor its Quarkus 3.33.3.1 parents; 3.0.9's
parent POM is not served either. Two substitutions make 2.4.2.Final build: the JSON Schema
validator ``com.github.everit-org.json-schema`` (published outside Central) is left out, so
JSON Schema artifacts cannot be validated (Avro is all we use), and the build-time
``config-index`` extension is taken at 0.1.10.Final, whose deployment module is served (its
runtime recorder has the same signature as 0.1.18.Final's).

The application jar on Central is not runnable (no Quarkus runner), so :func:`build_registry`
writes a POM into a cache folder outside the repository (``$EMERG_REGISTRY_CACHE`` or
``~/.cache/emerg-stream/apicurio-registry-<version>``, honours ``$XDG_CACHE_HOME``) that
unpacks the application's classes as its own and runs ``quarkus-maven-plugin:build``, once;
the result is a runner jar plus its ``lib/`` (about 290 jars). Storage is H2: in memory,
or a file database under ``data_dir`` so a restart keeps every schema and id.

:class:`SchemaRegistryServer` starts it as a child process (``java -jar``) on 127.0.0.1,
waits until the Confluent-compatible API answers, and sets the global compatibility level
(``BACKWARD`` by default, as Confluent's registry; Apicurio's own default is ``NONE``).

Example:
    >>> with SchemaRegistryServer() as registry:                 # doctest: +SKIP
    ...     os.environ["EMERG_SCHEMA_REGISTRY_URL"] = registry.url

Or from a shell: ``python -m emerg_stream.stream.schema_registry_server`` (prints the URL,
runs until Ctrl-C; ``--build-only`` only builds it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

import structlog

from emerg_stream.errors import ConfigError, TransientError
from emerg_stream.stream.broker import HOST, _pdeathsig_hook, free_port
from emerg_stream.stream.child import ChildServer
from emerg_stream.stream.kafka_dist import find_java

__all__ = [
    "APICURIO_VERSION",
    "CCOMPAT_PATH",
    "SchemaRegistryServer",
    "build_registry",
    "registry_cache_dir",
]

log = structlog.get_logger(__name__)

#: The Apicurio Registry release built and run (see the module docstring for why).
APICURIO_VERSION = "2.4.2.Final"
#: Path of the Confluent-compatible API (what ``$EMERG_SCHEMA_REGISTRY_URL`` names).
CCOMPAT_PATH = "/apis/ccompat/v7"
_QUARKUS_VERSION = "2.16.4.Final"
_CONFIG_INDEX_VERSION = "0.1.10.Final"
_DEPENDENCY_PLUGIN_VERSION = "3.6.1"
_MAVEN_TIMEOUT_S = 1800.0
_LEVELS: tuple[str, ...] = ("BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE")
_LEVELS += ("FULL", "FULL_TRANSITIVE", "NONE")


def registry_cache_dir(version: str = APICURIO_VERSION) -> Path:
    """Where the built registry of ``version`` is cached (``$EMERG_REGISTRY_CACHE`` wins)."""
    explicit = os.environ.get("EMERG_REGISTRY_CACHE")
    if explicit:
        return Path(explicit).expanduser() / f"apicurio-registry-{version}"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emerg-stream" / f"apicurio-registry-{version}"


def _pom(version: str) -> str:
    app = (
        "<groupId>io.apicurio</groupId><artifactId>apicurio-registry-app</artifactId>"
        f"<version>{version}</version>"
    )
    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.emerg-stream</groupId>
  <artifactId>apicurio-registry-runner</artifactId>
  <version>{version}</version>
  <packaging>jar</packaging>
  <properties>
    <maven.compiler.release>17</maven.compiler.release>
    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
  </properties>
  <dependencyManagement>
    <dependencies>
      <dependency><groupId>io.quarkus</groupId><artifactId>quarkus-bom</artifactId>
        <version>{_QUARKUS_VERSION}</version><type>pom</type><scope>import</scope></dependency>
      <!-- the deployment module of 0.1.18.Final (what {version} names) is not on Central -->
      <dependency><groupId>io.apicurio</groupId>
        <artifactId>apicurio-common-app-components-config-index</artifactId>
        <version>{_CONFIG_INDEX_VERSION}</version></dependency>
    </dependencies>
  </dependencyManagement>
  <dependencies>
    <dependency>{app}
      <exclusions>
        <!-- JSON Schema validation only; published outside Maven Central -->
        <exclusion><groupId>com.github.everit-org.json-schema</groupId>
          <artifactId>org.everit.json.schema</artifactId></exclusion>
      </exclusions>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <!-- the application's classes and application.properties become ours -->
        <groupId>org.apache.maven.plugins</groupId><artifactId>maven-dependency-plugin</artifactId>
        <version>{_DEPENDENCY_PLUGIN_VERSION}</version>
        <executions><execution><id>unpack-app</id><phase>generate-resources</phase>
          <goals><goal>unpack</goal></goals>
          <configuration>
            <artifactItems><artifactItem>{app}</artifactItem></artifactItems>
            <outputDirectory>${{project.build.outputDirectory}}</outputDirectory>
          </configuration>
        </execution></executions>
      </plugin>
      <plugin>
        <groupId>io.quarkus</groupId><artifactId>quarkus-maven-plugin</artifactId>
        <version>{_QUARKUS_VERSION}</version>
        <executions><execution><goals><goal>build</goal></goals></execution></executions>
      </plugin>
    </plugins>
  </build>
</project>
"""


def build_registry(version: str = APICURIO_VERSION, *, cache: Path | None = None) -> Path:
    """Return the runner jar of Apicurio Registry ``version``, building it the first time.

    Args:
        version: An ``apicurio-registry-app`` release whose modules resolve from Central.
        cache: Folder of this version (default :func:`registry_cache_dir`).

    Returns:
        ``<cache>/app/apicurio-registry-runner-<version>-runner.jar`` (its ``lib/`` beside).

    Raises:
        ConfigError: No ``mvn`` on the PATH, or the Maven build failed (its last lines).
    """
    root = cache or registry_cache_dir(version)
    app = root / "app"
    jar = app / f"apicurio-registry-runner-{version}-runner.jar"
    if (root / ".complete").is_file() and jar.is_file():
        return jar
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ConfigError(
            "the test schema registry needs Maven (`mvn`) to build Apicurio Registry once; "
            "install it, or point $EMERG_SCHEMA_REGISTRY_URL at a registry you run"
        )
    project = root / "build"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    (project / "pom.xml").write_text(_pom(version))
    started = time.monotonic()
    argv = [mvn, "-B", "-q", "-f", str(project / "pom.xml"), "package", "-DskipTests"]
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            argv, capture_output=True, text=True, timeout=_MAVEN_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(
            f"Maven did not build Apicurio Registry {version} in {_MAVEN_TIMEOUT_S:.0f}s"
        ) from exc
    built = project / "target" / jar.name
    if done.returncode != 0 or not built.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ConfigError(f"Maven could not build Apicurio Registry {version}:\n{tail}")
    shutil.rmtree(app, ignore_errors=True)
    app.mkdir()
    built.rename(jar)
    (project / "target" / "lib").rename(app / "lib")
    shutil.rmtree(project, ignore_errors=True)
    (root / ".complete").write_text(version + "\n")
    log.info(
        "schema_registry_built",
        version=version,
        jars=len(list((app / "lib").glob("*.jar"))),
        seconds=round(time.monotonic() - started, 1),
        cache=str(root),
    )
    return jar


class SchemaRegistryServer(ChildServer):
    """Apicurio Registry in a child JVM on 127.0.0.1 (module docstring).

    Use as a context manager. The child gets SIGTERM when this process dies (Linux);
    :meth:`stop` sends SIGTERM and SIGKILL after ``stop_timeout_s``.

    Args:
        version: Apicurio Registry version (see :func:`build_registry`).
        port: HTTP port (default: a free one; a restart keeps the port it had).
        data_dir: Keep the schemas in an H2 file database here, so that a stop and a
            start keep every schema and id (default: in memory, lost on stop).
        compatibility: Global compatibility level set after start (``None``: leave
            Apicurio's default, ``NONE``).
        heap_mb: JVM heap (``-Xmx``).
        start_timeout_s: How long to wait for the API to answer.
        stop_timeout_s: Grace period between SIGTERM and SIGKILL.
    """

    _noun = "the schema registry"
    _stopped_event = "schema_registry_stopped"

    def __init__(
        self,
        *,
        version: str = APICURIO_VERSION,
        port: int | None = None,
        data_dir: Path | None = None,
        compatibility: str | None = "BACKWARD",
        heap_mb: int = 512,
        start_timeout_s: float = 120.0,
        stop_timeout_s: float = 20.0,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"port {port} out of range 1..65535")
        if compatibility is not None and compatibility not in _LEVELS:
            raise ConfigError(f"compatibility {compatibility!r}: use one of {', '.join(_LEVELS)}")
        self.version = version
        self.port = port
        self.data_dir = data_dir
        self.compatibility = compatibility
        self.heap_mb = heap_mb
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._run_dir: Path | None = None
        super().__init__()
        #: Seconds the last :meth:`start` took, by phase (``build``, ``boot``, ``total``).
        self.timings: dict[str, float] = {}

    @property
    def url(self) -> str:
        """The Confluent-compatible API: ``http://127.0.0.1:<port>/apis/ccompat/v7``."""
        if self._proc is None or self.port is None:
            raise ConfigError(f"{self._noun} is not running")
        return f"http://{HOST}:{self.port}{CCOMPAT_PATH}"

    def start(self) -> Self:
        """Build (once) and start the registry; wait until its API answers.

        Raises:
            ConfigError: Already running; no Java or Maven; the build failed.
            TransientError: It exited or did not answer in time (message: its log tail).
        """
        if self._proc is not None:
            raise ConfigError(f"{self._noun} is already running")
        t0 = time.monotonic()
        jar = build_registry(self.version)
        java = find_java()
        self.timings = {"build": time.monotonic() - t0}
        fixed_port = self.port is not None
        for attempt in (1, 2):
            if not fixed_port:
                self.port = free_port()
            t = time.monotonic()
            try:
                self._spawn(java, jar)
                self._wait_ready()
                if self.compatibility is not None:
                    self._put_config({"compatibility": self.compatibility})
            except TransientError:
                tail = self.log_tail(40)
                self._terminate()
                if attempt == 1 and not fixed_port and "already in use" in tail.lower():
                    continue  # lost a port race; another port
                raise
            except BaseException:
                self._terminate()
                raise
            self.timings["boot"] = time.monotonic() - t
            break
        self.timings["total"] = time.monotonic() - t0
        log.info(
            "schema_registry_started",
            version=self.version,
            url=self.url,
            pid=self.pid,
            storage=str(self.data_dir) if self.data_dir else "memory",
            **{f"{k}_s": round(v, 2) for k, v in self.timings.items()},
        )
        return self

    def __repr__(self) -> str:
        where = self.url if self.running else "stopped"
        return f"SchemaRegistryServer(Apicurio {self.version}, {where})"

    # -- internals -------------------------------------------------------------------

    @property
    def _what(self) -> str:
        return f"Apicurio Registry {self.version}"

    def _argv(self, java: Path, jar: Path) -> list[str]:
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            jdbc = f"jdbc:h2:file:{self.data_dir.resolve() / 'registry'}"
        else:
            jdbc = "jdbc:h2:mem:registry_db"
        return [
            str(java),
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dquarkus.http.host={HOST}",
            f"-Dquarkus.http.port={self.port}",
            f"-Dquarkus.datasource.jdbc.url={jdbc}",
            "-Dquarkus.datasource.jdbc.min-size=1",
            "-Dquarkus.datasource.jdbc.initial-size=1",
            "-Dquarkus.log.console.color=false",
            "-jar",
            str(jar),
        ]

    def _spawn(self, java: Path, jar: Path) -> None:
        self._run_dir = Path(tempfile.mkdtemp(prefix="emerg-registry-"))
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in _terminate
            prefix="apicurio-", suffix=".log", dir=self._run_dir, delete=False
        )
        # Apicurio and Quarkus read many settings from the environment (REGISTRY_*,
        # QUARKUS_*, KEYCLOAK_*, HTTP_PORT, ...): the child gets none of ours.
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "JAVA_HOME")
        env = {k: os.environ[k] for k in keep if k in os.environ}
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self._argv(java, jar),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._run_dir,
                start_new_session=True,
                preexec_fn=_pdeathsig_hook(),
            )
        except OSError as exc:
            raise ConfigError(f"cannot run {java}: {exc}") from exc

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        probe = f"http://{HOST}:{self.port}{CCOMPAT_PATH}/subjects"
        while True:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TransientError(self._failure(f"no answer in {self.start_timeout_s}s"))
            try:
                with urllib.request.urlopen(probe, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)

    def _put_config(self, body: dict[str, str]) -> None:
        req = urllib.request.Request(
            f"http://{HOST}:{self.port}{CCOMPAT_PATH}/config",
            data=json.dumps(body).encode(),
            method="PUT",
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise TransientError(self._failure(f"refused the global config {body}: {exc}")) from exc

    def _terminate(self) -> int | None:
        code = self._end_child(signal.SIGTERM, "schema_registry_killed")
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        self._run_dir = None
        return code


def main(argv: list[str] | None = None) -> int:
    """Run the registry until Ctrl-C; print ``EMERG_SCHEMA_REGISTRY_URL=...`` when up.

    ``--build-only`` builds it (once) and prints the runner jar's path instead.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m emerg_stream.stream.schema_registry_server")
    parser.add_argument("--build-only", action="store_true", help="build it once, do not run it")
    args = parser.parse_args(argv)
    if args.build_only:
        print(build_registry(), flush=True)
        return 0
    with SchemaRegistryServer() as registry:
        print(f"EMERG_SCHEMA_REGISTRY_URL={registry.url}", flush=True)
        print(
            f"Apicurio Registry {registry.version} (pid {registry.pid}); Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        # blocked only now, so the JVM started above does not inherit the mask
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        with contextlib.suppress(KeyboardInterrupt):
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
