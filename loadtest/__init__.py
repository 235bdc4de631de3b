"""specd's load generator: `python -m loadtest run|sweep`, in `vllm bench serve`'s language.

Modules, one job each:
  arrivals      request send times (Poisson / gamma, or all at once)
  data          prompt sets: shipped JSONL, random token-length prompts, ShareGPT JSON
  uniqueness    per-run prompt prefixes, so a sweep's rates never hit each other's cache
  sse           server-sent-event parsing and OpenAI chunk interpretation
  client        one streamed request over httpx -> RequestRecord
  runner        a bounded run: schedule, concurrency cap, duration cap, progress bar
  metrics       per-run summary and result JSON with vLLM's keys
  prom          Prometheus text parsing, /metrics scraping and deltas, policy series
  workload      the workload flags and prompt loading `run` and `sweep` share
  sweep_config  sweep YAML -> SweepConfig, with the command line's overrides
  sweep         rate sweeps over configurations (local `specd serve` or a given URL)
  report        report.md and sweep.json; plots in `plots`, host facts in `host`
  cli           `python -m loadtest run|sweep`: parse and dispatch
  simulate, sim/  discrete-event simulation of the real scheduler and policies (virtual clock)
  bench_*       offline benchmarks: engine, speculation policies, cost model, CPU linears
"""

# First, before `server` sets OMP_WAIT_POLICY (so not in isort's order): the snapshot of the
# environment that the servers a tool starts get.
from loadtest import launch_env  # noqa: F401, I001

# Every `python -m loadtest.<tool>` imports this package first. Importing `server` sets
# OMP_WAIT_POLICY=PASSIVE before anything here imports torch (server/__init__.py says why): the
# in-process benchmarks (bench_engine, bench_spec, bench_cost_model, bench_serving's offline
# side) must run the engine as `specd serve` does. With libgomp's default busy-waiting, the
# offline engine measured 3-30x slower in bench_serving's smoke runs, and varied run to run.
import server  # noqa: F401
