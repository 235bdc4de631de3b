"""Start `specd serve` (or any server command) on a free local port and wait until it is ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from loadtest.launch_env import LAUNCH_ENV


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_healthy(base_url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll until the server takes traffic: GET /ready 200 (specd: HTTP is up while the model
    loads, and /ready says when it is done), or /health 200 for a server with no /ready (404).
    Raises RuntimeError when the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    base = base_url.rstrip("/")
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            status = httpx.get(base + "/ready", timeout=2.0).status_code
            if status == 404:
                status = httpx.get(base + "/health", timeout=2.0).status_code
            if status == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} not ready after {timeout_s:.0f} s")


def specd_argv(serve_args: Sequence[str], port: int) -> list[str]:
    """`python -m server.cli serve <args> --host 127.0.0.1 --port <port>`."""
    base = [sys.executable, "-m", "server.cli", "serve"]
    return [*base, *serve_args, "--host", "127.0.0.1", "--port", str(port)]


def command_argv(command: Sequence[str], port: int) -> list[str]:
    """Any server's command line with {port} and {host} filled in (e.g. llama-server)."""
    return [str(c).format(port=port, host="127.0.0.1") for c in command]


class ServerProcess:
    """A local server process (argv from specd_argv or command_argv) as a context manager.

    stdout/stderr go to `log_path`. On exit the process group gets SIGINT, then SIGKILL after
    `stop_timeout_s` (the engine core runs in a child process of its own). The process gets the
    environment the tool was started with (`loadtest.launch_env`, without what importing
    `server` set) plus `env`.
    """

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        log_path: Path,
        startup_timeout_s: float = 300.0,
        stop_timeout_s: float = 20.0,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = {**LAUNCH_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.argv = list(argv)
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            start_new_session=True,
            env=self.env,
        )
        try:
            wait_healthy(self.base_url, self.startup_timeout_s, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        self._log.close()

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
