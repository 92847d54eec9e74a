"""Deployment files agree with the code: env names, commands, ports, images, metrics.

Nothing here runs Docker or Kubernetes; the files are parsed and cross-checked against
the settings classes, the CLI parser, the topic spec and the worker's Prometheus metrics.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from emerg_stream.cli import build_parser
from emerg_stream.config_doc import env_vars, other_variables, settings_classes
from emerg_stream.stream.metrics import WorkerMetrics

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"

#: Metrics the dashboard takes from an exporter, not from our code: name -> compose service.
EXTERNAL_METRICS = {"kafka_consumergroup_lag": "kafka-exporter"}
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def kind(name: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == name]
    assert len(found) == 1, name
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec(doc)["containers"] if c["name"] == name)


def compose() -> dict[str, Any]:
    return load(INFRA / "docker-compose.yml")["services"]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def known_variables() -> tuple[set[str], set[str]]:
    """(every documented EMERG_ variable, the secret ones)."""
    rows = [v for cls in settings_classes() for v in env_vars(cls)]
    names = {v.name for v in rows} | {n for n, _ in other_variables()}
    return names, {v.name for v in rows if v.secret}


def socat_ports(args: list[str]) -> tuple[int, int]:
    """(listen port, target port on 127.0.0.1) of a socat proxy's arguments."""
    joined = " ".join(args)
    listen = re.search(r"TCP-LISTEN:(\d+)", joined)
    target = re.search(r"TCP:127\.0\.0\.1:(\d+)", joined)
    assert listen and target, joined
    return int(listen.group(1)), int(target.group(1))


def project_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


# -- environment variables ---------------------------------------------------------------


def test_every_emerg_variable_in_compose_and_k8s_exists_in_the_settings():
    names, _ = known_variables()
    used: dict[str, str] = {}
    for svc_name, svc in compose().items():
        for key in compose_env(svc):
            used[key] = f"docker-compose.yml:{svc_name}"
    for doc in k8s_docs():
        for key in list(doc.get("data", {})) + list(doc.get("stringData", {})):
            used[key] = f"k8s {doc['kind']}"
        if doc["kind"] in ("Deployment", "Job"):
            for c in pod_spec(doc)["containers"]:
                for item in c.get("env", []):
                    used[item["name"]] = f"k8s {doc['kind']}/{c['name']}"
    emerg = {k: where for k, where in used.items() if k.startswith("EMERG_")}
    assert emerg, "no EMERG_ variable found: the parser is broken"
    unknown = {k: where for k, where in emerg.items() if k not in names}
    assert unknown == {}, f"not a setting (see docs/CONFIGURATION.md): {unknown}"


def test_secrets_only_in_the_secret_and_the_settings_load():
    _, secrets = known_variables()
    cm, secret = kind("ConfigMap"), kind("Secret")
    assert set(cm["data"]).isdisjoint(secrets), "a secret in the ConfigMap"
    assert set(secret["stringData"]) <= secrets
    assert "EMERG_KAFKA__SASL_PASSWORD" in secret["stringData"]
    # the ConfigMap + Secret form valid worker settings (SASL_SSL needs the password)
    import os

    from emerg_stream.config import WorkerSettings, load_settings

    env = {**cm["data"], **secret["stringData"]}
    saved = {k: v for k, v in os.environ.items() if k.startswith("EMERG_")}
    try:
        for k in saved:
            del os.environ[k]
        os.environ.update(env)
        settings = load_settings(WorkerSettings)
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert str(settings.checkpoint) == cm["data"]["EMERG_CHECKPOINT"]
    # both pods read the ConfigMap and the Secret
    for doc in (kind("Deployment"), kind("Job")):
        main = pod_spec(doc)["containers"][0]
        refs = {next(iter(r.values()))["name"] for r in main["envFrom"]}
        assert refs == {cm["metadata"]["name"], secret["metadata"]["name"]}


# -- commands -----------------------------------------------------------------------------


def parse(argv: list[str]) -> Any:
    """Parse like the image's entrypoint (``emerg-stream --log-json ...``)."""
    return build_parser().parse_args(["--log-json", *argv])


