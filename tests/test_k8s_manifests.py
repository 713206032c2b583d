"""deploy/k8s, deploy/prometheus and deploy/grafana, checked without a cluster.

Core objects are validated against the Kubernetes OpenAPI-derived JSON schemas
that kubernetes-validate vendors (strict: unknown fields fail). KEDA's CRDs are
not in those schemas, so the ScaledObject is checked field by field, above all
that maxReplicaCount never exceeds the requests topic's partition count.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from pipeline import metrics
from pipeline.config import load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
PROMETHEUS_PATH = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PATH = REPO_ROOT / "deploy" / "grafana" / "labelstream.json"
DOCKERFILE_PATH = REPO_ROOT / "deploy" / "Dockerfile"
KUBERNETES_VERSION = "1.30"
CORE_KINDS = {"Deployment", "ConfigMap", "Secret", "Service"}
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "Kustomization"}
PARTITIONS_ANNOTATION = "labelstream.io/requests-topic-partitions"
METRICS_PORT = 9400


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                found.append((path.name, document))
    return found


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [doc for _file, doc in manifests()
               if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def schema_errors(document: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"
    return None


def worker_container() -> dict[str, Any]:
    [container] = the("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def config_data() -> dict[str, str]:
    return the("ConfigMap", "labelstream-config")["data"]


def secret_data(name: str) -> dict[str, str]:
    return the("Secret", name)["stringData"]


# -- schemas ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [pytest.param(doc, id=f"{file}:{doc['kind']}/{doc['metadata']['name']}")
     for file, doc in manifests() if doc["kind"] in CORE_KINDS],
)
def test_core_manifests_match_the_kubernetes_schema(document: dict[str, Any]) -> None:
    assert schema_errors(document) is None


def test_every_manifest_is_either_schema_checked_or_a_known_custom_resource() -> None:
    kinds = {doc["kind"] for _file, doc in manifests()}
    assert kinds <= CORE_KINDS | CUSTOM_KINDS
    assert CORE_KINDS <= kinds and {"ScaledObject", "TriggerAuthentication"} <= kinds


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.update(livenesProbe=c.pop("livenessProbe")), id="misspelt-field"),
        pytest.param(lambda c: c["ports"][0].update(containerPort="9400"), id="port-as-string"),
        pytest.param(lambda c: c["readinessProbe"]["httpGet"].pop("port"), id="probe-without-port"),
    ],
)
def test_the_schema_check_rejects_a_broken_deployment(breakage: Any) -> None:
    broken = copy.deepcopy(the("Deployment"))
    breakage(broken["spec"]["template"]["spec"]["containers"][0])
    assert schema_errors(broken) is not None


def test_kustomization_lists_every_manifest() -> None:
    listed = set(the("Kustomization")["resources"])
    files = {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files


# -- the Deployment ---------------------------------------------------------------------


def test_deployment_requests_one_gpu() -> None:
    resources = worker_container()["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["nvidia.com/gpu"] == 1


def test_probes_hit_healthz_and_readyz_on_the_metrics_port() -> None:
    container = worker_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["metrics"] == METRICS_PORT == int(config_data()["LABELSTREAM_METRICS__PORT"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_config_comes_from_the_configmap_and_the_secret() -> None:
    sources = worker_container()["envFrom"]
    assert {"configMapRef": {"name": "labelstream-config"}} in sources
    assert {"secretRef": {"name": "labelstream-secrets"}} in sources
    assert not any(re.search(r"PASSWORD|SECRET", key) for key in config_data())


def test_configmap_and_secret_are_accepted_by_our_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**config_data(), **secret_data("labelstream-secrets")}.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert settings.kafka.sasl_password is not None
    assert "REPLACE_ME" not in repr(settings)
    assert settings.metrics.port == METRICS_PORT
    assert settings.model.device == "cuda"


def test_the_kafka_ca_is_mounted_where_the_config_points() -> None:
    mounts = {mount["name"]: mount["mountPath"] for mount in worker_container()["volumeMounts"]}
    cafile = Path(config_data()["LABELSTREAM_KAFKA__SSL_CAFILE"])
    assert str(cafile.parent) == mounts["kafka-ca"]
    volumes = {volume["name"]: volume for volume in the("Deployment")["spec"]["template"]["spec"]["volumes"]}
    ca_secret = volumes["kafka-ca"]["secret"]["secretName"]
    assert cafile.name in secret_data(ca_secret)


def test_the_pod_runs_as_the_images_non_root_user() -> None:
    pod = the("Deployment")["spec"]["template"]["spec"]
    uid = int(re.search(r"--uid (\d+)", DOCKERFILE_PATH.read_text(encoding="utf-8")).group(1))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid != 0
    container_security = worker_container()["securityContext"]
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["capabilities"]["drop"] == ["ALL"]


def test_the_grace_period_outlasts_the_drain_timeout() -> None:
    grace = the("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(config_data()["LABELSTREAM_WORKER__DRAIN_TIMEOUT_S"])


def test_the_service_selects_the_worker_pods_on_the_metrics_port() -> None:
    service = the("Service")
    pod_labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (METRICS_PORT, "metrics")


# -- KEDA -----------------------------------------------------------------------------------


def kafka_trigger() -> dict[str, Any]:
    [trigger] = the("ScaledObject")["spec"]["triggers"]
    return trigger


def test_scaled_object_targets_the_worker_deployment() -> None:
    scaled = the("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", the("Deployment")["metadata"]["name"])


def test_kafka_trigger_watches_the_workers_group_and_topic() -> None:
    trigger = kafka_trigger()
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    config = config_data()
    assert meta["bootstrapServers"] == config["LABELSTREAM_KAFKA__BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == config["LABELSTREAM_KAFKA__GROUP_ID"]
    assert meta["topic"] == config["LABELSTREAM_TOPICS__REQUESTS"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["allowIdleConsumers"] == "false"


def test_max_replicas_never_exceed_the_requests_topic_partitions() -> None:
    scaled = the("ScaledObject")
    partitions = int(scaled["metadata"]["annotations"][PARTITIONS_ANNOTATION])
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= partitions
    # The reason is written next to the number, for whoever raises it.
    text = (K8S_DIR / "keda.yaml").read_text(encoding="utf-8")
    comment = text[: text.index("maxReplicaCount:")].rsplit("minReplicaCount:", 1)[1]
    assert "partition" in comment and "idle" in comment and "GPU" in comment


def test_trigger_authentication_reads_secrets_that_exist() -> None:
    auth = the("TriggerAuthentication", kafka_trigger()["authenticationRef"]["name"])
    parameters = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    assert {"sasl", "tls", "username", "password", "ca"} <= parameters
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in secret_data(ref["name"]), ref
    assert secret_data("labelstream-keda-kafka")["sasl"] == "scram_sha512"


# -- Prometheus -------------------------------------------------------------------------------


def scrape_configs() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(PROMETHEUS_PATH.read_text(encoding="utf-8"))
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_prometheus_scrapes_the_compose_worker_on_9400() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    job = scrape_configs()["labelstream-compose"]
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    assert targets == [f"worker:{METRICS_PORT}"]
    assert "worker" in compose["services"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_finds_kubernetes_pods_by_label_and_the_metrics_port_name() -> None:
    job = scrape_configs()["labelstream-kubernetes"]
    keeps = {rule["source_labels"][0]: rule["regex"] for rule in job["relabel_configs"]
             if rule.get("action", "replace") == "keep"}
    pod_labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["app.kubernetes.io/name"] == keeps["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    port_name = keeps["__meta_kubernetes_pod_container_port_name"]
    ports = {port["name"]: port["containerPort"] for port in worker_container()["ports"]}
    assert ports[port_name] == METRICS_PORT


# -- Grafana ----------------------------------------------------------------------------------


def exported_sample_names() -> set[str]:
    """Every series name pipeline/metrics.py can put on /metrics."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for collector in vars(metrics).values():
        if isinstance(collector, Counter | Gauge | Histogram):
            for family in collector.describe():
                names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def dashboard_panels() -> list[dict[str, Any]]:
    return json.loads(GRAFANA_PATH.read_text(encoding="utf-8"))["panels"]


def test_dashboard_queries_only_metrics_that_exist() -> None:
    known = exported_sample_names()
    for panel in dashboard_panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\blabelstream_\w+", target["expr"]))
            assert used, (panel["title"], target["expr"])
            assert used <= known, (panel["title"], used - known)


def test_dashboard_shows_throughput_lag_stage_latency_and_dead_letters() -> None:
    expressions = " ".join(target["expr"] for panel in dashboard_panels() for target in panel["targets"])
    for needed in ("labelstream_requests_consumed_total", "labelstream_requests_labelled_total",
                   "labelstream_consumer_lag", "labelstream_stage_seconds_bucket", "labelstream_dead_letters_total"):
        assert needed in expressions
    assert "histogram_quantile(0.99" in expressions


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(GRAFANA_PATH.read_text(encoding="utf-8"))
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"].strip("${}") in variables
