"""Stages 3 to 5: the ModelRunner on an 8B-shaped model with random weights (decode and
verify steps against the bytes-read floor), and greedy identity on a tiny model."""

from __future__ import annotations

import gc
import random
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

from kernels.gpu_check.environment import _sync
from kernels.gpu_check.plan import Plan
from kernels.gpu_check.stages import Deadline, StageResult, log

# ---- 3/4. engine steps on an 8B-shaped model -------------------------------------------------


def write_model_dir(path: Path, shape: dict[str, int | float]) -> Path:
    """config.json (+ generation_config) of a Llama with `shape`: all the runner reads."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        **shape, bos_token_id=0, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False
    )
    cfg.architectures = ["LlamaForCausalLM"]
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    return path


def random_load_model(
    path: Path,
    dtype: str = "auto",
    device: str = "auto",
    backend: Any = None,
    *_more: Any,
    **_options: Any,
) -> tuple[Any, Any, Any]:
    """Stands in for server.model.loader.load_model: the same CausalLM, with random weights
    drawn on the device. An 8B checkpoint would be 16 GB to write and read back per run.
    Arguments after `backend` (quantization, ...) choose how a checkpoint is read: moot here."""
    import torch
    from transformers import AutoConfig

    from server.model.llama import CausalLM, decoder_spec
    from server.model.loader import resolve_device, resolve_dtype
    from tests.tiny_models import make_tokenizer

    dev = resolve_device(device)
    dtype_ = resolve_dtype(dtype, dev)
    hf_config = AutoConfig.from_pretrained(path)
    # Meta first, cast there, then allocate: 8B never exists in fp32 on the device.
    with torch.device("meta"):
        model = CausalLM(decoder_spec(hf_config), backend)
    model = model.to(dtype_).to_empty(device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norm weights (Llama has no biases)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # to_empty leaves buffers as garbage; today the model has none (rotary is no module).
    assert not list(model.buffers()), "CausalLM has buffers now: fill them here too"
    model.eval()
    return model, hf_config, make_tokenizer()


@contextmanager
def random_weights(loader: Callable[..., Any] = random_load_model) -> Iterator[None]:
    """ModelRunner builds its model through this module-level name; swap it for the run."""
    from server.model import runner as runner_module

    saved = runner_module.load_model
    runner_module.load_model = loader
    try:
        yield
    finally:
        runner_module.load_model = saved


def _blocks_needed(plan: Plan) -> int:
    per_request = -(-(plan.context + max(plan.draft_rows) + 1) // plan.block_size)
    return max(max(plan.decode_batches), max(plan.verify_batches)) * per_request + 4


def build_runner(
    plan: Plan, model_dir: Path, loader: Callable[..., Any] = random_load_model
) -> Any:
    from server.config import CacheConfig, EngineConfig, ModelConfig
    from server.model.runner import ModelRunner

    config = EngineConfig(
        model=ModelConfig(
            model=str(model_dir), dtype=plan.dtype, device=plan.device, cpu_linear_plan=False
        ),
        cache=CacheConfig(
            block_size=plan.block_size, num_blocks=_blocks_needed(plan), enable_prefix_caching=False
        ),
        attention_backend="triton",
        separate_process=False,
    )
    with random_weights(loader):
        return ModelRunner(config)


def step_plan(runner: Any, batch: int, context: int, drafts: int, tree: bool, seed: int) -> Any:
    """`batch` greedy requests decoding at `context` cached tokens, each verifying `drafts`
    random draft tokens as a chain or a random tree, on blocks 0, 1, ... (the cache's content
    is whatever is there: the step reads the same bytes either way)."""
    from server.engine.plan import StepPlan
    from server.engine.request import Request
    from server.engine.sampling_params import SamplingParams
    from server.spec_decode.tree import TokenTree

    rng = random.Random(seed)
    bs = runner.block_size
    params = SamplingParams(max_tokens=drafts + 2, temperature=0.0, ignore_eos=True)
    requests, trees = [], {}
    next_block = 0
    for i in range(batch):
        tokens = [rng.randrange(runner.vocab_size) for _ in range(context + 1)]
        r = Request(f"gpu-check-{i}", tokens, params, frozenset(), runner.max_model_len)
        r.num_computed_tokens = context
        n_blocks = -(-(context + 1 + drafts) // bs)
        r.block_ids = list(range(next_block, next_block + n_blocks))
        next_block += n_blocks
        requests.append(r)
        if drafts:
            drafted = [rng.randrange(runner.vocab_size) for _ in range(drafts)]
            parents = [-1] + [rng.randrange(j) if tree else j - 1 for j in range(1, drafts + 1)]
            trees[r.request_id] = TokenTree([tokens[-1], *drafted], parents)
    assert next_block <= runner.num_blocks, (next_block, runner.num_blocks)
    out = StepPlan(requests, {r.request_id: 1 for r in requests})
    out.spec_trees = trees
    out.num_spec_tokens = {rid: t.num_drafts for rid, t in trees.items()}
    out.spec_budgets = dict(out.num_spec_tokens)
    return out


def time_call(fn: Callable[[], Any], device: str, calls: int = 1, rounds: int = 5) -> float:
    """Median over ``rounds`` of the seconds per call of ``fn`` (``calls`` back to back a
    round, the device synchronised around them), after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / calls)
    return median(times)


