"""The torch and CPU-kernel paged-attention backends against a dense per-request reference,
and the bitwise properties speculation relies on, for each."""

from __future__ import annotations

import random

import pytest
import torch

from server.model import attention_cpu
from server.model.attention import AttentionBackend, TorchAttentionBackend, build_attention_metadata
from server.model.attention_backends import get_attention_backend

HQ, HK, D, BS, NB = 6, 2, 16, 4, 64
# The per-request backends whose rows must be bitwise those of plain decoding on CPU.
CPU_BACKENDS = ["torch", "cpu"]


def make_backend(name: str) -> AttentionBackend:
    """torch: per request (the CPU default before the kernel); cpu: specd's paged kernel."""
    if name == "torch":
        return TorchAttentionBackend(batch_decode=False)
    kernel = attention_cpu.load()
    if kernel is None:
        pytest.skip("no AVX2 attention kernel here")
    return attention_cpu.CpuAttentionBackend(kernel)


def _reference(q, k, v, k_cache, v_cache, query_lens, prefix_lens, block_ids, trees, scale):
    """Per request: keys = cached prefix (read back from blocks) + new keys; dense softmax."""
    out, row = [], 0
    for b, (n, p) in enumerate(zip(query_lens, prefix_lens, strict=True)):
        slots = [block_ids[b][i // BS] * BS + i % BS for i in range(p)]
        kp = k_cache.view(-1, HK, D)[slots]
        vp = v_cache.view(-1, HK, D)[slots]
        kk = torch.cat([kp, k[row : row + n]]).repeat_interleave(HQ // HK, dim=1)  # [p+n, HQ, D]
        vv = torch.cat([vp, v[row : row + n]]).repeat_interleave(HQ // HK, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[row : row + n].double(), kk.double()) * scale
        allowed = torch.ones(n, p + n, dtype=torch.bool)
        new = torch.tril(torch.ones(n, n, dtype=torch.bool)) if trees[b] is None else trees[b]
        allowed[:, p:] = new
        s = s.masked_fill(~allowed, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vv.double()))
        row += n
    return torch.cat(out)


def _tree(n: int, rng: random.Random) -> torch.Tensor:
    """A random token tree of n nodes in topological order: ancestor-or-self mask [n, n]."""
    parent = [-1] + [rng.randrange(i) for i in range(1, n)]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parent[j]
    return mask


@pytest.mark.parametrize(
    "query_lens,prefix_lens,with_trees",
    [
        ([7], [0], False),  # fresh prefill
        ([5], [9], False),  # chunk after a prefix
        ([1, 1, 1], [3, 17, 8], False),  # batched decode
        ([20, 1, 3, 1], [0, 30, 5, 0], False),  # mixed prefill + decode
        ([4, 1, 6], [11, 2, 7], True),  # speculative trees
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["per_request", "batched", "cpu"])
def test_backends_match_the_reference(query_lens, prefix_lens, with_trees, dtype, mode):
    rng = random.Random(0)
    torch.manual_seed(0)
    free = list(range(NB))
    rng.shuffle(free)
    block_ids = [
        [free.pop() for _ in range(-(-(p + n) // BS))]
        for n, p in zip(query_lens, prefix_lens, strict=True)
    ]
    trees = [_tree(n, rng) if with_trees and n > 1 else None for n in query_lens]
    k_cache = torch.randn(NB, BS, HK, D, dtype=dtype)
    v_cache = torch.randn(NB, BS, HK, D, dtype=dtype)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    t = sum(query_lens)
    q, k, v = (torch.randn(t, h, D, dtype=dtype) for h in (HQ, HK, HK))
    meta = build_attention_metadata(
        query_lens,
        prefix_lens,
        block_ids,
        BS,
        torch.device("cpu"),
        trees if with_trees else None,
    )
    # cpu with float64 exercises its fallback to the torch backend (the kernel is float32).
    backend = TorchAttentionBackend(batch_decode=True) if mode == "batched" else make_backend(mode)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, D**-0.5)
    ref = _reference(
        q, k, v, before_k, before_v, query_lens, prefix_lens, block_ids, trees, D**-0.5
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    # The new K/V landed in their slots.
    torch.testing.assert_close(k_cache.view(-1, HK, D)[meta.slot_mapping], k)
    torch.testing.assert_close(v_cache.view(-1, HK, D)[meta.slot_mapping], v)


def test_negative_slots_are_not_written():
    k_cache = torch.zeros(NB, BS, HK, D)
    v_cache = torch.zeros(NB, BS, HK, D)
    meta = build_attention_metadata([3], [0], [[5]], BS, torch.device("cpu"))
    meta.slot_mapping[1] = -1
    q, k, v = torch.randn(3, HQ, D), torch.randn(3, HK, D), torch.randn(3, HK, D)
    TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 1.0)
    assert k_cache[5, 1].abs().sum() == 0 and k_cache[5, 0].abs().sum() > 0


def test_backend_registry(monkeypatch: pytest.MonkeyPatch):
    # Without the interpreter, "triton" on CPU is an error (tests/conftest.py sets it).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    expected = "cpu" if attention_cpu.load() is not None else "torch"
    assert get_attention_backend("auto", cpu).name == expected
    assert get_attention_backend("torch", cpu).name == "torch"
    with pytest.raises(ValueError, match="triton"):
        get_attention_backend("triton", cpu)
    with pytest.raises(ValueError, match="unknown"):
        get_attention_backend("flash", cpu)


def _decode_reference(
    q_row: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_size: int, backend: str
) -> torch.Tensor:
    """Plain decoding of one token whose visible keys are ``keys`` / ``values`` [L, Hk, D],
    laid out at positions 0..L-1 of a fresh paged cache (the last one is the token's own)."""
    L, hk, d = keys.shape
    nblk = -(-L // block_size)
    k_cache = torch.zeros(nblk, block_size, hk, d, dtype=keys.dtype)
    v_cache = torch.zeros_like(k_cache)
    k_cache.view(-1, hk, d)[: L - 1] = keys[:-1]
    v_cache.view(-1, hk, d)[: L - 1] = values[:-1]
    meta = build_attention_metadata(
        [1], [L - 1], [list(range(nblk))], block_size, torch.device("cpu"), prompt_lens=[L - 1]
    )
    return make_backend(backend).forward(
        q_row[None], keys[-1:], values[-1:], k_cache, v_cache, meta, 0.125
    )[0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("prefix", [5, 37, 130])
def test_verify_rows_attend_bitwise_as_plain_decoding(
    tree: bool, prefix: int, backend: str
) -> None:
    """Each verify row's attention equals, bit for bit, plain decoding of its token at its
    position over the same keys: the property that keeps speculative greedy outputs those
    of plain decoding under int4 weights (whose bf16 input rounding amplifies last bits)."""
    g = torch.Generator().manual_seed(prefix)
    hq, hk, d, bs = 9, 3, 64, 16
    parents = [-1, 0, 1, 1, 0, 4, 2] if tree else [-1, 0, 1, 2, 3, 4, 5]
    n = len(parents)
    nblk = -(-(prefix + n) // bs)
    k_cache = torch.randn(nblk, bs, hk, d, generator=g)
    v_cache = torch.randn(nblk, bs, hk, d, generator=g)
    q = torch.randn(n, hq, d, generator=g)
    k = torch.randn(n, hk, d, generator=g)
    v = torch.randn(n, hk, d, generator=g)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    meta = build_attention_metadata(
        [n], [prefix], [list(range(nblk))], bs, torch.device("cpu"),
        tree_masks=[mask if tree else None], verify_rows=[True],
    )  # fmt: skip
    out = make_backend(backend).forward(q, k, v, k_cache, v_cache, meta, 0.125)
    flat_k, flat_v = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
    for i in range(n):
        visible = list(range(prefix)) + [prefix + j for j in mask[i].nonzero().squeeze(1).tolist()]
        expect = _decode_reference(q[i], flat_k[visible], flat_v[visible], bs, backend)
        assert torch.equal(out[i], expect), f"row {i} differs from plain decoding"


def _chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cuts: list[int],
    prompt_len: int,
    block_size: int,
    backend: str,
) -> torch.Tensor:
    """One request's rows 0..len(q) - 1 computed in chunks ending at ``cuts`` (the last cut is
    len(q)), each chunk a step over a paged cache holding the earlier ones."""
    n, hk, d = k.shape
    nblk = -(-n // block_size)
    k_cache = torch.zeros(nblk, block_size, hk, d)
    v_cache = torch.zeros_like(k_cache)
    out, start = [], 0
    for stop in cuts:
        meta = build_attention_metadata(
            [stop - start], [start], [list(range(nblk))], block_size, torch.device("cpu"),
            prompt_lens=[prompt_len],
        )  # fmt: skip
        rows = slice(start, stop)
        out.append(
            make_backend(backend).forward(q[rows], k[rows], v[rows], k_cache, v_cache, meta, 0.125)
        )
        start = stop
    return torch.cat(out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("prompt_len", [200, 150])
def test_prompt_rows_attend_the_same_whatever_the_chunking(prompt_len: int, backend: str) -> None:
    """A request's attention outputs, bit for bit, whether its rows came in one chunk or cut
    at block boundaries (the scheduler's cuts), and rows past the prompt (generated tokens
    recomputed after a preemption) exactly as decoding computed them: so plain decoding does
    not depend on what a request was batched with, nor speculation on how the prompt was
    scheduled. (Attending a chunk's rows with the chunk's own keys, as before, failed this.)"""
    g = torch.Generator().manual_seed(prompt_len)
    hq, hk, d, bs, n = 9, 3, 64, 16, 200
    q = torch.randn(n, hq, d, generator=g)
    k = torch.randn(n, hk, d, generator=g)
    v = torch.randn(n, hk, d, generator=g)
    whole = _chunked_attention(q, k, v, [n], prompt_len, bs, backend)
    for cuts in ([64, 128, n], [16, n], [96, 176, n], [144, 160, 170, n]):
        if any(c < prompt_len and c % bs for c in cuts):
            continue  # the scheduler cuts prompts at block boundaries only
        chunked = _chunked_attention(q, k, v, cuts, prompt_len, bs, backend)
        assert torch.equal(chunked, whole), f"cut at {cuts}"
    for r in range(prompt_len, n):
        decoded = _decode_reference(q[r], k[: r + 1], v[: r + 1], bs, backend)
        assert torch.equal(whole[r], decoded), r
