"""deploy/kubernetes rendered offline with `kubectl kustomize` (base: CPU, cuda: the GPU overlay), the core objects
validated strictly against Kubernetes 1.31's schemas, the KEDA and Prometheus-operator objects checked for what
they point at, and the pieces cross-checked: ports, probes, the drain within the grace period, the image's user,
the Secrets the pods read, the server's own settings checks, and the autoscaler's query against the metrics the
server exports (and against promtool's PromQL parser). Then a real server configured as the base pod is (TLS
files where the Secret is mounted, keys required; loopback, free ports and an embedded Postgres instead) answers
what the kubelet's probes, Prometheus and a client of the Service ask without a key."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate  # type: ignore[import-untyped]
import prometheus_client
import pytest
import trustme
import yaml  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc

import embedpool.metrics  # noqa: F401 - registers the server's metrics with prometheus_client
from embedpool import config
from embedpool.server.app import Running
from embedpool.server.exposure import check_exposure
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import serving
from .test_container import exposed_ports, user_id

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
TARGET_VERSION = "1.31"
OVERLAYS = ("base", "cuda")
CRD_GROUPS = ("keda.sh", "monitoring.coreos.com")
# What one replica holds besides its pool: the health probe's connection and the two LISTEN connections (the
# collection and key caches).
EXTRA_CONNECTIONS = 3
POSTGRES_MAX_CONNECTIONS = 100  # Postgres' default
SATURATION = 'sum(embedpool_permits_in_use{{namespace="{ns}"}}) / sum(embedpool_permits_capacity{{namespace="{ns}"}})'

Obj = dict[str, Any]


def _program(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: it {why}")
    return path


def render(overlay: str) -> list[Obj]:
    kubectl = _program("kubectl", "renders deploy/kubernetes offline (kubectl kustomize)")
    out = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[Obj]]]:
    yield request.param, render(request.param)


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def container(objects: list[Obj]) -> Obj:
    containers: list[Obj] = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env(c: Obj) -> dict[str, str]:
    """The container's literal EMBEDPOOL_* values; one from a Secret reads as a placeholder."""
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names)), f"a variable set twice: {names}"
    return {e["name"]: e.get("value", f"<{e['name']} from a Secret>") for e in c["env"]}


def settings_of(objects: list[Obj]) -> config.Settings:
    return config.load(environ=env(container(objects)))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def namespace() -> str:
    ns = yaml.safe_load((KUBERNETES / "base" / "kustomization.yaml").read_text())["namespace"]
    assert isinstance(ns, str)
    return ns


def test_each_overlay_renders_the_complete_set_in_one_namespace(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["Namespace", "Deployment", "Service", "Service", "PodDisruptionBudget", "ScaledObject", "ServiceMonitor"]
    )
    one(objects, "Namespace", namespace())
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {namespace()}


