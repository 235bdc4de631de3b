"""Drafters' trees scored against recorded greedy answers: tree quality without the model in
the loop or the clock.

    python -m loadtest.bench_drafter_replay [--datasets repetitive free-form] [--prompts 16]
        [--tokens 160] [--budget 8] [--methods ngram suffix recycle auto]
        [--out loadtest/results/spec] [--name DATE]

First records, once per dataset (cached under ``~/.cache/specd/drafter-replay``), the embedded
model's greedy answers to the dataset's first ``--prompts`` prompts (transformers, float32,
the converted checkpoint; an answer ends at its first end-of-sequence token or at
``--tokens``) and its raw top-k next-token probabilities at every answer position. Then, for
each drafter and scenario, it replays the answers token by token, all the prompts as one
batch in one drafter (cross-request state is shared, as in a server), as plain decoding
emits them. At every position each request's drafter proposes a tree at ``--budget`` nodes,
which is scored by greedy verification's rule: its accepted length is its longest path that
the answer continues. The drafter then learns what the engine would teach it that step: the
verified outcome (``VerifiedTreeConsumer``: ``auto``'s calibration), the target's top-k at
that row (``TopTokenConsumer``: ``recycle``, ``auto``), and at the end the finished requests
(``FinishedRequestConsumer``: the suffix cache).

Scenarios: ``fresh`` (the drafter has seen nothing before) and ``repeat`` (the same requests
were served once before, so the suffix cache holds their answers: what a served sweep that
sends the same questions at every rate gives the cross-request drafters).

Deterministic, so a drafter change's effect on its trees shows exactly, with no timing noise.
It does not show what proposing costs (``loadtest.bench_step_parts``), what the goodput
policy keeps of the trees, or tokens/s (``loadtest.bench_spec``). Writes JSON, a markdown
table and a PNG named by date (or ``--name``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from loadtest.bench_engine import machine_info
from loadtest.bench_spec import DATASET_FILES, load_prompts, method_options
from server.config import SpeculativeConfig
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.model.loader import resolve_model
from server.spec_decode.drafter import (
    Drafter,
    FinishedRequestConsumer,
    TopTokenConsumer,
    TopTokens,
    VerifiedTree,
    VerifiedTreeConsumer,
)
from server.spec_decode.drafters import model_free_drafter
from server.spec_decode.tree import TokenTree

SCENARIOS = ("fresh", "repeat")
_TOP_K = 16
_CACHE = Path.home() / ".cache" / "specd" / "drafter-replay"


@dataclass
class Recording:
    """One prompt's greedy answer and, per answer position i, the target's top-k next tokens
    after the context before it (prompt + answer[:i]), best first."""

    prompt: list[int]
    answer: list[int]
    top_ids: np.ndarray  # [len(answer), k]
    top_probs: np.ndarray  # [len(answer), k]


@dataclass
class Score:
    dataset: str
    scenario: str
    method: str
    positions: int
    # Mean accepted draft tokens per tree (a verify step would emit 1 more), the share of
    # positions with at least one accepted, mean draft nodes and mean depth of the trees.
    accepted: float
    any_accepted: float
    nodes: float
    depth: float


def accepted_path(tree: TokenTree, truth: Sequence[int]) -> tuple[int, ...]:
    """The tree's nodes on its longest path that ``truth`` continues (greedy verification)."""
    children: dict[tuple[int, int], int] = {}
    for i in range(1, tree.num_nodes):
        children.setdefault((tree.parents[i], tree.token_ids[i]), i)
    path: list[int] = []
    node = 0
    for token in truth:
        nxt = children.get((node, token))
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return tuple(path)


