"""specd's CPU paged-attention kernel (kernels/cpu/paged_attention.cpp) against plain torch, and
the backend's fallbacks. The backend's bitwise properties (verify rows = decode rows, prompt
rows whatever the chunking) are tested beside the torch backend's in test_attention.py."""

from __future__ import annotations

import pytest
import torch

from server.model import attention_cpu
from server.model.attention import build_attention_metadata

kernel = attention_cpu.load()
needs_kernel = pytest.mark.skipif(kernel is None, reason="no AVX2 attention kernel here")


def _reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: list[list[int]],
    scale: float,
) -> torch.Tensor:
    """float64 softmax attention of each row over its key slots, grouped-query heads."""
    hq, hk = q.shape[1], k_cache.shape[2]
    flat_k = k_cache.reshape(-1, hk, k_cache.shape[3]).double()
    flat_v = v_cache.reshape(-1, hk, v_cache.shape[3]).double()
    out = []
    for t, slots in enumerate(rows):
        kk = flat_k[slots].repeat_interleave(hq // hk, dim=1)  # [L, Hq, D]
        vv = flat_v[slots].repeat_interleave(hq // hk, dim=1)
        s = torch.einsum("hd,lhd->hl", q[t].double(), kk) * scale
        out.append(torch.einsum("hl,lhd->hd", s.softmax(-1), vv))
    return torch.stack(out)


def _call(q, k_cache, v_cache, rows: list[list[int]], scale: float) -> torch.Tensor:
    assert kernel is not None
    slots = torch.tensor([s for r in rows for s in r], dtype=torch.int64)
    starts = torch.tensor([0] + [len(r) for r in rows], dtype=torch.int64).cumsum(0)
    return kernel.paged_attention(q, k_cache, v_cache, slots, starts, scale)


@needs_kernel
@pytest.mark.parametrize("hq,hk,d", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
def test_matches_softmax_attention_in_float64(hq: int, hk: int, d: int) -> None:
    g = torch.Generator().manual_seed(d)
    nb, bs = 12, 16
    k_cache = torch.randn(nb, bs, hk, d, generator=g)
    v_cache = torch.randn(nb, bs, hk, d, generator=g)
    # Rows of 1 to all keys, in scattered and repeated slots (a tree row's keys are any list).
    rows = [torch.randperm(nb * bs, generator=g)[:n].tolist() for n in (1, 7, 64, 150, nb * bs)]
    rows.append([3, 3, 50, 7])
    q = torch.randn(len(rows), hq, d, generator=g) * 3
    out = _call(q, k_cache, v_cache, rows, d**-0.5)
    ref = _reference(q, k_cache, v_cache, rows, d**-0.5)
    assert out.dtype == torch.float32 and out.shape == (len(rows), hq, d)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_row_does_not_depend_on_the_other_rows_or_threads() -> None:
    """What makes a verify row equal the decode row it stands for: its result depends only on
    its query and its keys, bit for bit, whatever else the call holds."""
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(20, 16, 3, 64, generator=g)
    v_cache = torch.randn(20, 16, 3, 64, generator=g)
    rows = [list(range(n)) for n in (5, 100, 301, 2, 77)]
    q = torch.randn(len(rows), 9, 64, generator=g)
    together = _call(q, k_cache, v_cache, rows, 0.125)
    for t, r in enumerate(rows):
        assert torch.equal(_call(q[t : t + 1], k_cache, v_cache, [r], 0.125)[0], together[t])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(_call(q, k_cache, v_cache, rows, 0.125), together)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_bad_inputs_raise() -> None:
    k_cache = torch.randn(2, 4, 1, 8)
    q = torch.randn(1, 2, 8)
    with pytest.raises(RuntimeError, match="out of the cache"):
        _call(q, k_cache, k_cache, [[0, 8]], 1.0)
    with pytest.raises(RuntimeError, match="at least one key"):
        _call(q, k_cache, k_cache, [[]], 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        _call(q.double(), k_cache, k_cache, [[0]], 1.0)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        _call(torch.randn(1, 3, 8), torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8), [[0]], 1.0)


@needs_kernel
def test_a_bfloat16_model_falls_back_to_torch() -> None:
    assert kernel is not None
    backend = attention_cpu.CpuAttentionBackend(kernel)
    cache = torch.zeros(4, 4, 1, 8, dtype=torch.bfloat16)
    meta = build_attention_metadata([1], [3], [[0]], 4, torch.device("cpu"), prompt_lens=[3])
    q = torch.randn(1, 2, 8, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 8, dtype=torch.bfloat16)
    out = backend.forward(q, k, k, cache, cache.clone(), meta, 1.0)
    assert out.shape == (1, 2, 8) and out.dtype == torch.bfloat16
    assert backend.kernel is None  # from now on the torch backend's path


def test_without_the_kernel_auto_is_torch_and_cpu_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.model.attention_backends import get_attention_backend

    monkeypatch.setattr(attention_cpu, "load", lambda: None)
    cpu = torch.device("cpu")
    assert get_attention_backend("auto", cpu).name == "torch"
    with pytest.raises(ValueError, match="attention backend 'cpu' needs"):
        get_attention_backend("cpu", cpu)