def test_core_objects_validate_strictly(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    core = [o for o in objects if o["apiVersion"].split("/")[0] not in CRD_GROUPS]
    assert len(core) == 5
    for o in core:
        kubernetes_validate.validate(o, TARGET_VERSION, strict=True)


def test_the_secrets_template_validates_and_holds_what_the_pods_read(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    secrets = {s["metadata"]["name"]: s for s in yaml.safe_load_all((KUBERNETES / "secrets.example.yaml").read_text())}
    for s in secrets.values():
        kubernetes_validate.validate(s, TARGET_VERSION, strict=True)
        assert s["metadata"]["namespace"] == namespace()
    read: set[tuple[str, str]] = set()
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    for e in container(objects)["env"]:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            read.add((ref["name"], ref["key"]))
    mounts = {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}
    settings = settings_of(objects)
    for volume in pod["volumes"]:
        if "secret" in volume:
            directory = mounts[volume["name"]]
            for path in (settings.tls_cert, settings.tls_key):
                if path.startswith(directory + "/"):
                    read.add((volume["secret"]["secretName"], path[len(directory) + 1 :]))
    monitor = one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["tlsConfig"]["ca"]["secret"]
    read.add((monitor["name"], monitor["key"]))
    assert {("embedpool-database", "url"), ("embedpool-tls", "tls.crt"), ("embedpool-tls", "tls.key")} <= read
    for name, key in read:
        assert key in secrets[name]["stringData"], f"{name}/{key} is read but the template has no such key"


def test_probes_container_ports_services_and_image_agree(overlay: tuple[str, list[Obj]]) -> None:
    name, objects = overlay
    c = container(objects)
    settings = settings_of(objects)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": settings.port, "http": settings.http_port, "metrics": settings.metrics_port}
    assert set(ports.values()) == exposed_ports("cpu" if name == "base" else "cuda")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["port"] == "http" and get["scheme"] == ("HTTPS" if settings.tls_cert else "HTTP"), probe
    # Readiness is what gRPC health says too (server.app._Readiness); liveness only that the process answers.
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(one(objects, "Deployment")["spec"]["selector"]["matchLabels"], labels)
    for service in (o for o in objects if o["kind"] == "Service"):
        assert selects(service["spec"]["selector"], labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]], port


def test_the_headless_service_lists_pods_for_client_side_balancing(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    headless = [s for s in objects if s["kind"] == "Service" and s["spec"].get("clusterIP") == "None"]
    regular = [s for s in objects if s["kind"] == "Service" and "clusterIP" not in s["spec"]]
    assert len(headless) == len(regular) == 1
    assert not headless[0]["spec"].get("publishNotReadyAddresses", False)  # draining pods leave the DNS answer
    assert "grpc" in {p["name"] for p in headless[0]["spec"]["ports"]}


def test_stopping_drains_within_the_termination_grace_period(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = settings_of(objects).grace_seconds
    assert pre_stop >= 2, "endpoints need a moment to drop the pod before it stops accepting"
    assert pre_stop + grace < pod["terminationGracePeriodSeconds"]


def test_the_pod_runs_as_the_images_non_root_user(overlay: tuple[str, list[Obj]]) -> None:
    name, objects = overlay
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == user_id("cpu" if name == "base" else "cuda")
    security = container(objects)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    image = container(objects)["image"]
    assert image.endswith(":cpu" if name == "base" else ":cuda")


def test_the_servers_own_checks_accept_the_pods_settings(
    overlay: tuple[str, list[Obj]], caplog: pytest.LogCaptureFixture
) -> None:
    name, objects = overlay
    settings = settings_of(objects)
    assert settings.auth == "keys" and settings.tls_cert and not settings.insecure
    with caplog.at_level(logging.WARNING, logger="embedpool.server"):
        check_exposure(settings)  # every listener off loopback, none of them unprotected
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert settings.device == ("cpu" if name == "base" else "cuda")
    resources = container(objects)["resources"]
    cpus = int(resources["requests"]["cpu"])
    assert settings.intra_op_threads <= cpus and settings.tokenizer_threads <= cpus
    if name == "cuda":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        tolerated = {t["key"] for t in one(objects, "Deployment")["spec"]["template"]["spec"]["tolerations"]}
        assert "nvidia.com/gpu" in tolerated
    else:
        assert "nvidia.com/gpu" not in resources.get("limits", {})


def test_the_budget_and_the_autoscaler_leave_replicas_and_connections(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    scaled = one(objects, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    deployment = one(objects, "Deployment")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    low, high = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    assert 2 <= low <= high
    budget = one(objects, "PodDisruptionBudget")["spec"]
    assert selects(budget["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    assert budget["maxUnavailable"] < low  # a drain never takes the last ready replica
    assert high * (settings_of(objects).db_pool_size + EXTRA_CONNECTIONS) <= POSTGRES_MAX_CONNECTIONS


def _exported_series() -> set[str]:
    """Every series name /metrics can carry: the families' (a labelled one has no sample until a pool labels it)
    and their samples' (a counter's _total)."""
    families = list(prometheus_client.REGISTRY.collect())
    return {f.name for f in families} | {sample.name for f in families for sample in f.samples}


def test_the_autoscaler_queries_saturation_from_metrics_the_server_exports(
    overlay: tuple[str, list[Obj]], tmp_path: Path
) -> None:
    _, objects = overlay
    (trigger,) = one(objects, "ScaledObject")["spec"]["triggers"]
    assert (trigger["type"], trigger["metricType"]) == ("prometheus", "Value")
    query = trigger["metadata"]["query"]
    assert query == SATURATION.format(ns=namespace())
    assert 0 < float(trigger["metadata"]["threshold"]) < 1
    used = set(re.findall(r"embedpool_\w+", query))
    assert used and used <= _exported_series(), used - _exported_series()
    promtool = _program("promtool", "checks the autoscaler's PromQL (make system-deps installs it)")
    rules = tmp_path / "saturation.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "keda", "rules": [{"record": "saturation", "expr": query}]}]}))
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_service_monitor_scrapes_each_pod_once_over_https(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    services = [
        s
        for s in objects
        if s["kind"] == "Service" and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert len(services) == 1, "more than one Service selected: every pod would be scraped twice"
    (endpoint,) = monitor["spec"]["endpoints"]
    port = {p["name"]: p for p in services[0]["spec"]["ports"]}[endpoint["port"]]
    assert port["targetPort"] == "metrics"
    assert endpoint["scheme"] == ("https" if settings_of(objects).tls_cert else "http")
    assert endpoint.get("path", "/metrics") == "/metrics"


@dataclasses.dataclass
class PodServer:
    running: Running
    ca: trustme.CA
    service_name: str  # the name the ServiceMonitor and in-cluster clients verify the certificate against


@pytest.fixture(scope="module")
def pod_server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[PodServer]:
    objects = render("base")
    c = container(objects)
    settings = settings_of(objects)
    service_name = one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["tlsConfig"]["serverName"]
    # The TLS Secret's files, where its volume is mounted (moved under a temporary folder).
    (mount,) = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "tls"]
    tmp = tmp_path_factory.mktemp("pod")
    ca = trustme.CA()
    leaf = ca.issue_cert(service_name, f"embedpool-replicas.{namespace()}.svc")
    files = {}
    for path, blob in (
        (settings.tls_cert, b"".join(p.bytes() for p in leaf.cert_chain_pems)),
        (settings.tls_key, leaf.private_key_pem.bytes()),
    ):
        assert path.startswith(mount + "/")
        files[path] = tmp / "tls" / path[len(mount) + 1 :]
        files[path].parent.mkdir(exist_ok=True)
        files[path].write_bytes(blob)
    settings = dataclasses.replace(
        settings,
        tls_cert=str(files[settings.tls_cert]),
        tls_key=str(files[settings.tls_key]),
        # What a test may not do as the pod does: bind every interface, fixed ports, an external database, and
        # all the threads of a 4-core request on a shared 2-core machine.
        host="127.0.0.1",
        metrics_host="127.0.0.1",
        port=0,
        http_port=0,
        metrics_port=0,
        database_url="",
        data_dir=tmp / "data",
        model=str(model_dir),
        intra_op_threads=1,
        tokenizer_threads=1,
    )
    with serving(settings) as running:
        yield PodServer(running, ca, service_name)


def test_the_kubelets_https_probes_pass_without_a_key(pod_server: PodServer) -> None:
    kubelet = ssl.create_default_context()
    kubelet.check_hostname, kubelet.verify_mode = False, ssl.CERT_NONE  # HTTPS probes do not verify
    port = pod_server.running.http_port
    for path in ("/health", "/ready"):
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=kubelet, timeout=10) as reply:
            assert reply.status == 200 and json.load(reply)["status"] == "ok", path


def test_grpc_health_says_serving_and_an_rpc_needs_a_key(pod_server: PodServer) -> None:
    credentials = grpc.ssl_channel_credentials(pod_server.ca.cert_pem.bytes())
    options = [("grpc.ssl_target_name_override", pod_server.service_name)]
    with grpc.secure_channel(f"127.0.0.1:{pod_server.running.port}", credentials, options) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "embedpool.v1.Embedder"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.EmbedderStub(channel).Embed(pb.EmbedRequest(documents=[pb.Document(text="x")]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_prometheus_scrapes_the_saturation_series_verifying_the_certificate(pod_server: PodServer) -> None:
    prometheus = ssl.create_default_context()
    pod_server.ca.configure_trust(prometheus)  # the Secret's ca.crt
    address = ("127.0.0.1", pod_server.running.metrics_port)
    with (
        socket.create_connection(address, timeout=10) as raw,
        prometheus.wrap_socket(raw, server_hostname=pod_server.service_name) as tls,
    ):
        tls.sendall(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
        reply = b"".join(iter(lambda: tls.recv(65536), b"")).decode()
    assert reply.startswith("HTTP/1.0 200")
    series = {  # by name; the pool's series carry the model's label
        line.split(" ")[0].partition("{")[0]: line.split(" ")[1]
        for line in reply.splitlines()
        if line.startswith("embedpool_")
    }
    assert float(series["embedpool_permits_capacity"]) > 0 and float(series["embedpool_ready"]) == 1
    assert "embedpool_permits_in_use" in series