def replay(
    drafter: Drafter,
    recordings: Sequence[Recording],
    budget: int,
    earlier: Iterable[Recording] = (),
) -> list[tuple[int, int, int]]:
    """Replays the recordings as one batch through ``drafter`` (see the module docstring),
    after it has seen the ``earlier`` requests finish; returns per (request, position) the
    tree's (accepted length, draft nodes, depth)."""
    if isinstance(drafter, FinishedRequestConsumer):
        drafter.observe_finished(  # type: ignore[attr-defined]
            _request(f"earlier-{i}", r.prompt + r.answer) for i, r in enumerate(earlier)
        )
    requests = [_request(f"r{i}", r.prompt) for i, r in enumerate(recordings)]
    learns_outcomes = isinstance(drafter, VerifiedTreeConsumer)
    learns_top_k = isinstance(drafter, TopTokenConsumer)
    out: list[tuple[int, int, int]] = []
    for pos in range(max(len(r.answer) for r in recordings)):
        live = [(q, r) for q, r in zip(requests, recordings, strict=True) if pos < len(r.answer)]
        trees = drafter.propose([q for q, _ in live], [budget] * len(live))
        verified = []
        for (q, r), tree in zip(live, trees, strict=True):
            path = accepted_path(tree, r.answer[pos:])
            depth = max(tree.depths) if tree.num_drafts else 0
            out.append((len(path), tree.num_drafts, depth))
            if tree.num_drafts:
                verified.append(VerifiedTree(q.request_id, tree, path))
        if learns_outcomes:
            drafter.observe_verified(verified)  # type: ignore[attr-defined]
        if learns_top_k:
            drafter.observe_top_tokens(_top_tokens(live, pos))  # type: ignore[attr-defined]
        for q, r in live:
            q.append_output_token(r.answer[pos])
    if isinstance(drafter, FinishedRequestConsumer):
        drafter.observe_finished(requests)  # type: ignore[attr-defined]
    return out


def _request(request_id: str, tokens: list[int]) -> Request:
    return Request(
        request_id, list(tokens), SamplingParams(max_tokens=1 << 16), frozenset(), 1 << 20
    )


def _top_tokens(live: list[tuple[Request, Recording]], pos: int) -> TopTokens:
    """The row each live request computed at this position: its last token, with the
    recorded top-k after it."""
    return TopTokens(
        tuple(q.request_id for q, _ in live),
        np.array([q.all_token_ids[-1] for q, _ in live]),
        np.array([q.all_token_ids[-2] if q.num_tokens > 1 else -1 for q, _ in live]),
        np.stack([r.top_ids[pos] for _, r in live]).astype(np.int64),
        np.stack([r.top_probs[pos] for _, r in live]),
    )


def score(dataset: str, scenario: str, method: str, outcomes: list[tuple[int, int, int]]) -> Score:
    return Score(
        dataset=dataset,
        scenario=scenario,
        method=method,
        positions=len(outcomes),
        accepted=round(statistics.mean(a for a, _, _ in outcomes), 3),
        any_accepted=round(statistics.mean(a > 0 for a, _, _ in outcomes), 3),
        nodes=round(statistics.mean(n for _, n, _ in outcomes), 2),
        depth=round(statistics.mean(d for _, _, d in outcomes), 2),
    )


# ---- recording ------------------------------------------------------------------------------


