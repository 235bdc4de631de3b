"""The provisioned Grafana dashboard (docker/grafana) against a live specd.

Every query parses with Prometheus' own parser (promtool), names only series a real server
exports after real traffic (speculation on, so the policy series are there), applies both
template variables, and reads the datasource the provisioning file creates.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from loadtest.prom import parse_text
from tests.api.live_server import LiveServer, run_server
from tests.api.test_speculation_server import PROMPTS
from tests.deploy.tools import DOCKER_DIR, require_tool

pytestmark = pytest.mark.slow  # the scrape test runs a live server

GRAFANA_DIR = DOCKER_DIR / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "specd.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "specd.yaml"
DATASOURCE_UID = "prometheus"
FILTER_VARIABLES = ("model_name", "instance")

# What Grafana would put in place of each variable: any duration parses, and ".*" keeps the
# label filters valid regexes.
PARSE_VALUES = {
    "__rate_interval": "5m",
    "__interval": "5m",
    "__range": "5m",
    "model_name": ".*",
    "instance": ".*",
}
# The same, but values no hand-written query would hold, so the parsed AST shows where each
# variable landed (which selectors filter on it, which ranges are $__rate_interval).
RATE_SENTINEL = timedelta(seconds=7777)
SENTINEL_VALUES = {
    **PARSE_VALUES,
    "__rate_interval": f"{int(RATE_SENTINEL.total_seconds())}s",
    **{v: f"VAR_{v}" for v in FILTER_VARIABLES},
}

# Families the dashboard must show at least once (any one name of each tuple).
COVERED = (
    ("specd:time_to_first_token_seconds_bucket",),
    ("specd:inter_token_latency_seconds_bucket",),
    ("specd:e2e_request_latency_seconds_bucket",),
    ("specd:generation_tokens_total",),
    ("specd:num_requests_running",),
    ("specd:num_requests_waiting",),
    ("specd:kv_cache_usage_perc",),
    ("specd:prefix_cache_hits_total",),
    ("specd:spec_decode_num_accepted_tokens_total",),
    ("specd:spec_decode_num_accepted_tokens_per_pos_total",),
    ("specd:spec_decode_budget_bucket", "specd:spec_decode_budget_sum"),
    ("specd:spec_decode_estimated_goodput_tokens_per_second",),
    ("specd:spec_decode_predicted_step_seconds_total",),
    ("specd:spec_decode_measured_step_seconds_total",),
    ("specd:requests_rejected_total",),
)

_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")  # $name, ${name}, ${name:format}
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),\s*)?(\w+)\s*\)\s*$", re.S)


# ------------------------------------------------------------------------- the dashboard


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels a collapsed row holds."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard["panels"]) if p.get("type") != "row"]


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target."""
    return [
        (f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"])
        for p in query_panels(dashboard)
        for t in p.get("targets", [])
    ]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for each query variable: the series selector inside label_values()."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var.get("type") != "query":
            continue
        query = var["query"]
        text = query["query"] if isinstance(query, dict) else query  # both schema forms
        # The UI shows `definition`; a stale one would hide what actually runs.
        assert var.get("definition", text) == text, f"variable {var['name']}: stale definition"
        m = _LABEL_VALUES.match(text)
        assert m and m.group(1), f"variable {var['name']}: not label_values(metric, label)"
        out.append((f"variable {var['name']}", m.group(1)))
    return out


def all_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return panel_queries(dashboard) + variable_queries(dashboard)


def substitute(expr: str, values: Mapping[str, str]) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(value, expr)


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    """Every series selector in the expression, matrix and subquery selectors included."""
    found: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return found


def metric_name(selector: promql_parser.VectorSelector) -> str:
    if selector.name:
        return str(selector.name)
    for m in selector.matchers.matchers:  # {__name__="..."} spells the name as a matcher
        if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal:
            return str(m.value)
    raise AssertionError(f"selector without a metric name: {selector}")


def metric_names(expr: str) -> set[str]:
    return {metric_name(s) for s in selectors(substitute(expr, PARSE_VALUES))}


def dashboard_metric_names() -> dict[str, set[str]]:
    """Metric name -> where the dashboard names it."""
    names: dict[str, set[str]] = {}
    for where, expr in all_queries(load_dashboard()):
        for name in metric_names(expr):
            names.setdefault(name, set()).add(where)
    return names


# ------------------------------------------------------------------------- static checks


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    """promtool is the reference parser: a query it rejects is one Prometheus rejects."""
    promtool = require_tool("promtool", "apt-get install prometheus")
    rules = [
        # The record name says where the query is, so promtool's message points at the panel.
        {
            "record": "dashboard:" + re.sub(r"\W+", "_", where),
            "expr": substitute(expr, PARSE_VALUES),
        }
        for where, expr in all_queries(load_dashboard())
    ]
    assert rules
    rules_file = tmp_path / "dashboard_rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"promtool check rules:\n{done.stdout}\n{done.stderr}"


def test_every_panel_query_applies_both_variables_and_the_rate_interval() -> None:
    """Each selector filters on $model_name and $instance (else picking one does nothing to
    that series), and every range is $__rate_interval (else rates break at long scrape
    intervals or zoomed-out views)."""
    problems = []
    for where, expr in panel_queries(load_dashboard()):
        parsed = substitute(expr, SENTINEL_VALUES)
        for selector in selectors(parsed):
            regexes = {
                (m.name, m.value)
                for m in selector.matchers.matchers
                if m.op == promql_parser.MatchOp.Re
            }
            for var in FILTER_VARIABLES:
                if (var, SENTINEL_VALUES[var]) not in regexes:
                    problems.append(f'{where}: {metric_name(selector)} lacks {var}=~"${var}"')

        def check_range(node: promql_parser.Expr, where: str = where) -> None:
            if isinstance(node, promql_parser.MatrixSelector) and node.range != RATE_SENTINEL:
                problems.append(f"{where}: range [{node.range}] is not $__rate_interval")

        promql_parser.walk(promql_parser.parse(parsed), pre_visit=check_range)
    assert not problems, "\n".join(problems)


def test_template_variables_select_several_or_all() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert set(FILTER_VARIABLES) <= variables.keys()
    for name in FILTER_VARIABLES:
        var = variables[name]
        # allValue ".*": "All" stays one short regex however many models or replicas there are.
        assert (var["multi"], var["includeAll"], var["allValue"]) == (True, True, ".*"), name


def test_dashboard_covers_the_key_families() -> None:
    named = dashboard_metric_names()
    missing = [alternatives for alternatives in COVERED if not set(alternatives) & named.keys()]
    assert not missing, f"the dashboard shows none of: {missing}"


def test_panels_use_the_provisioned_datasource_and_unique_ids() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "specd"
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    wrong = []
    for p in query_panels(dashboard):
        sources = [p.get("datasource")] + [t.get("datasource") for t in p.get("targets", [])]
        if not p.get("description"):
            wrong.append(f"panel {p['id']} {p['title']!r}: no description")
        if not p.get("targets"):
            wrong.append(f"panel {p['id']} {p['title']!r}: no queries")
        # A target without its own datasource uses the panel's; the panel's is required.
        if not isinstance(sources[0], dict) or any(
            s is not None and s.get("uid") != DATASOURCE_UID for s in sources
        ):
            wrong.append(f"panel {p['id']} {p['title']!r}: datasource {sources}")
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query" and var.get("datasource", {}).get("uid") != DATASOURCE_UID:
            wrong.append(f"variable {var['name']}: datasource {var.get('datasource')}")
    assert not wrong, "\n".join(wrong)


def test_provisioning_files_create_that_datasource_and_load_the_dashboard() -> None:
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    by_uid = {s["uid"]: s for s in sources}
    prometheus = by_uid[DATASOURCE_UID]
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"  # the compose service
    assert prometheus["isDefault"] is True
    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert [(p["type"], p["options"]["path"]) for p in providers] == [
        ("file", "/var/lib/grafana/dashboards")  # where compose mounts docker/grafana/dashboards
    ]


# ------------------------------------------------------------------------- the live scrape

# PROMPTS (from the speculation server's tests) repeat themselves, so the ngram drafter has
# matches to propose (the random model's own continuation rarely agrees, which the acceptance
# counters then show).


@pytest.fixture(scope="module")
def spec_server(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    # The goodput policy exports every policy series; a 1 s cost profile (default 5 s) is
    # enough to seed its cost model and keeps start-up short.
    spec = {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "policy": "goodput",
        "cost_profile_seconds": 1.0,
    }
    log = tmp_path_factory.mktemp("logs") / "dashboard_server.log"
    args = ["--num-kv-blocks", "256", "--speculative-config", json.dumps(spec)]
    with run_server(str(tiny_llama_dir), log, extra_args=args) as live:
        yield live


@pytest.fixture(scope="module")
def exported_names(spec_server: LiveServer) -> set[str]:
    """Sample names (labels stripped) on /metrics after plain, streamed and chat requests."""
    with spec_server.http() as http:
        for prompt in PROMPTS:
            body = {"model": spec_server.model, "prompt": prompt, "max_tokens": 32}
            body |= {"temperature": 0, "ignore_eos": True}
            assert http.post("/v1/completions", json=body).status_code == 200
            assert http.post("/v1/completions", json={**body, "stream": True}).status_code == 200
        chat = {
            "model": spec_server.model,
            "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": 16,
            "stream": True,
        }
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
        samples = parse_text(http.get("/metrics").text)
    # The policy chose budgets for real request-steps, so its series are live, not just
    # declared. (Not that it drafted: against a random model it soon learns drafts fail.)
    budgets = [v for k, v in samples.items() if k.startswith("specd:spec_decode_budget_count")]
    assert sum(budgets) > 0, "the speculation policy chose no budgets"
    return {key.split("{", 1)[0] for key in samples}


def test_every_query_names_an_exported_metric(exported_names: set[str]) -> None:
    named = dashboard_metric_names()
    missing = {name: sorted(where) for name, where in named.items() if name not in exported_names}
    assert not missing, "metrics a live specd does not export:\n" + "\n".join(
        f"  {name}: {', '.join(where)}" for name, where in sorted(missing.items())
    )
