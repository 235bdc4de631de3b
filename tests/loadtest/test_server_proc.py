"""The servers the load tools start get the user's environment, not the tool's own.

Importing `server` (which every load tool does) sets OMP_WAIT_POLICY=PASSIVE in the tool's
process. A peer built on OpenMP that inherited it ran slower (llama-server 3.1x: mean TPOT 32.1
against 10.2 ms, loadtest/PEERS.md), so the sweeps compared specd with crippled peers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.launch_env import LAUNCH_ENV
from loadtest.server_proc import ServerProcess, free_port


def test_importing_loadtest_keeps_the_launch_environment_without_the_omp_policy() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY",)}
    code = (
        "import os, loadtest\n"
        "from loadtest.launch_env import LAUNCH_ENV\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), LAUNCH_ENV.get('OMP_WAIT_POLICY'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["PASSIVE", "None"]


def test_a_started_server_sees_the_launch_environment_and_its_own_env_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Set after loadtest was imported: in the tool's environment, not the user's.
    monkeypatch.setenv("OMP_WAIT_POLICY", "TOOL_ONLY")
    monkeypatch.setitem(LAUNCH_ENV, "SPECD_TEST_FROM_USER", "user-value")
    (tmp_path / "health").write_text("ok")
    port = free_port()
    dump = tmp_path / "env.txt"
    # A real process: dumps its environment, then serves tmp_path (GET /health -> 200).
    argv = [
        "sh",
        "-c",
        f'env > "{dump}"; exec "{sys.executable}" -m http.server {port} '
        f'--bind 127.0.0.1 --directory "{tmp_path}"',
    ]
    with ServerProcess(argv, port, tmp_path / "server.log", 30, env={"PEER_FLAG": "1"}):
        seen = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert seen.get("OMP_WAIT_POLICY") != "TOOL_ONLY"
    assert seen["SPECD_TEST_FROM_USER"] == "user-value"
    assert seen["PEER_FLAG"] == "1"
