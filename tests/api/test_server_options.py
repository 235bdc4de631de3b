"""A live server configured only through SPECD_* variables: HTTP answers while the model loads
(/ready 503 `loading`), several API keys, CORS for a browser UI's origin, JSON log lines that
carry the client's X-Request-Id."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.live_server import LiveServer, run_server

KEYS = ("sk-first-key", "sk-second-key")
UI_ORIGIN = "http://chat-ui.example"
# Long enough that the checks of the loading phase always run inside it.
LOAD_DELAY_S = 4.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loading_server(
    tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """Yielded as soon as HTTP is up, while the model still loads."""
    log = tmp_path_factory.mktemp("logs") / "env_server.log"
    env = {
        "SPECD_API_KEY": ",".join(KEYS),
        "SPECD_LOG_FORMAT": "json",
        "SPECD_ALLOWED_ORIGINS": UI_ORIGIN,
        "SPECD_INJECT_FAULTS": json.dumps({"load_delay_s": LOAD_DELAY_S}),
    }
    with run_server(tiny_model_dir, log, env=env, wait_ready=False) as live:
        live.log_path = log  # type: ignore[attr-defined]
        yield live


def test_loading_then_ready(loading_server: LiveServer) -> None:
    """Runs first in this module: the model is still loading when it starts."""
    base = loading_server.base_url
    assert httpx.get(f"{base}/health").status_code == 200  # alive: a liveness probe must pass
    ready = httpx.get(f"{base}/ready")
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "loading"
    body = {"model": "any", "prompt": "hi", "max_tokens": 2}
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    refused = httpx.post(f"{base}/v1/completions", json=body, headers=headers)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "loading"
    assert int(refused.headers["retry-after"]) > 0
    assert httpx.get(f"{base}/metrics").status_code == 200  # Prometheus sees it up
    deadline = time.monotonic() + 120
    while httpx.get(f"{base}/ready").status_code != 200:
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.2)
    models = httpx.get(f"{base}/v1/models", headers=headers)
    assert models.status_code == 200


def test_every_key_opens_v1_and_probes_stay_open(loading_server: LiveServer) -> None:
    base = loading_server.base_url
    for key in KEYS:
        r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, key
    for wrong in ("sk-first-ke", "sk-first-key0", KEYS[0] + "," + KEYS[1], "sk"):
        r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {wrong}"})
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/health", "/ready", "/metrics", "/version"):
        assert httpx.get(f"{base}{path}").status_code == 200, path


def test_cors_for_the_allowed_origin_only(loading_server: LiveServer) -> None:
    base = loading_server.base_url
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    # A browser's preflight carries no API key; it is answered before auth.
    ok = httpx.options(f"{base}/v1/chat/completions", headers={"Origin": UI_ORIGIN, **preflight})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == UI_ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = httpx.options(
        f"{base}/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight}
    )
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    # The real request: the browser may read the answer and its X-Request-Id, errors included.
    for key in (KEYS[1], "wrong"):
        r = httpx.get(
            f"{base}/v1/models",
            headers={"Origin": UI_ORIGIN, "Authorization": f"Bearer {key}", "X-Request-Id": "r1"},
        )
        assert r.headers["access-control-allow-origin"] == UI_ORIGIN
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


def test_no_cors_headers_without_allowed_origins(server: LiveServer) -> None:
    r = httpx.options(
        f"{server.base_url}/v1/models",
        headers={"Origin": UI_ORIGIN, "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{server.base_url}/v1/models", headers={"Origin": UI_ORIGIN})
    assert "access-control-allow-origin" not in r.headers


def test_json_logs_carry_the_request_id(loading_server: LiveServer) -> None:
    base = loading_server.base_url
    body = {"model": loading_server_model(loading_server), "prompt": "hello", "max_tokens": 3}
    headers = {"Authorization": f"Bearer {KEYS[0]}", "X-Request-Id": "trace-4711"}
    assert httpx.post(f"{base}/v1/completions", json=body, headers=headers).status_code == 200
    log_path: Path = loading_server.log_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while b"trace-4711" not in log_path.read_bytes():
        assert time.monotonic() < deadline, "the request was never logged"
        time.sleep(0.1)
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line: the API's and the engine's
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    loggers = {e["logger"] for e in entries}
    assert "uvicorn.error" in loggers  # uvicorn's own lines are JSON too
    assert any(
        name.startswith("server.engine") or name.startswith("server.model") for name in loggers
    )
    tagged = [e for e in entries if e.get("request_id") == "trace-4711"]
    assert tagged and "trace-4711" in tagged[0]["message"]


def loading_server_model(live: LiveServer) -> str:
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    return httpx.get(f"{live.base_url}/v1/models", headers=headers).json()["data"][0]["id"]
