"""`specd serve --speculative-config ...` against the same model served without speculation.

Greedy outputs must be identical, streamed or not, with stop strings cut in the same place;
usage carries the speculation extension; /metrics exports the spec-decode counters; the
per-request `speculation.max_tokens: 0` turns it off for that request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import openai
import pytest

from tests.api.live_server import LiveServer, run_server

PROMPTS = [
    "one two three four five one two three four five one two three",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "Hello, world! How are you today?",
]


@pytest.fixture(scope="module")
def spec_server(
    tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("logs") / "spec_server.log"
    spec = json.dumps(
        {"method": "tree", "num_speculative_tokens": 6, "max_tree_width": 3, "policy": "fixed"}
    )
    args = ["--num-kv-blocks", "512", "--speculative-config", spec]
    with run_server(tiny_model_dir, log, extra_args=args) as live:
        yield live


def completions(live: LiveServer, **kw: object) -> openai.types.Completion:
    c = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0)
    return c.completions.create(model=live.model, **kw)  # type: ignore[call-overload, no-any-return]


def spec_counters(live: LiveServer) -> dict[str, float]:
    with live.http() as http:
        text = http.get("/metrics").text
    out = {}
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        m = re.search(rf"^specd:spec_decode_{name}_total\{{[^}}]*\}} (\S+)$", text, re.M)
        assert m, f"specd:spec_decode_{name}_total missing from /metrics"
        out[name] = float(m.group(1))
    return out


def test_greedy_text_is_identical_and_usage_reports_acceptance(
    server: LiveServer, spec_server: LiveServer
) -> None:
    kw = dict(prompt=PROMPTS, max_tokens=32, temperature=0, extra_body={"ignore_eos": True})
    plain = completions(server, **kw)
    spec = completions(spec_server, **kw)
    assert [c.text for c in spec.choices] == [c.text for c in plain.choices]
    assert spec.usage.completion_tokens == plain.usage.completion_tokens
    extension = spec.usage.model_extra.get("speculation")
    assert extension and extension["draft_tokens"] > 0
    assert 0 <= extension["accepted_tokens"] <= extension["draft_tokens"]
    counters = spec_counters(spec_server)
    assert counters["num_draft_tokens"] >= extension["draft_tokens"]
    assert counters["num_accepted_tokens"] > 0


@pytest.mark.parametrize("stop", [" three", "fox", "\n\n", "b"])
def test_streamed_stop_strings_cut_where_plain_decoding_does(
    server: LiveServer, spec_server: LiveServer, stop: str
) -> None:
    def streamed(live: LiveServer, prompt: str) -> tuple[str, str | None]:
        c = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0)
        text, finish = "", None
        stream = c.completions.create(
            model=live.model, prompt=prompt, max_tokens=40, temperature=0, stop=[stop],
            stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return text, finish

    for prompt in PROMPTS:
        assert streamed(spec_server, prompt) == streamed(server, prompt)


def test_per_request_opt_out(spec_server: LiveServer) -> None:
    before = spec_counters(spec_server)["num_draft_tokens"]
    out = completions(
        spec_server, prompt=PROMPTS[0], max_tokens=16, temperature=0,
        extra_body={"ignore_eos": True, "speculation": {"max_tokens": 0}},
    )  # fmt: skip
    assert out.usage.model_extra.get("speculation") is None
    assert spec_counters(spec_server)["num_draft_tokens"] == before


@pytest.fixture(scope="module")
def goodput_server(
    tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """No "policy" given: the goodput policy is the default whenever speculation is on."""
    log = tmp_path_factory.mktemp("logs") / "goodput_server.log"
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 8})
    args = ["--num-kv-blocks", "512", "--speculative-config", spec]
    with run_server(tiny_model_dir, log, extra_args=args) as live:
        yield live


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$", text, re.M)
    assert m, f"{name}{{{labels}}} missing from /metrics"
    return float(m.group(1))


def test_goodput_policy_is_the_default_and_exports_its_metrics(
    server: LiveServer, goodput_server: LiveServer
) -> None:
    kw = dict(prompt=PROMPTS, max_tokens=32, temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in completions(goodput_server, **kw).choices] == [
        c.text for c in completions(server, **kw).choices
    ]
    with goodput_server.http() as http:
        text = http.get("/metrics").text
    assert metric(text, "specd:spec_decode_policy_info", 'policy="goodput"') == 1.0
    steps = metric(text, "specd:spec_decode_policy_steps_total")
    assert steps > 0
    predicted = metric(text, "specd:spec_decode_predicted_step_seconds_total")
    measured = metric(text, "specd:spec_decode_measured_step_seconds_total")
    assert predicted > 0 and measured > 0
    # Every decoding (request, step) pair lands in the budget histogram, 0 included.
    count = metric(text, "specd:spec_decode_budget_count")
    assert count > 0
    assert metric(text, "specd:spec_decode_budget_bucket", 'le="+Inf"') == count
    assert metric(text, "specd:spec_decode_budget_bucket", 'le="8"') == count
    assert metric(text, "specd:spec_decode_budget_sum") <= 8 * count
    assert metric(text, "specd:spec_decode_cost_model_coefficient", 'feature="intercept"') != 0
    assert metric(text, "specd:spec_decode_estimated_goodput_tokens_per_second") > 0
    assert metric(text, "specd:spec_decode_estimated_acceptance", 'position="0"') > 0


@pytest.fixture(scope="module")
def auto_server(
    tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """Speculation asked for without naming a method: the composite "auto" drafter."""
    log = tmp_path_factory.mktemp("logs") / "auto_server.log"
    # policy fixed: the goodput policy may rightly decline every draft on a tiny model.
    spec = json.dumps({"num_speculative_tokens": 6, "suffix_cache_mb": 1, "policy": "fixed"})
    args = ["--num-kv-blocks", "512", "--speculative-config", spec]
    with run_server(tiny_model_dir, log, extra_args=args) as live:
        yield live


def test_auto_drafter_is_the_default_method_and_reports_its_memory(
    server: LiveServer, auto_server: LiveServer
) -> None:
    kw = dict(prompt=PROMPTS, max_tokens=32, temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in completions(auto_server, **kw).choices] == [
        c.text for c in completions(server, **kw).choices
    ]
    with auto_server.http() as http:
        text = http.get("/metrics").text
    assert metric(text, "specd:spec_decode_num_accepted_tokens_total") > 0
    # The finished requests went into the suffix cache, which stays under its 1 MiB cap.
    held = metric(text, "specd:spec_decode_drafter_memory_bytes", 'part="suffix_cache"')
    limit = metric(text, "specd:spec_decode_drafter_memory_limit_bytes", 'part="suffix_cache"')
    assert 0 < held <= limit == 2**20
    assert metric(text, "specd:spec_decode_drafter_memory_bytes", 'part="recycle_tables"') > 0
