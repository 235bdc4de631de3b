"""A real `specd serve` subprocess on a free 127.0.0.1 port, for the API tests.

No stand-in engine anywhere: every API test talks HTTP to the daemon a user would run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
# Small enough that "prompt too long" is cheap to provoke, big enough for every test prompt.
TEST_MAX_MODEL_LEN = 256


@dataclass
class LiveServer:
    base_url: str  # http://127.0.0.1:PORT
    model: str  # the served model name (what clients send as "model")
    max_model_len: int
    api_key: str | None = None
    # The `specd serve` process (None for a server started elsewhere, SPECD_TEST_URL).
    proc: subprocess.Popen[bytes] | None = None

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def http(self, **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_server(
    model: str,
    log_path: Path,
    extra_args: Sequence[str] = (),
    api_key: str | None = None,
    startup_timeout_s: float = 300,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> Iterator[LiveServer]:
    """Starts `python -m server.cli serve`, waits for /ready, yields, then stops it (SIGINT).
    With ``wait_ready`` False it yields as soon as HTTP is up (/health), the model still
    loading: then `model` and `max_model_len` are not known yet (empty, 0)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "server.cli", "serve",
        "--model", model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(TEST_MAX_MODEL_LEN),
        *(["--api-key", api_key] if api_key else []),
        *extra_args,
    ]  # fmt: skip
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready:
            _wait_healthy(proc, base_url, log_path, startup_timeout_s, path="/health")
            yield LiveServer(base_url, "", 0, api_key, proc)
            return
        _wait_healthy(proc, base_url, log_path, startup_timeout_s)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        card = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10).json()["data"][0]
        yield LiveServer(base_url, card["id"], card["max_model_len"], api_key, proc)
    finally:
        _stop(proc)


def _wait_healthy(
    proc: subprocess.Popen[bytes], base_url: str, log: Path, timeout: float, path: str = "/ready"
) -> None:
    """Polls ``path`` until 200: /ready by default, not /health, which is 200 as soon as HTTP
    is up, while the model still loads."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"specd serve exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}{path}", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    _stop(proc)
    raise RuntimeError(f"specd serve not ready after {timeout:.0f} s:\n{_tail(log)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # graceful: uvicorn drains, then the engine shuts down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_bytes()[-n:].decode(errors="replace")
