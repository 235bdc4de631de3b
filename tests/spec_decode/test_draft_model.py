"""Draft-model and synthetic speculation in the whole engine, on tiny random float64 models.

Greedy identity is the contract (every request gets exactly plain greedy decoding's tokens);
the draft model's own paged K/V must follow accepted tokens, chunked prefill and preemption;
sampled requests must hand the draft distribution q to verification.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.config import CacheConfig, EngineConfig, ModelConfig, SpeculativeConfig
from server.engine.core import EngineCore
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.model.attention import TorchAttentionBackend
from server.model.loader import load_model
from server.model.sampler import processed_probs
from server.spec_decode.draft_model import DraftModelDrafter, check_same_tokenizer
from server.spec_decode.draft_runner import DraftRunner
from tests.spec_decode.test_engine_speculation import (
    make_engine,
    repetitive_token_prompts,
    tokens_of,
)
from tests.tiny_models import make_tokenizer, tiny_config

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
# Small token budget: prompts of up to ~80 tokens are prefilled in chunks.
BUDGET = 32


def noisy_copy(src: Path, dst: Path, scale: float, seed: int = 0) -> Path:
    """A different model with the same tokenizer: src's weights + Gaussian noise of ``scale``
    times each tensor's std. Two independent random tiny models agree on ~0% of greedy tokens;
    a 5% perturbation of the target agrees on ~25% of drafts, like a real small draft."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    weights = load_file(src / "model.safetensors")
    noisy = {
        k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) * v.std() * scale
        for k, v in weights.items()
    }
    save_file(noisy, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def draft_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return noisy_copy(tiny_llama_dir, tmp_path_factory.mktemp("draft") / "llama-noisy", 0.05)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return repetitive_token_prompts(16, seed=21)


@pytest.fixture(scope="module")
def plain_greedy(tiny_llama_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    return tokens_of(make_engine(tiny_llama_dir, budget=BUDGET).generate(prompts, GREEDY))


def draft_spec(model: Path, k: int = 4) -> SpeculativeConfig:
    return SpeculativeConfig(
        policy="fixed", method="draft_model", model=str(model), num_speculative_tokens=k
    )


# ---- draft model --------------------------------------------------------------------------


def test_draft_equal_to_target_accepts_everything(
    tiny_llama_dir: Path, prompts: list[list[int]], plain_greedy: list[list[int]]
) -> None:
    engine = make_engine(tiny_llama_dir, draft_spec(tiny_llama_dir), budget=BUDGET)
    runner = engine.core.drafter.runner  # type: ignore[union-attr]
    computed = 0
    forward = runner.forward

    def counting_forward(chunks):  # type: ignore[no-untyped-def]
        nonlocal computed
        computed += sum(len(c.token_ids) for c in chunks)
        return forward(chunks)

    runner.forward = counting_forward
    assert tokens_of(engine.generate(prompts, GREEDY)) == plain_greedy
    stats = engine.core.stats()
    assert stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens == stats.num_draft_tokens
    # The bookkeeping recomputes nothing it already holds: with every draft accepted, each
    # position's draft K/V is computed once (the last output token's never).
    assert computed <= sum(len(p) + len(o) for p, o in zip(prompts, plain_greedy, strict=True))


def test_different_draft_greedy_identity_with_chunked_prefill(
    tiny_llama_dir: Path,
    draft_dir: Path,
    prompts: list[list[int]],
    plain_greedy: list[list[int]],
) -> None:
    engine = make_engine(tiny_llama_dir, draft_spec(draft_dir), budget=BUDGET)
    assert tokens_of(engine.generate(prompts, GREEDY)) == plain_greedy
    stats = engine.core.stats()
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert stats.num_blocks_used == 0


@pytest.mark.parametrize("draft", ["target", "noisy"])
def test_greedy_identity_with_preemption(
    draft: str,
    tiny_llama_dir: Path,
    draft_dir: Path,
    prompts: list[list[int]],
    plain_greedy: list[list[int]],
) -> None:
    model = tiny_llama_dir if draft == "target" else draft_dir
    engine = make_engine(tiny_llama_dir, draft_spec(model), budget=BUDGET, num_blocks=24)
    assert tokens_of(engine.generate(prompts, GREEDY)) == plain_greedy
    stats = engine.core.stats()
    assert stats.num_preemptions > 0
    if draft == "target":
        # Stale draft K/V after preemption (blocks freed and reused) would show as rejections.
        assert stats.num_accepted_tokens == stats.num_draft_tokens > 0
    else:
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_draft_of_another_architecture(
    tiny_llama_dir: Path, tiny_model_dirs: dict[str, Path], plain_greedy: list[list[int]]
) -> None:
    """A draft with other cache shapes (qwen3: head_dim 32, q/k norm) over the same blocks."""
    prompts = repetitive_token_prompts(16, seed=21)[:6]
    engine = make_engine(tiny_llama_dir, draft_spec(tiny_model_dirs["qwen3"]), budget=BUDGET)
    assert tokens_of(engine.generate(prompts, GREEDY)) == plain_greedy[:6]
    assert engine.core.stats().num_draft_tokens > 0


def test_sampled_requests_verify_against_the_draft_distribution(
    tiny_llama_dir: Path,
    draft_dir: Path,
    prompts: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import server.model.runner as runner_module

    seen: list[tuple[int, tuple[int, ...] | None]] = []
    verify_tree = runner_module.verify_tree

    def spy(logits, request, tree, generator, kind, draft_probs=None):  # type: ignore[no-untyped-def]
        seen.append((tree.num_nodes, None if draft_probs is None else tuple(draft_probs.shape)))
        return verify_tree(logits, request, tree, generator, kind, draft_probs=draft_probs)

    monkeypatch.setattr(runner_module, "verify_tree", spy)
    params = [
        SamplingParams(max_tokens=24, temperature=1.0, top_k=50, seed=100 + i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    engine = make_engine(tiny_llama_dir, draft_spec(draft_dir), budget=BUDGET)
    first = engine.generate(prompts, params)
    assert all(c.error is None and c.finish_reason == "length" for c in first)
    stats = engine.core.stats()
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert seen and all(shape is not None and shape[0] == n for n, shape in seen)
    # Seeded: the same tokens again, in a fresh engine and alone.
    again = make_engine(tiny_llama_dir, draft_spec(draft_dir), budget=BUDGET)
    assert tokens_of(again.generate(prompts, params)) == tokens_of(first)
    alone = again.generate([prompts[3]], params[3])
    assert alone[0].token_ids == first[3].token_ids


def test_draft_probs_rows_are_the_draft_distributions(draft_dir: Path) -> None:
    """Row i of draft_probs is the draft's processed distribution after node i (checked
    against transformers' forward of the draft on the whole drafted context)."""
    from transformers import AutoModelForCausalLM

    model, _, _ = load_model(draft_dir, "float64", "cpu", TorchAttentionBackend())
    vocab = model.spec.vocab_size
    runner = DraftRunner(model, num_blocks=16, block_size=4, target_vocab_size=vocab)
    drafter = DraftModelDrafter(runner)
    prompt = [5, 17, 42, 99, 7, 63, 8]
    params = SamplingParams(max_tokens=16, temperature=0.8, top_k=40, seed=3)
    request = Request("r", prompt, params, frozenset({2}), max_total_tokens=64)
    request.block_ids = list(range(5))
    request.num_computed_tokens = len(prompt) - 1  # the target has prefilled all but the root
    (tree,) = drafter.propose([request], [3])
    assert tree.is_chain and tree.num_drafts == 3 and tree.root_token == prompt[-1]
    q = drafter.draft_probs("r")
    assert q is not None and q.shape == (4, vocab)

    reference = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float64)
    context = torch.tensor([prompt + tree.draft_token_ids])
    with torch.no_grad():
        logits = reference(context).logits[0, len(prompt) - 1 : len(prompt) + 2]  # [3, V]
    expected = processed_probs(logits.float(), [request] * 3)
    torch.testing.assert_close(q[:3], expected, atol=1e-5, rtol=0)
    assert torch.all(q[3] == 0)
    drafts = torch.tensor(tree.draft_token_ids)
    assert torch.all(q[torch.arange(3), drafts] > 0), "drafts are drawn from q's support"
    # The draft now holds K/V for the context up to the second-to-last draft.
    assert runner.num_valid_tokens("r") == len(prompt) + 2


def test_draft_cache_shares_the_kv_memory_budget(
    tiny_llama_dir: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    """The draft's cache has one block per target block: a KV budget pays for both."""

    def num_blocks(spec: SpeculativeConfig) -> int:
        config = EngineConfig(
            model=ModelConfig(model=str(tiny_llama_dir), dtype="float64"),
            cache=CacheConfig(block_size=8, kv_cache_memory=1 << 20),
            speculative=spec,
            separate_process=False,
        )
        return EngineCore(config).runner.num_blocks

    plain = num_blocks(SpeculativeConfig())
    # llama: 2 layers x 2 KV heads x 16 dims; qwen3: 2 layers x 2 KV heads x 32 dims.
    assert num_blocks(draft_spec(tiny_llama_dir)) == plain // 2
    assert num_blocks(draft_spec(tiny_model_dirs["qwen3"])) == plain // 3
    # The synthetic drafter shares the target's own cache: no extra memory.
    synthetic = SpeculativeConfig(policy="fixed", method="synthetic", num_speculative_tokens=2)
    assert num_blocks(synthetic) == plain


# ---- synthetic ----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [1.0, 0.0, 0.5])
def test_synthetic_acceptance_rate(
    rate: float,
    tiny_llama_dir: Path,
    prompts: list[list[int]],
    plain_greedy: list[list[int]],
) -> None:
    spec = SpeculativeConfig(
        policy="fixed", method="synthetic", acceptance_rate=rate, num_speculative_tokens=4
    )
    engine = make_engine(tiny_llama_dir, spec, budget=BUDGET)
    assert tokens_of(engine.generate(prompts, GREEDY)) == plain_greedy
    stats = engine.core.stats()
    assert stats.num_draft_tokens > 0
    if rate == 1.0:
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    elif rate == 0.0:
        assert stats.num_accepted_tokens == 0
    else:
        first = stats.accepted_per_position[0] / stats.num_drafts
        assert 0.3 < first < 0.7, first


# ---- start-up checks ----------------------------------------------------------------------


def test_tokenizer_mismatch_is_a_clear_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer(vocab_size=300)
    other = tmp_path / "other-vocab"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match="vocabulary sizes differ") as info:
        make_engine(tiny_llama_dir, draft_spec(other))
    assert str(other) in str(info.value) and str(tiny_llama_dir) in str(info.value)


def test_eos_mismatch_is_a_clear_error() -> None:
    tok = make_tokenizer()
    with pytest.raises(ValueError, match=r"EOS token ids differ \(target \[2\], draft \[0, 2\]\)"):
        check_same_tokenizer("big", tok, frozenset({2}), "small", tok, frozenset({0, 2}))
    check_same_tokenizer("big", tok, frozenset({2}), "small", make_tokenizer(), frozenset({2}))