def time_step(runner: Any, step: Any, repeats: int, device: str) -> float:
    """Median seconds of runner.execute(step) after one warm-up (Triton compiles per shape).
    Executing doesn't advance the requests (the scheduler does), so the plan can repeat."""
    return time_call(partial(runner.execute, step), device, rounds=repeats)


def weight_bytes_read(runner: Any) -> int:
    """Bytes of weights one decode step reads: all but the embedding table (one row a token),
    unless the LM head is tied to it. int4 layers hold theirs as buffers (packed weights,
    scales and zeros); an int4 head's exact copy, read for a few candidates, is left out."""
    from server.model.int4 import Int4Linear

    model = runner.model
    tensors = [*model.parameters()]
    tensors += [b for m in model.modules() if isinstance(m, Int4Linear) for b in m.buffers()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    if model.lm_head is not None:
        emb = model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes_per_token(runner: Any) -> int:
    return runner.kv_bytes_per_block() // runner.block_size


def floor_row(runner: Any, batch: int, context: int, rows: int, seconds: float, bw: float) -> dict:
    """One timed step against the floor: weights + the K/V it reads (and writes) / bandwidth."""
    weights = weight_bytes_read(runner)
    kv = batch * (context + rows) * kv_bytes_per_token(runner)
    floor = (weights + kv) / bw
    return {
        "batch": batch,
        "rows_per_request": rows,
        "step_ms": round(seconds * 1e3, 3),
        "weights_floor_ms": round(weights / bw * 1e3, 3),
        "floor_ms": round(floor * 1e3, 3),
        "pct_of_floor": round(100 * floor / seconds, 1),
        "tokens_per_s": round(batch / seconds, 1),
    }


class EngineHolder:
    """The runner shared by the decode and verify stages: built once (16 GB of weights)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.runner: Any = None
        self.error: str | None = None
        self.build_seconds = 0.0
        self._tmp = tempfile.TemporaryDirectory(prefix="gpu-check-model-")

    def get(self) -> Any:
        if self.runner is None and self.error is None:
            t0 = time.monotonic()
            try:
                model_dir = write_model_dir(Path(self._tmp.name), self.plan.model)
                self.runner = build_runner(self.plan, model_dir)
            except Exception:
                self.error = traceback.format_exc()
            self.build_seconds = round(time.monotonic() - t0, 1)
        if self.runner is None:
            raise RuntimeError(f"building the engine failed:\n{self.error}")
        return self.runner

    def close(self) -> None:
        self.runner = None
        gc.collect()
        if self.plan.device == "cuda":
            import torch

            torch.cuda.empty_cache()
        self._tmp.cleanup()


def _model_info(runner: Any, holder: EngineHolder) -> dict[str, Any]:
    n_params = sum(p.numel() for p in runner.model.parameters())
    return {
        "model": {**holder.plan.model, "dtype": str(runner.dtype)},
        "params_b": round(n_params / 1e9, 3),
        "weight_bytes_read_gb": round(weight_bytes_read(runner) / 1e9, 3),
        "kv_bytes_per_token": kv_bytes_per_token(runner),
        "attention_backend": runner.model.backend.name,
        "build_s": holder.build_seconds,
        "context": holder.plan.context,
    }


def stage_engine_decode(
    plan: Plan, env: dict[str, Any], holder: EngineHolder
) -> Callable[[StageResult, Deadline], None]:
    def body(result: StageResult, deadline: Deadline) -> None:
        runner = holder.get()
        bw = (env.get("copy_tbps") or 1.0) * 1e12
        result.data.update(_model_info(runner, holder), hbm_tbps=bw / 1e12, rows=[])
        for batch in plan.decode_batches:
            if deadline.expired:
                result.status, result.reason = "partial", "budget spent before every batch"
                return
            step = step_plan(runner, batch, plan.context, 0, False, seed=batch)
            seconds = time_step(runner, step, plan.repeats, plan.device)
            result.data["rows"].append(floor_row(runner, batch, plan.context, 1, seconds, bw))
            log(f"  decode {result.data['rows'][-1]}")
        result.status = "pass"

    return body


def stage_engine_verify(
    plan: Plan, env: dict[str, Any], holder: EngineHolder
) -> Callable[[StageResult, Deadline], None]:
    def body(result: StageResult, deadline: Deadline) -> None:
        runner = holder.get()
        bw = (env.get("copy_tbps") or 1.0) * 1e12
        result.data.update(hbm_tbps=bw / 1e12, rows=[])
        for batch in plan.verify_batches:
            base = time_step(
                runner,
                step_plan(runner, batch, plan.context, 0, False, 0),
                plan.repeats,
                plan.device,
            )
            for k in plan.draft_rows:
                for shape in ("chain", "tree") if k > 1 else ("chain",):
                    if deadline.expired:
                        result.status, result.reason = "partial", "budget spent before every k"
                        return
                    step = step_plan(runner, batch, plan.context, k, shape == "tree", seed=k)
                    seconds = time_step(runner, step, plan.repeats, plan.device)
                    row = floor_row(runner, batch, plan.context, k + 1, seconds, bw)
                    row.update(
                        draft_rows=k,
                        shape=shape,
                        vs_decode=round(seconds / base, 2),
                        decode_ms=round(base * 1e3, 3),
                    )
                    del row["tokens_per_s"]
                    result.data["rows"].append(row)
                    log(f"  verify {row}")
        result.status = "pass"

    return body


# ---- 5. greedy identity ------------------------------------------------------------------------


def greedy_prompts(n: int) -> list[list[int]]:
    """Prompts that repeat spans (what the prompt-lookup tree drafter feeds on), some
    free-form; as tests/spec_decode/test_engine_speculation.py makes them."""
    rng = random.Random(0)
    prompts = [list(range(40, 52)) * 3, [7, 9, 11] * 5]
    for i in range(2, n):
        body = [rng.randrange(3, 300) for _ in range(rng.randrange(4, 24))]
        prompts.append(body if i % 3 == 2 else (body * (2 + i % 3))[: 12 + 9 * i % 70])
    return prompts[:n]


def greedy_tokens(
    plan: Plan,
    model_dir: Path,
    backend: str,
    speculative: Any,
    dtype: str = "float32",
    quantization: str = "none",
    int4_kernel: str = "auto",
) -> tuple[list[list[int]], int, int]:
    """(greedy tokens per prompt, drafted, accepted) of one in-process engine."""
    from server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from server.engine.offline import OfflineEngine
    from server.engine.sampling_params import SamplingParams

    engine = OfflineEngine(
        EngineConfig(
            model=ModelConfig(
                model=str(model_dir),
                dtype=dtype,
                device=plan.device,
                quantization=quantization,  # type: ignore[arg-type]
                int4_kernel=int4_kernel,  # type: ignore[arg-type]
                cpu_linear_plan=False,
            ),
            cache=CacheConfig(block_size=8, num_blocks=512),  # no preemption: 16 x ~130 tokens
            scheduler=SchedulerConfig(max_num_batched_tokens=64),
            speculative=speculative,
            attention_backend=backend,  # type: ignore[arg-type]
            separate_process=False,
        )
    )
    assert engine.core.runner.model.backend.name == backend
    prompts = greedy_prompts(plan.greedy_prompts)
    params = SamplingParams(max_tokens=plan.greedy_tokens, temperature=0.0, ignore_eos=True)
    out = [c.token_ids for c in engine.generate(prompts, params)]
    stats = engine.core.stats()
    return out, stats.num_draft_tokens, stats.num_accepted_tokens


def stage_greedy_identity(plan: Plan) -> Callable[[StageResult, Deadline], None]:
    def body(result: StageResult, deadline: Deadline) -> None:
        from server.config import SpeculativeConfig
        from tests.tiny_models import make_tiny_model

        tree = SpeculativeConfig(
            policy="fixed", method="tree", num_speculative_tokens=6, max_tree_width=3
        )
        with tempfile.TemporaryDirectory(prefix="gpu-check-tiny-") as tmp:
            model_dir = make_tiny_model("llama", Path(tmp) / "llama")
            plain, _, _ = greedy_tokens(plan, model_dir, "torch", SpeculativeConfig())
            got, drafted, accepted = greedy_tokens(plan, model_dir, "triton", tree)
        result.data = {
            "model": "tests/tiny_models.py llama (fp32)",
            "prompts": len(plain),
            "tokens_each": plan.greedy_tokens,
            "drafted": drafted,
            "accepted": accepted,
            "identical": got == plain,
        }
        if got != plain:
            result.status = "fail"
            i = next(i for i, (a, b) in enumerate(zip(got, plain, strict=True)) if a != b)
            result.reason = f"prompt {i}: triton + tree speculation {got[i]} != torch {plain[i]}"
        elif drafted == 0:
            result.status = "fail"
            result.reason = "the tree drafter proposed nothing: speculation was not exercised"
        else:
            result.status = "pass"
            if accepted == 0:
                # Identity still holds; only KV compaction of accepted nodes went untested.
                result.reason = "no draft was accepted: compaction not exercised"

    return body
