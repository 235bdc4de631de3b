"""The Triton attention backend against the torch backend, alone and inside the whole engine.

On CPU the kernels run under TRITON_INTERPRET=1 (set in tests/conftest.py): shapes stay tiny.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch

from kernels.tree_masks import ancestor_words, tree_mask_dense
from server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from server.engine.offline import OfflineEngine
from server.engine.sampling_params import SamplingParams
from server.model.attention import TorchAttentionBackend, build_attention_metadata
from server.model.attention_backends import get_attention_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HQ, HK, D, BS, NB = 6, 2, 16, 4, 48


def _tree(n: int, rng: random.Random) -> torch.Tensor:
    """bool [n, n] ancestor-or-self mask of a random topologically ordered tree."""
    parents = [-1] + [rng.randrange(i) for i in range(1, n)]
    return tree_mask_dense(ancestor_words(parents), n)


def _triton() -> object:
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 set before triton is imported")
    return get_attention_backend("triton", DEVICE)


def test_registry_picks_triton_only_when_it_can_run() -> None:
    backend = _triton()
    assert backend.name == "triton"
    # "auto" never picks the interpreter: on CPU it is specd's CPU kernel (or torch).
    expected = ("triton",) if DEVICE.type == "cuda" else ("torch", "cpu")
    assert get_attention_backend("auto", DEVICE).name in expected


@pytest.mark.parametrize(
    "query_lens,prefix_lens,trees",
    [
        # prefill chunk after an unaligned prefix, decodes (one at prefix 0), a tree, a chain
        ([9, 1, 1, 7, 3], [5, 13, 0, 6, 10], [None, None, None, "tree", None]),
        # no tree anywhere: the causal launch without mask words
        ([6, 1, 2], [0, 21, 3], [None, None, None]),
        # a tree wider than one mask word next to short requests
        ([1, 35, 2], [7, 3, 0], [None, "tree", "tree"]),
    ],
    ids=["mixed", "causal", "two-words"],
)
def test_backend_matches_torch_backend(
    query_lens: list[int], prefix_lens: list[int], trees: list[str | None]
) -> None:
    triton_backend = _triton()
    rng = random.Random(sum(query_lens))
    gen = torch.Generator().manual_seed(len(query_lens))
    free = list(range(NB))
    rng.shuffle(free)  # scattered blocks: any indexing mistake reads another request's K/V
    block_ids = [
        [free.pop() for _ in range(-(-(p + n) // BS))]
        for n, p in zip(query_lens, prefix_lens, strict=True)
    ]
    masks = [_tree(n, rng) if kind else None for n, kind in zip(query_lens, trees, strict=True)]
    cache = torch.randn(2, NB, BS, HK, D, generator=gen)  # prefixes hold random K/V
    t = sum(query_lens)
    q, k, v = (torch.randn(t, h, D, generator=gen).to(DEVICE) for h in (HQ, HK, HK))
    outs, caches = [], []
    for backend in (TorchAttentionBackend(), triton_backend):
        meta = build_attention_metadata(
            query_lens, prefix_lens, block_ids, BS, DEVICE, masks if any(trees) else None
        )
        kv = cache.clone().to(DEVICE)
        backend.prepare(meta)
        # two "layers" share one prepare, as in the model
        for _ in range(2):
            out = backend.forward(q, k, v, kv[0], kv[1], meta, D**-0.5)
        outs.append(out)
        caches.append(kv)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1], caches[0], atol=0, rtol=0)


def test_engine_greedy_tokens_match_torch_backend(tiny_llama_dir: Path) -> None:
    """The whole engine (chunked prefill mixed with decode) gives the same greedy tokens with
    either backend. Under the interpreter: 2 prompts, 10 new tokens."""
    _triton()
    prompts = [[5, 17, 42, 7, 99, 23, 61, 11, 8, 30, 77, 12, 4, 56, 19, 33, 90, 21, 6], [9, 14, 3]]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    tokens = {}
    for name in ("torch", "triton"):
        engine = OfflineEngine(
            EngineConfig(
                model=ModelConfig(model=str(tiny_llama_dir), dtype="float32"),
                attention_backend=name,
                separate_process=False,
                cache=CacheConfig(block_size=8, num_blocks=64),
                # budget 16 < the 19-token prompt: a chunked prefill shares steps with decode
                scheduler=SchedulerConfig(max_num_batched_tokens=16),
            )
        )
        assert engine.core.runner.model.backend.name == name
        t0 = time.perf_counter()
        tokens[name] = [c.token_ids for c in engine.generate(prompts, params)]
        print(f"{name}: {time.perf_counter() - t0:.1f} s")
    assert all(len(t) == 10 for t in tokens["torch"])
    assert tokens["triton"] == tokens["torch"]


def test_engine_triton_with_tree_speculation_matches_torch_without(tiny_llama_dir: Path) -> None:
    """Tree verification through the Triton kernel (masks, compaction) keeps greedy output."""
    from server.config import SpeculativeConfig

    model_dir = tiny_llama_dir
    body = list(range(40, 52))
    prompts = [body * 3, [7, 9, 11] * 5]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def run(backend: str, spec: SpeculativeConfig) -> tuple[list[list[int]], int]:
        engine = OfflineEngine(
            EngineConfig(
                model=ModelConfig(model=str(model_dir), dtype="float32"),
                cache=CacheConfig(block_size=8, num_blocks=64),
                scheduler=SchedulerConfig(max_num_batched_tokens=32),
                speculative=spec,
                attention_backend=backend,  # type: ignore[arg-type]
                separate_process=False,
            )
        )
        out = [r.token_ids for r in engine.generate(prompts, params)]
        return out, engine.core.stats().num_draft_tokens

    plain, _ = run("torch", SpeculativeConfig())
    tree = SpeculativeConfig(
        policy="fixed", method="tree", num_speculative_tokens=6, max_tree_width=3
    )
    got, drafted = run("triton", tree)
    assert drafted > 0
    assert got == plain
