"""Load balancing on loopback: the repository's own nginx config (docker/nginx/specd.conf), run
by a real nginx as an unprivileged process, in front of two live specd replicas.

- Requests, SSE streams included, spread over both replicas, as each replica's /metrics shows.
- One replica drains (SIGTERM) while streams run on it and traffic keeps coming, then exits 0;
  traffic goes on through the other with no failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.prom import delta, parse_text
from loadtest.sse import DONE, sse_lines
from tests.api.live_server import LiveServer, free_port, run_server
from tests.deploy.tools import DOCKER_DIR, require_tool

pytestmark = pytest.mark.slow

SUCCESS = "specd:request_success_total"


def local_config(snippet: str, upstream_ports: tuple[int, int], listen_port: int) -> str:
    """The compose file's nginx snippet with its replicas and listener moved to loopback."""
    out = snippet
    for i, port in enumerate(upstream_ports, start=1):
        # Directive lines only (^ with re.M), not the comments that name them.
        out, n = re.subn(
            rf"^(\s*)server specd-{i}:8000\b", rf"\g<1>server 127.0.0.1:{port}", out, flags=re.M
        )
        assert n == 1, f"docker/nginx/specd.conf has no 'server specd-{i}:8000' line"
    out, n = re.subn(
        r"^(\s*)listen 8080;", rf"\g<1>listen 127.0.0.1:{listen_port};", out, flags=re.M
    )
    assert n == 1, "docker/nginx/specd.conf has no 'listen 8080;' line"
    return out


def main_config(workdir: Path, http_snippet: Path) -> str:
    """What the nginx image's nginx.conf gives the snippet: a main and an http context, with
    every path a process without root can write in ``workdir``."""
    return f"""
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    include {http_snippet};
}}
"""


@contextlib.contextmanager
def run_nginx(upstream_ports: tuple[int, int]) -> Iterator[tuple[str, Path]]:
    """Real nginx on a free loopback port; yields (base URL, its access log)."""
    nginx = require_tool("nginx", "apt-get install nginx-light")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="specd-nginx-"))
    snippet = (DOCKER_DIR / "nginx" / "specd.conf").read_text()
    local = local_config(snippet, upstream_ports, port)
    access_log = workdir / "access.log"
    local = local.replace("access_log /dev/stdout", f"access_log {access_log}")
    (workdir / "specd.conf").write_text(local)
    (workdir / "nginx.conf").write_text(main_config(workdir, workdir / "specd.conf"))
    cmd = [nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf")]
    if os.geteuid() == 0:
        # As root (CI), drop to nobody: the balancer runs as an unprivileged process.
        os.chmod(workdir, 0o777)
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                log = (workdir / "error.log").read_text(errors="replace")
                raise RuntimeError(f"nginx exited with {proc.returncode}:\n{log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/nginx-health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.1)
        yield base, access_log
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def replicas(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, LiveServer]]:
    logs = tmp_path_factory.mktemp("lb-logs")
    # Two sequences at a time: the drain test's streams are still running at SIGTERM.
    args = ["--max-num-seqs", "2", "--shutdown-timeout", "120", "--no-cpu-linear-plan"]
    with (
        run_server(str(tiny_llama_dir), logs / "replica-1.log", extra_args=args) as one,
        run_server(str(tiny_llama_dir), logs / "replica-2.log", extra_args=args) as two,
    ):
        yield one, two


def scrape(server: LiveServer) -> dict[str, float]:
    return parse_text(httpx.get(f"{server.base_url}/metrics", timeout=10).text)


def finished(before: dict[str, float], server: LiveServer) -> float:
    """Requests the replica finished since ``before`` (every finish reason)."""
    d = delta(before, scrape(server))
    return sum(v for k, v in d.items() if k.startswith(SUCCESS))


async def complete(client: httpx.AsyncClient, model: str, i: int) -> None:
    body = {"model": model, "prompt": f"plain {i}", "max_tokens": 4, "ignore_eos": True}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


async def stream(
    client: httpx.AsyncClient,
    model: str,
    i: int,
    max_tokens: int = 8,
    started: asyncio.Event | None = None,
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"stream {i}"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    last: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in sse_lines(r.aiter_text()):
            if line.startswith("data: "):
                last.append(line[6:])
                if started is not None:
                    started.set()
    assert last[-1] == DONE
    assert json.loads(last[-2])["choices"][0]["finish_reason"] == "length"


def test_requests_and_streams_spread_over_both_replicas(
    replicas: tuple[LiveServer, LiveServer],
) -> None:
    one, two = replicas
    with run_nginx((free_port_of(one), free_port_of(two))) as (base, access_log):
        before = scrape(one), scrape(two)

        async def run() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                jobs = [complete(client, one.model, i) for i in range(8)]
                jobs += [stream(client, one.model, i) for i in range(8)]
                await asyncio.gather(*jobs)

        asyncio.run(run())
        served = finished(before[0], one), finished(before[1], two)
        assert sum(served) == 16
        assert min(served) >= 2, f"least_conn should spread load, got {served}"
        # nginx's own log agrees on who served what.
        upstreams = [json.loads(line)["upstream"] for line in access_log.read_text().splitlines()]
        assert {u.split(":")[-1] for u in upstreams if u} == {
            str(free_port_of(one)),
            str(free_port_of(two)),
        }


def test_a_draining_replica_loses_no_request(replicas: tuple[LiveServer, LiveServer]) -> None:
    """Runs last: it stops replica one."""
    one, two = replicas
    assert one.proc is not None
    with run_nginx((free_port_of(one), free_port_of(two))) as (base, access_log):
        before_two = scrape(two)

        async def run() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                # Long streams, spread by least_conn, so some run on replica one at SIGTERM.
                starts = [asyncio.Event() for _ in range(4)]
                streams = [
                    asyncio.ensure_future(stream(client, one.model, i, 150, starts[i]))
                    for i in range(4)
                ]
                await asyncio.gather(*(s.wait() for s in starts))
                running = scrape(one)
                assert running["specd:num_requests_running"] > 0
                one.proc.send_signal(signal.SIGTERM)
                # Traffic goes on while it drains: its 503s are retried on replica two.
                for i in range(6):
                    await asyncio.gather(
                        complete(client, one.model, i), stream(client, one.model, i)
                    )
                await asyncio.gather(*streams)  # the streams on replica one finish too
                assert await asyncio.to_thread(one.proc.wait, 120) == 0
                # Replica one is gone: connection refused, retried on replica two.
                for i in range(6):
                    await asyncio.gather(
                        complete(client, one.model, i), stream(client, one.model, i)
                    )

        asyncio.run(run())
        assert finished(before_two, two) >= 24
        entries = [json.loads(line) for line in access_log.read_text().splitlines()]
        assert entries and {e["status"] for e in entries} == {200}
        # Some requests met replica one draining (503) or gone (502: refused) and nginx sent
        # them on to replica two: the client saw none of it.
        retried = [e for e in entries if "," in e["upstream_status"]]
        assert retried, "no request was retried: the drain was never met"
        assert all(e["upstream_status"].endswith("200") for e in retried)


def free_port_of(server: LiveServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])
