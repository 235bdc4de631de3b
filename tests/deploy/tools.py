"""The real deployment tools the config checks run (nginx, promtool, docker-compose, hadolint,
kubernetes-validate). `make setup` installs them (docker/install-tools.sh); a test skips with
the reason only where a tool could not be installed on this machine."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"


def require_tool(name: str, how: str) -> str:
    """The tool's path, looked up beside this Python first (pip-installed tools land there),
    then on PATH; skips the test, saying how to install it, where it is missing."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    # nginx lives in /usr/sbin, which a non-root PATH often lacks.
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.skip(f"{name} is not installed ({how}; `make setup` installs it where it can)")
    return found
