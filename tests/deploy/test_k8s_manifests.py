"""docker/k8s: every object passes kubernetes-validate's strict schemas for a pinned Kubernetes
version, and the objects hold together as a deployment of specd: drain timing, probes, ports,
selectors, the GPU, the security context, the metric behind the HPA, and SPECD_* variables
that name real `specd serve` flags with values those flags accept."""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
from typing import Any

import pytest
import yaml

from server.cli import build_parser
from server.engine.scheduler import SchedulerStats
from server.metrics import build_registry, render
from tests.deploy.tools import DOCKER_DIR, require_tool

K8S_DIR = DOCKER_DIR / "k8s"
# The oldest Kubernetes the manifests are meant for (README.md); kubernetes-validate ships the
# schemas, so the result does not depend on the newest version the installed tool knows.
K8S_VERSION = "1.31.0"
# Kinds with no built-in schema (a CRD, and kustomize's own file): checked structurally here.
NO_SCHEMA_KINDS = frozenset({"ServiceMonitor", "Kustomization"})
# Files that are not applied by the kustomization, each with the reason in its header.
NOT_APPLIED = frozenset({"kustomization.yaml", "prometheus-adapter-rules.yaml"})
CONTAINER_PORT = 8000
IMAGE_UID = 10001  # the non-root user the Docker image runs as

Doc = dict[str, Any]