def test_compose_and_k8s_commands_parse_with_the_real_cli():
    services = compose()
    topics = parse(services["topics"]["command"])
    assert (topics.command, topics.action) == ("topics", "create")
    assert (REPO / topics.config).is_file()
    worker = parse(services["worker"]["command"])
    assert worker.command == "worker"
    job = parse(container(kind("Job"), "topics")["args"])
    assert (job.command, job.action) == ("topics", "create")
    assert (REPO / job.config).is_file()
    deployed = parse(container(kind("Deployment"), "worker")["args"])
    assert deployed.command == "worker"
    assert str(deployed.checkpoint) == "$(EMERG_CHECKPOINT)"
    assert "EMERG_CHECKPOINT" in kind("ConfigMap")["data"]


def test_dockerfile_ships_what_the_commands_need():
    text = (INFRA / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["emerg-stream", "--log-json"]' in text
    assert "COPY infra/topics.yaml ./infra/topics.yaml" in text
    # the non-editable install builds the wheel with its schemas (setup.py's hook)
    assert "COPY pyproject.toml setup.py MANIFEST.in README.md ./" in text
    assert "COPY schemas ./schemas" in text
    ignore = (INFRA / "Dockerfile.dockerignore").read_text()
    assert all(f"!{p}" in ignore for p in ("setup.py", "MANIFEST.in", "schemas/**"))
    assert "WORKDIR /app" in text
    # the CPU warm-up kernel is built at start: a compiler and a writable cache (/tmp is
    # the pod's one writable path)
    assert "g++ libc6-dev" in text
    assert "EMERG_KERNEL_CACHE=/tmp/emerg-kernels" in text
    worker = container(kind("Deployment"), "worker")
    assert any(m["mountPath"] == "/tmp" for m in worker["volumeMounts"])
    build = compose()["worker"]["build"]
    assert (INFRA / build["context"] / build["dockerfile"]).resolve() == INFRA / "Dockerfile"


# -- images, ports, partitions -----------------------------------------------------------------


def test_one_image_everywhere_tagged_with_the_project_version():
    services = compose()
    image = f"emerg-stream:{project_version()}"
    assert services["worker"]["image"] == services["topics"]["image"] == image
    assert container(kind("Deployment"), "worker")["image"] == image
    assert container(kind("Job"), "topics")["image"] == image
    proxy = services["metrics-proxy"]["image"]
    assert container(kind("Deployment"), "metrics-proxy")["image"] == proxy
    for svc in services.values():  # pinned, never :latest
        if "image" in svc:
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), svc["image"]


def test_compose_metrics_path_is_connected():
    services = compose()
    worker = services["worker"]
    port = int(compose_env(worker)["EMERG_METRICS_PORT"])
    assert worker["network_mode"] == "service:metrics-proxy"
    listen, target = socat_ports(services["metrics-proxy"]["command"])
    assert target == port
    assert "EMERG_METRICS_PORT" in worker["healthcheck"]["test"][-1]
    prom = load(INFRA / "prometheus.yml")
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in prom["scrape_configs"]
    }
    assert targets["emerg-worker"] == [f"metrics-proxy:{listen}"]
    for host_port in (t for ts in targets.values() for t in ts):
        assert host_port.split(":")[0] in services, host_port
    mount = next(v for v in services["prometheus"]["volumes"] if "prometheus.yml" in v)
    assert (INFRA / mount.split(":")[0]).resolve() == INFRA / "prometheus.yml"


