"""specd's load generator: `python -m loadtest run|sweep`, in `vllm bench serve`'s language.

Modules, one job each:
  arrivals  request send times (Poisson / gamma, or all at once)
  data      prompt sets: shipped JSONL, random token-length prompts, ShareGPT JSON
  sse       server-sent-event parsing and OpenAI chunk interpretation
  client    one streamed request over httpx -> RequestRecord
  runner    a bounded run: schedule, concurrency cap, duration cap, progress bar
  metrics   per-run summary and result JSON with vLLM's keys
  prom      Prometheus text parsing, /metrics scraping and deltas
  sweep     rate sweeps over configurations (local `specd serve` or a given URL)
  report    report.md, machine info; plots in `plots`
"""
