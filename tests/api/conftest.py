"""Live-server fixtures: a tiny random Llama (fast) and the embedded SmolLM2 (slow).

Set SPECD_TEST_URL=http://host:port to run the tiny-model tests against a server that is
already running (a docker replica, say) instead of starting one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.live_server import LiveServer, run_server


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_llama_dir: Path) -> str:
    """The suite's tiny Llama (tests/conftest.py), as the path string `--model` takes."""
    return str(tiny_llama_dir)


@pytest.fixture(scope="session")
def server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    url = os.environ.get("SPECD_TEST_URL")
    if url:
        card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        yield LiveServer(url.rstrip("/"), card["id"], card["max_model_len"])
        return
    log = tmp_path_factory.mktemp("logs") / "tiny_server.log"
    # 512 blocks x 16 tokens: room for every concurrent test request, small enough that a
    # leaked request shows in the KV usage gauge.
    with run_server(tiny_model_dir, log, extra_args=["--num-kv-blocks", "512"]) as live:
        yield live


@pytest.fixture(scope="session")
def smol_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("logs") / "smol_server.log"
    with run_server("smollm2-135m-instruct", log, startup_timeout_s=600) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key or "unused", max_retries=0)


@pytest.fixture
def aclient(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key=server.api_key or "unused", max_retries=0)


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c