@functools.cache
def _docs() -> tuple[tuple[str, Doc], ...]:
    """(file name, object) for every YAML document in docker/k8s."""
    return tuple(
        (path.name, doc)
        for path in sorted(K8S_DIR.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    )


def _one(kind: str) -> Doc:
    found = [doc for _, doc in _docs() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {K8S_DIR}, found {len(found)}"
    return found[0]


def _pod_spec() -> Doc:
    return _one("Deployment")["spec"]["template"]["spec"]


def _pod_labels() -> dict[str, str]:
    return _one("Deployment")["spec"]["template"]["metadata"]["labels"]


def _container() -> Doc:
    (container,) = _pod_spec()["containers"]
    return container


def _env() -> dict[str, Doc]:
    return {var["name"]: var for var in _container().get("env", [])}


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only: these manifests use no expressions) or a
    Service's plain selector matches `labels`."""
    match = selector.get("matchLabels", selector)
    assert "matchExpressions" not in selector, "extend _selects for matchExpressions"
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def _container_port(port: int | str) -> int:
    """A probe's or Service's target port, by number or by the container port's name."""
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    if isinstance(port, int):
        assert port in ports.values(), f"port {port} is not a container port"
        return port
    assert port in ports, f"no container port named {port!r}"
    return ports[port]


def _seconds(duration: str) -> float:
    """A Prometheus duration such as 15s or 1m30s."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(int(n) * units[u] for n, u in parts)


def test_every_core_object_passes_kubernetes_validate_strict() -> None:
    tool = require_tool("kubernetes-validate", "pip install kubernetes-validate")
    files = sorted(str(p) for p in K8S_DIR.glob("*.yaml"))
    proc = subprocess.run(
        [tool, "--strict", "-k", K8S_VERSION, *files], capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # The tool only warns, exit 0, for a kind it has no schema for. So each object with a
    # schema must be seen passing, or a mistyped apiVersion would skip validation unnoticed.
    passed = re.findall(r"^INFO \S+ passed for resource (\S+) against version (\S+)$", out, re.M)
    with_schema = [doc for _, doc in _docs() if doc["kind"] not in NO_SCHEMA_KINDS]
    expected = sorted(f"{d['kind'].lower()}/{d['metadata']['name']}" for d in with_schema)
    assert sorted(name for name, _ in passed) == expected, out
    assert {version for _, version in passed} == {K8S_VERSION.rsplit(".", 1)[0]}, out
    skipped = re.findall(r"^WARN \S+ Couldn't find schema for kind (\S+) ", out, re.M)
    assert sorted(skipped) == sorted(d["kind"] for _, d in _docs() if d["kind"] in NO_SCHEMA_KINDS)
    assert not re.search(r"^(ERROR|FATAL)", out, re.M), out


# The ServiceMonitor fields (of the Prometheus operator's CRD) these manifests may use. Outside
# a schema, a misspelt field would otherwise go unnoticed until the API server rejects it.
_SERVICEMONITOR_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
_SERVICEMONITOR_ENDPOINT = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
}


def test_servicemonitor_is_well_formed_and_scrapes_the_service() -> None:
    monitor = _one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["name"]
    spec = monitor["spec"]
    assert set(spec) <= _SERVICEMONITOR_SPEC, set(spec) - _SERVICEMONITOR_SPEC
    service = _one("Service")
    assert _selects(spec["selector"], service["metadata"]["labels"])
    port_names = {port["name"] for port in service["spec"]["ports"]}
    (endpoint,) = spec["endpoints"]
    assert set(endpoint) <= _SERVICEMONITOR_ENDPOINT, set(endpoint) - _SERVICEMONITOR_ENDPOINT
    assert endpoint["port"] in port_names
    assert endpoint["path"] == "/metrics"
    assert _seconds(endpoint["interval"]) == 15
    # Prometheus refuses a scrape timeout longer than the interval.
    assert _seconds(endpoint.get("scrapeTimeout", "10s")) <= _seconds(endpoint["interval"])


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _one("Kustomization")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    applied = {p.name for p in K8S_DIR.glob("*.yaml")} - NOT_APPLIED
    assert sorted(kustomization["resources"]) == sorted(applied)


def test_kustomize_builds_every_listed_object() -> None:
    kubectl = require_tool("kubectl", "https://kubernetes.io/docs/tasks/tools/")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    built = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(proc.stdout))
    listed = _one("Kustomization")["resources"]
    expected = sorted((d["kind"], d["metadata"]["name"]) for f, d in _docs() if f in listed)
    assert built == expected


def _prestop_seconds(container: Doc) -> float:
    handler = container["lifecycle"]["preStop"]
    if "sleep" in handler:  # the built-in action (Kubernetes 1.30+)
        return float(handler["sleep"]["seconds"])
    command = handler["exec"]["command"]
    assert len(command) == 2 and command[0] == "sleep", f"preStop is not a plain sleep: {command}"
    return float(command[1])


def test_grace_period_outlasts_prestop_and_drain() -> None:
    # The grace period counts from deletion, preStop included; at its end comes SIGKILL. Any
    # shorter than preStop + the drain, and requests still in flight are cut off.
    grace = _pod_spec()["terminationGracePeriodSeconds"]
    prestop = _prestop_seconds(_container())
    drain = float(_env()["SPECD_SHUTDOWN_TIMEOUT"]["value"])
    assert prestop > 0, "without preStop, SIGTERM races the endpoint removal"
    assert grace > prestop + drain, f"grace {grace}s <= preStop {prestop}s + drain {drain}s"


@pytest.mark.parametrize(
    ("probe", "path"),
    [("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")],
)
def test_probe_asks_the_right_endpoint(probe: str, path: str) -> None:
    get = _container()[probe]["httpGet"]
    assert get["path"] == path
    assert _container_port(get["port"]) == CONTAINER_PORT


def test_probes_and_rollout_allow_a_slow_model_load() -> None:
    container = _container()
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 600, f"the startup probe gives up after {budget}s"
    deployment = _one("Deployment")["spec"]
    # Otherwise a rollout still loading its model is reported failed.
    assert deployment["progressDeadlineSeconds"] > budget
    # No old replica stops before its replacement is ready.
    assert deployment["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    # /ready must turn a balancer away well within the drain, or it only ever sees 503s.
    ready = container["readinessProbe"]
    noticed = ready["periodSeconds"] * ready["failureThreshold"]
    assert noticed < float(_env()["SPECD_SHUTDOWN_TIMEOUT"]["value"])


def test_service_routes_to_the_pods() -> None:
    labels = _pod_labels()
    assert _selects(_one("Deployment")["spec"]["selector"], labels)
    service = _one("Service")
    assert _selects(service["spec"]["selector"], labels)
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http"  # the name servicemonitor.yaml scrapes
    assert port["port"] == CONTAINER_PORT
    assert _container_port(port["targetPort"]) == CONTAINER_PORT


def test_pdb_and_hpa_target_the_deployment() -> None:
    deployment = _one("Deployment")
    pdb = _one("PodDisruptionBudget")["spec"]
    assert _selects(pdb["selector"], _pod_labels())
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    # A node drain must be able to evict a replica even at the HPA's minimum.
    assert pdb.get("maxUnavailable", 0) >= 1 or pdb["minAvailable"] < hpa["minReplicas"]


def test_hpa_metric_is_served_by_the_adapter_rule_from_a_real_server_metric() -> None:
    (metric,) = _one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    rules = yaml.safe_load(_one("ConfigMap")["data"]["config.yaml"])["rules"]
    matching = [r for r in rules if r["name"]["as"] == name]
    assert len(matching) == 1, f"prometheus-adapter-rules.yaml serves no {name!r} (or twice)"
    rule = matching[0]
    series = rule["seriesQuery"].split("{")[0]
    assert re.fullmatch(rule["name"]["matches"], series)
    # A Pods metric is looked up per pod and namespace: the rule must map both labels.
    overrides = rule["resources"]["overrides"]
    assert overrides["pod"] == {"resource": "pod"}
    assert overrides["namespace"] == {"resource": "namespace"}
    # The series the rule selects is one the server exports.
    exported = render(build_registry("m", SchedulerStats)).decode()
    assert re.search(rf'^{re.escape(series)}{{model_name="m"}} ', exported, re.M), series


def test_gpu_is_requested_and_the_container_runs_as_the_image_user() -> None:
    resources = _container()["resources"]
    # Extended resources are granted by their limit; a request, if given, must equal it.
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == resources["limits"]["nvidia.com/gpu"]
    # Container settings override the pod's.
    security = {**_pod_spec().get("securityContext", {}), **_container()["securityContext"]}
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == IMAGE_UID
    assert security["allowPrivilegeEscalation"] is False


def test_every_written_path_is_a_writable_volume() -> None:
    container = _container()
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert all(m["name"] in volumes for m in mounts.values())
    writable = [path for path, m in mounts.items() if not m.get("readOnly")]
    env = _env()
    if container["securityContext"].get("readOnlyRootFilesystem"):
        for path in ["/tmp", env["HOME"]["value"], env["HF_HOME"]["value"]]:
            assert any(path == w or path.startswith(w + "/") for w in writable), path
    models = mounts["/models"]
    assert models["readOnly"] is True
    assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == "specd-models"
    assert env["SPECD_MODEL"]["value"].startswith("/models/")
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"


def _serve_flags() -> dict[str, argparse.Action]:
    """SPECD_* variable name -> `specd serve` flag (`--foo-bar` <-> SPECD_FOO_BAR)."""
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    flags: dict[str, argparse.Action] = {}
    for action in subparsers.choices["serve"]._actions:
        longs = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
        if longs:  # the first: --enable-x, not its --no-enable-x
            flags["SPECD_" + longs[0][2:].replace("-", "_").upper()] = action
    return flags


def test_specd_variables_name_real_flags_with_values_they_accept() -> None:
    flags = _serve_flags()
    specd_vars = {name: var for name, var in _env().items() if name.startswith("SPECD_")}
    assert set(specd_vars) <= set(flags), f"not `specd serve` flags: {set(specd_vars) - set(flags)}"
    for name, var in specd_vars.items():
        if "value" not in var:  # from a Secret: only known at run time
            continue
        option = flags[name].option_strings[0]
        try:
            build_parser().parse_args(["serve", option, var["value"]])
        except SystemExit:
            pytest.fail(f"{name}={var['value']!r} is refused by {option}")


def test_service_links_cannot_shadow_flags() -> None:
    # With service links on, Kubernetes sets <SERVICE>_PORT=tcp://10.x.y.z:8000 and friends in
    # each pod for every Service in the namespace. For the Service `specd` that is SPECD_PORT,
    # which specd reads as --port: the server would refuse to start.
    injected = set()
    for _, doc in _docs():
        if doc["kind"] == "Service":
            prefix = doc["metadata"]["name"].upper().replace("-", "_")
            injected |= {f"{prefix}_PORT", f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT"}
    if injected & set(_serve_flags()):
        assert _pod_spec().get("enableServiceLinks") is False, injected & set(_serve_flags())
