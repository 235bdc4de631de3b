"""The sweep driver without a server: when the start load average is read, and where results
go. (test_live runs the whole thing against a real specd.)"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import httpx
import pytest

from loadtest import report, sweep
from loadtest.cli import build_parser
from loadtest.metrics import result_json, summarize


def test_run_path_layout(tmp_path: Path) -> None:
    assert sweep.run_path(tmp_path, "k4", "mix", 0.5, False) == tmp_path / "runs/k4/rate-0.5.json"
    assert (
        sweep.run_path(tmp_path, "k4", "mix", math.inf, True)
        == tmp_path / "runs/k4/mix/rate-inf.json"
    )
    # With repeats every run has its own file.
    assert (
        sweep.run_path(tmp_path, "k4", "mix", 0.5, True, repeat=2, repeats=3)
        == tmp_path / "runs/k4/mix/rate-0.5-rep2.json"
    )


def test_interleaved_rounds_rotate_so_every_configuration_runs_first_in_turn() -> None:
    names = ["none", "k2", "goodput"]
    rounds = [sweep.run_order(names, 0, repeat, 3) for repeat in range(3)]
    assert rounds == [
        ["none", "k2", "goodput"],
        ["k2", "goodput", "none"],
        ["goodput", "none", "k2"],
    ]
    for position in range(3):  # each configuration takes each place once per rate
        assert sorted(r[position] for r in rounds) == sorted(names)
    # The next rate goes on rotating rather than starting over.
    assert sweep.run_order(names, 1, 0, 3) == ["none", "k2", "goodput"]
    assert sweep.run_order(["a", "b"], 1, 0, 1) == ["b", "a"]


def test_start_load_average_is_read_before_any_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The machine reads 0.22 when the sweep starts; the sweep's own servers then push it to
    2.44. The report must give 0.22 as the load at start (it used to read /proc/loadavg when
    writing the report, at the end)."""
    machine = {"load": (0.22, 0.3, 0.35)}
    monkeypatch.setattr(sweep, "loadavg", lambda: machine["load"])
    monkeypatch.setattr(report, "loadavg", lambda: machine["load"])
    started: list[str] = []

    def busy_server(conf, runs) -> None:
        started.append(conf.name)
        machine["load"] = (2.44, 1.9, 1.2)
        empty = result_json(summarize([], 1.0), [], {"request_rate": 1.0})
        runs.outcome.add(runs.sweep.datasets[0], conf.name, empty)
        raise RuntimeError("server exited early")

    monkeypatch.setattr(sweep, "_run_configuration", busy_server)
    config = tmp_path / "s.yaml"
    config.write_text("num_prompts: 2\ndataset_name: chat\nconfigurations:\n"
                      "  - {name: a, serve_args: [--model, m]}\n")  # fmt: skip
    args = build_parser().parse_args(["sweep", "--config", str(config), "--output-dir",
                                      str(tmp_path / "out")])  # fmt: skip
    assert sweep.run_sweep(args) == 0  # a configuration gave results before failing
    assert started == ["a"]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "load average at start 0.22 0.30 0.35" in text and "at the end 2.44 1.90 1.20" in text
    meta = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert meta["machine"]["loadavg_at_start"] == [0.22, 0.3, 0.35]
    assert meta["failures"] == {"a": "server exited early"}


def test_interleaved_sweep_drops_a_server_that_fails_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One server never starts, one fails its second run: both are named in the failures,
    and the rounds go on over what is left (no server here: start-up and runs are stand-ins
    for the driver's control flow only; test_live runs real servers)."""
    calls: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def serving(conf, runs):
        if conf.name == "broken":
            raise RuntimeError("exited during start-up")
        yield sweep._Target(conf, "http://127.0.0.1:9")

    async def prepare(self, target) -> None:
        return None

    async def measure(self, target, dataset, rate_index, repeat) -> None:
        calls.append((target.conf.name, repeat))
        if target.conf.name == "flaky" and repeat == 1:
            raise httpx.ConnectError("connection refused")
        empty = result_json(summarize([], 1.0), [], {"request_rate": 1.0})
        self.outcome.add(dataset, target.conf.name, empty)

    monkeypatch.setattr(sweep, "_serving", serving)
    monkeypatch.setattr(sweep._Sweep, "prepare", prepare)
    monkeypatch.setattr(sweep._Sweep, "measure", measure)
    config = tmp_path / "s.yaml"
    config.write_text("num_prompts: 2\ndataset_name: chat\nrates: [1]\nrepeats: 3\n"
                      "schedule: interleaved\nconfigurations:\n"
                      "  - {name: steady, base_url: 'http://127.0.0.1:9'}\n"
                      "  - {name: broken, base_url: 'http://127.0.0.1:9'}\n"
                      "  - {name: flaky, base_url: 'http://127.0.0.1:9'}\n")  # fmt: skip
    args = build_parser().parse_args(["sweep", "--config", str(config), "--output-dir",
                                      str(tmp_path / "out")])  # fmt: skip
    assert sweep.run_sweep(args) == 0
    assert calls == [("steady", 0), ("flaky", 0), ("flaky", 1), ("steady", 1), ("steady", 2)]
    meta = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert set(meta["failures"]) == {"broken", "flaky"}
    assert "connection refused" in meta["failures"]["flaky"]
    assert len(meta["summary"]["chat"]["steady"]) == 3
