"""The environment as the user gave it, before importing `server` added OMP_WAIT_POLICY.

`loadtest/__init__.py` imports this module before `server`, so the snapshot is the user's. The
servers the load tools start (server_proc.ServerProcess) get it, not the tool's own
environment: a peer built on OpenMP inherited PASSIVE otherwise and ran crippled: one request
at a time, llama-server's mean TPOT was 32.1 ms against 10.2 ms with its default busy-waiting
threads (2 cores; command and vLLM's figures in loadtest/PEERS.md). specd's own servers set the
policy themselves.
"""

from __future__ import annotations

import os

LAUNCH_ENV: dict[str, str] = dict(os.environ)