def test_compose_clients_use_the_advertised_listener():
    services = compose()
    kafka_env = compose_env(services["kafka"])
    advertised = dict(
        reversed(item.split("://", 1))
        for item in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    internal = next(addr for addr, name in advertised.items() if name == "PLAINTEXT")
    assert kafka_env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "PLAINTEXT"
    for name in ("topics", "worker"):
        assert compose_env(services[name])["EMERG_KAFKA__BOOTSTRAP_SERVERS"] == internal
    assert f"--kafka.server={internal}" in services["kafka-exporter"]["command"]
    host = next(addr for addr, name in advertised.items() if name == "HOST")
    assert (
        f"127.0.0.1:{host.rsplit(':', 1)[1]}:{host.rsplit(':', 1)[1]}" in services["kafka"]["ports"]
    )


def test_compose_runs_the_kafka_version_the_tests_run():
    from emerg_stream.stream.apache_kafka import KAFKA_VERSION

    assert compose()["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"


def test_k8s_metrics_port_probes_and_scrape_annotation_agree():
    dep = kind("Deployment")
    port = int(kind("ConfigMap")["data"]["EMERG_METRICS_PORT"])
    proxy = container(dep, "metrics-proxy")
    listen, target = socat_ports(proxy["args"])
    assert target == port
    assert proxy["ports"] == [{"name": "metrics", "containerPort": listen}]
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(listen)
    worker = container(dep, "worker")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = worker[probe]["exec"]["command"]
        assert "127.0.0.1" in command[-1] and "EMERG_METRICS_PORT" in command[-1]


def test_replicas_do_not_exceed_the_partitions():
    spec = load(INFRA / "topics.yaml")["topics"]
    items, interactions = spec["items"]["partitions"], spec["interactions"]["partitions"]
    assert items == interactions, "items and interactions must be co-partitioned"
    dep = kind("Deployment")
    assert 1 <= dep["spec"]["replicas"] <= items
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


# -- dashboard ------------------------------------------------------------------------------


def worker_metrics() -> dict[str, tuple[str, set[str]]]:
    """Exposed sample name -> (family, labels) of every metric of the worker."""
    out: dict[str, tuple[str, set[str]]] = {}
    for value in vars(WorkerMetrics()).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name, labels, typ = value._name, set(value._labelnames), value._type
        suffixes = {
            "counter": ["_total"],
            "gauge": [""],
            "histogram": ["_bucket", "_sum", "_count"],
        }
        for suffix in suffixes.get(typ, [""]):
            out[name + suffix] = (name, labels | ({"le"} if suffix == "_bucket" else set()))
    return out


def dashboard_queries() -> list[str]:
    dash = json.loads((INFRA / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            exprs.append(var["definition"])
    return exprs


def test_dashboard_metrics_and_labels_exist_in_the_code():
    known = worker_metrics()
    source = "\n".join(p.read_text() for p in (REPO / "emerg_stream").rglob("*.py"))
    scraped = {job["job_name"] for job in load(INFRA / "prometheus.yml")["scrape_configs"]}
    for expr in dashboard_queries():
        metrics = set(re.findall(r"\b((?:emerg|kafka)_[a-z0-9_]+)\b", expr))
        assert metrics, expr
        labels = set(TARGET_LABELS)
        for m in metrics:
            if m in EXTERNAL_METRICS:
                service = EXTERNAL_METRICS[m]
                assert service in compose() and service in scraped, m
                labels |= {"consumergroup", "topic", "partition"}
                continue
            assert m in known, f"{m} is not a worker metric: {sorted(known)}"
            family, family_labels = known[m]
            assert f'"{family}"' in source  # defined in the package source
            labels |= family_labels
        used = set()
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            used |= {x.strip() for x in group.split(",") if x.strip()}
        for selector in re.findall(r"\{([^}]*)\}", expr):
            used |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
        assert used <= labels, f"unknown labels {used - labels} in {expr}"


def test_dashboard_covers_the_operator_questions():
    exprs = "\n".join(dashboard_queries())
    for needed in (
        "emerg_worker_records_total",
        "kafka_consumergroup_lag",
        "emerg_worker_batch_update_seconds_bucket",
        "emerg_worker_checkpoint_seconds_bucket",
        "emerg_worker_params_published_total",
        "emerg_worker_items_in_state",
    ):
        assert needed in exprs, needed
    dash = json.loads((INFRA / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"  # no hard-coded data source


def test_deployment_doc_links_files_and_settings_that_exist():
    text = (REPO / "docs" / "DEPLOYMENT.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, "no links found: the pattern is broken"
    for link in local:
        assert (REPO / "docs" / link).resolve().exists(), link
    names, _ = known_variables()
    mentioned = set(re.findall(r"\bEMERG_[A-Z][A-Z0-9_]*[A-Z0-9]\b", text))
    assert mentioned - names == set()
    for path in ("infra/k8s", "infra/docker-compose.yml", "infra/grafana-dashboard.json"):
        assert path in text