def record(model_dir: Path, dataset: str, prompts: int, tokens: int) -> list[Recording]:
    """The model's greedy answers and top-k (see the module docstring), cached on disk."""
    texts = load_prompts(DATASET_FILES[dataset], prompts)
    key = hashlib.sha256(json.dumps([str(model_dir), texts, tokens]).encode()).hexdigest()[:16]
    path = _CACHE / f"{dataset}-{prompts}x{tokens}-{key}.npz"
    if path.exists():
        return _load(path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = set(np.atleast_1d(model.generation_config.eos_token_id).tolist())
    out = []
    for i, text in enumerate(texts):
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        prompt = tokenizer.encode(chat, add_special_tokens=False)
        with torch.inference_mode():
            result = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        answer = result.sequences[0, len(prompt) :].tolist()
        end = next((j for j, t in enumerate(answer) if t in eos), len(answer))
        probs = torch.stack(result.logits[:end])[:, 0].float().softmax(-1)
        top_probs, top_ids = probs.topk(_TOP_K, -1)
        out.append(Recording(prompt, answer[:end], top_ids.numpy(), top_probs.numpy()))
        print(f"  recorded {dataset} {i + 1}/{len(texts)} ({end} tokens)", flush=True)
    _save(path, out)
    return out


def _save(path: Path, recordings: list[Recording]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for i, r in enumerate(recordings):
        arrays[f"prompt{i}"] = np.array(r.prompt, dtype=np.int64)
        arrays[f"answer{i}"] = np.array(r.answer, dtype=np.int64)
        arrays[f"ids{i}"] = r.top_ids.astype(np.int64)
        arrays[f"probs{i}"] = r.top_probs.astype(np.float32)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(path)


def _load(path: Path) -> list[Recording]:
    data = np.load(path)
    count = sum(1 for name in data.files if name.startswith("prompt"))
    return [
        Recording(
            data[f"prompt{i}"].tolist(),
            data[f"answer{i}"].tolist(),
            data[f"ids{i}"],
            data[f"probs{i}"],
        )
        for i in range(count)
    ]


# ---- report ---------------------------------------------------------------------------------


def drafter_factory(method: str, vocab_size: int) -> Callable[[], Drafter]:
    """A fresh drafter named as ``bench_spec`` names them (``recycle/layered``, ...), built
    with the options the engine gives it (``model_free_drafter``)."""
    name, extra = method_options(method)
    spec = SpeculativeConfig(method=name, num_speculative_tokens=1, **extra)  # type: ignore[arg-type]
    return lambda: model_free_drafter(spec, vocab_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--datasets", nargs="+", default=["repetitive", "free-form"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["ngram", "suffix", "recycle", "auto"])
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/spec"))
    ap.add_argument("--name", help="results file name (default: the date)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.datasets) - set(DATASET_FILES))
    if unknown:
        ap.error(f"unknown datasets {unknown}; choose from {sorted(DATASET_FILES)}")

    model_dir = resolve_model(args.model)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    scores: list[Score] = []
    for dataset in args.datasets:
        print(f"recording {dataset} ({args.prompts} prompts, up to {args.tokens} tokens)")
        recordings = record(model_dir, dataset, args.prompts, args.tokens)
        for scenario in SCENARIOS:
            earlier = recordings if scenario == "repeat" else []
            for method in args.methods:
                outcomes = replay(
                    drafter_factory(method, vocab_size)(), recordings, args.budget, earlier
                )
                scores.append(score(dataset, scenario, method, outcomes))
                s = scores[-1]
                print(
                    f"  {dataset} {scenario} {method}: {s.accepted:.2f} accepted per tree, "
                    f"{s.nodes:.1f} nodes, depth {s.depth:.1f}",
                    flush=True,
                )
    write_report(args, scores)
    return 0


def write_report(args: argparse.Namespace, scores: list[Score]) -> None:
    stamp = datetime.now(timezone.utc)
    name = args.name or stamp.strftime("%Y-%m-%d") + "-drafter-replay"
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m loadtest.bench_drafter_replay " + " ".join(sys.argv[1:])
    meta = {"command": command, "date": stamp.isoformat(timespec="seconds"), **machine_info()}
    payload = {"meta": meta, "budget": args.budget, "scores": [asdict(s) for s in scores]}
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")

    lines = [
        f"# Drafters' trees against recorded greedy answers, {stamp:%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {meta.get('cpu', '?')}, commit {meta.get('git_commit', '?')}. Budget "
        f"{args.budget} draft nodes a tree, proposed at every answer position; `accepted` = "
        "mean accepted draft tokens per tree (a verify step emits one more); `any` = share of "
        "positions with at least one accepted; `repeat` = the same requests served once "
        "before (the suffix cache holds their answers). Deterministic: no timing.",
        "",
        f"![accepted per tree]({name}.png)",
        "",
        "| dataset | scenario | method | positions | accepted | any | nodes | depth |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in scores:
        lines.append(
            f"| {s.dataset} | {s.scenario} | {s.method} | {s.positions} | {s.accepted:.2f} | "
            f"{s.any_accepted:.2f} | {s.nodes:.1f} | {s.depth:.1f} |"
        )
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(scores, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.{{json,md,png}}")


def plot(scores: list[Score], path: Path) -> None:
    groups = sorted({(s.dataset, s.scenario) for s in scores})
    methods = list(dict.fromkeys(s.method for s in scores))
    by = {(s.dataset, s.scenario, s.method): s.accepted for s in scores}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for j, method in enumerate(methods):
        xs = [i + j * width for i in range(len(groups))]
        ax.bar(xs, [by.get((d, sc, method), 0.0) for d, sc in groups], width, label=method)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{d}\n{sc}" for d, sc in groups])
    ax.set_ylabel("accepted draft tokens per tree")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
