"""How well the goodput policy's online cost model predicts step times, on the embedded model.

    python -m loadtest.bench_cost_model [--waves 1 2 4 8 16 32 8 1] [--new-tokens 48]
        [--weights int4|fp32] [--out loadtest/results/cost_model]

Serves waves of concurrent requests (mix prompts; a wave of b requests runs b prompts at
once, so the batch grows, shrinks and mixes prefill with decode) through an engine with the
goodput policy and n-gram drafts, and records every step: its shape, the cost model's
prediction made *before* the step was seen (held out by construction), and the measured
wall time of the step. Reports the median and p90 relative error of those online
predictions, overall and by batch size, and of a second, offline check: a fresh model fitted
on the profile plus the first 70% of steps, scored on the last 30%; and the machine's own
noise floor: how far steps of one shape, run again, fall from that shape's median. Writes
JSON, markdown and a PNG (predicted vs measured) named by date.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from loadtest.bench_engine import machine_info
from loadtest.bench_spec import WEIGHTS, encode_chat, load_prompts, make_engine
from loadtest.host import format_loadavg, loadavg
from server.config import SpeculativeConfig
from server.engine.sampling_params import SamplingParams
from server.model.loader import resolve_model
from server.spec_decode.cost_model import CostModel, StepShape

_TARGET = 0.10
# KV tokens that count as the same shape for the noise floor (see repeat_noise).
_KV_BUCKET = 128


def relative_errors(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return np.abs(predicted - measured) / measured


def repeat_noise(
    shapes: list[StepShape], measured: np.ndarray, kv_bucket: int = _KV_BUCKET
) -> np.ndarray:
    """|step - median of its shape| / step, over shapes that ran at least 3 times: what even a
    model that knew each shape's typical time exactly would miss by (the machine's noise).
    KV tokens grow every decode step, so shapes match on everything else and on KV tokens
    within ``kv_bucket`` (128 tokens: ~1.5 ms at the ~0.012 ms/token this model fits)."""
    groups: dict[StepShape, list[float]] = defaultdict(list)
    for shape, seconds in zip(shapes, measured.tolist(), strict=True):
        key = replace(shape, num_kv_tokens=shape.num_kv_tokens // kv_bucket)
        groups[key].append(seconds)
    errors = [
        abs(s - float(np.median(times))) / s
        for times in groups.values()
        if len(times) >= 3
        for s in times
    ]
    return np.array(errors)


def summary(errors: np.ndarray) -> dict[str, float]:
    if len(errors) == 0:
        return {"steps": 0}
    return {
        "steps": len(errors),
        "median": round(float(np.median(errors)), 4),
        "p90": round(float(np.percentile(errors, 90)), 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--waves", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 8, 1])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--weights", default="int4", choices=list(WEIGHTS))
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/cost_model"))
    args = ap.parse_args(argv)

    load_start = loadavg()
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=8, policy="goodput")
    engine = make_engine(resolve_model(args.model), spec, args.weights)
    assert engine.core.speculator is not None
    cost: CostModel = engine.core.speculator.policy.cost  # type: ignore[attr-defined]
    cost.trace = []
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    prompts = encode_chat(engine, load_prompts(["repetitive.jsonl", "chat.jsonl"], 64))
    start = 0
    for i, wave in enumerate(args.waves):
        batch = [prompts[(start + j) % len(prompts)] for j in range(wave)]
        start += wave
        engine.generate(batch, params)
        print(
            f"wave {i + 1}/{len(args.waves)}: {wave} requests, {len(cost.trace)} steps", flush=True
        )
    trace = cost.trace
    shapes = [t[0] for t in trace]
    predicted = np.array([t[1] for t in trace])
    measured = np.array([t[2] for t in trace])
    # The first steps are predicted from the profile alone; report them apart.
    online = relative_errors(predicted, measured)
    split = int(0.7 * len(trace))
    refit = CostModel()
    refit.add_profile(cost.profile)
    for shape, _, seconds in trace[:split]:
        refit.observe(shape, seconds)
    refit.fit()
    held = np.array([refit.predict(s) for s in shapes[split:]])
    offline = relative_errors(held, measured[split:])
    by_batch = {}
    for lo, hi in ((1, 1), (2, 4), (5, 8), (9, 16), (17, 64)):
        mask = np.array([lo <= s.num_requests <= hi for s in shapes])
        by_batch[f"{lo}-{hi}"] = summary(online[mask])
    # By rows too: the large prefill steps are few, and priced by extrapolation when the
    # profile and the window have not seen their size.
    by_rows = {}
    for lo, hi in ((1, 1), (2, 16), (17, 128), (129, 512), (513, 1 << 20)):
        mask = np.array([lo <= s.num_tokens <= hi for s in shapes])
        by_rows[f"{lo}-{hi}" if hi < 1 << 20 else f"{lo}+"] = summary(online[mask])
    result = {
        "command": "python -m loadtest.bench_cost_model " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "loadavg_at_start": list(load_start) if load_start else None,
        "weights": args.weights,
        "online_held_out": summary(online),
        "online_after_first_64_steps": summary(online[64:]),
        "offline_70_30": summary(offline),
        "repeat_noise_floor": summary(repeat_noise(shapes, measured)),
        "by_batch_size": by_batch,
        "by_rows": by_rows,
        "coefficients_ms": {k: round(v * 1e3, 4) for k, v in cost.coefficients.items()},
        "steps": [
            {**s.__dict__, "predicted_s": round(p, 5), "measured_s": round(m, 5)}
            for s, p, m in zip(shapes, predicted.tolist(), measured.tolist(), strict=True)
        ],
    }
    write_report(args.out, result, shapes, predicted, measured)
    return 0


def write_report(
    out: Path,
    result: dict,
    shapes: list[StepShape],
    predicted: np.ndarray,
    measured: np.ndarray,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    (out / f"{stamp}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot = out / f"{stamp}.png"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    batch = np.array([s.num_requests for s in shapes])
    sc = a.scatter(1e3 * measured, 1e3 * predicted, c=batch, s=8, cmap="viridis")
    top = 1e3 * float(max(measured.max(), predicted.max()))
    a.plot([0, top], [0, top], color="gray", linestyle="--")
    a.set_xlabel("measured step time (ms)")
    a.set_ylabel("predicted before the step (ms)")
    a.set_title("online cost model, every step")
    fig.colorbar(sc, ax=a, label="requests in the step")
    b.plot(1e3 * measured, label="measured", linewidth=0.8)
    b.plot(1e3 * predicted, label="predicted", linewidth=0.8)
    b.set_xlabel("step")
    b.set_ylabel("ms")
    b.set_title("step time over the run")
    b.legend()
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    m = result["machine"]
    lines = [
        f"# Cost model accuracy, {m['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit "
        f"{m['git_commit']}; load average at start "
        f"{format_loadavg(result['loadavg_at_start'])}. Embedded SmolLM2-135M, "
        f"{result['weights']} weights, goodput "
        "policy with n-gram drafts (k <= 8), waves of concurrent mix requests.",
        "",
        f"![predicted vs measured]({plot.name})",
        "",
        f"Target: median relative error <= {_TARGET:.0%} on held-out steps.",
        "",
        "| check | steps | median | p90 |",
        "|---|---:|---:|---:|",
    ]
    for name, key in (
        ("online, predicted before each step (all)", "online_held_out"),
        ("online, after the first 64 steps", "online_after_first_64_steps"),
        ("offline: fit on first 70%, score last 30%", "offline_70_30"),
        ("noise floor: same shape run again, vs that shape's median", "repeat_noise_floor"),
        *((f"online, {k} requests", ("by_batch_size", k)) for k in result["by_batch_size"]),
        *((f"online, steps of {k} rows", ("by_rows", k)) for k in result.get("by_rows", {})),
    ):
        s = result[key] if isinstance(key, str) else result[key[0]][key[1]]
        if s.get("steps"):
            lines.append(f"| {name} | {s['steps']} | {s['median']:.1%} | {s['p90']:.1%} |")
    lines += ["", "Fitted coefficients (ms per unit):", ""]
    lines += [f"- `{k}`: {v}" for k, v in result["coefficients_ms"].items() if v]
    (out / f"{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'{stamp}.md'}")


if __name__ == "__main__":
    sys.exit(main())
