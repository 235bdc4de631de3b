"""specd's CPU top-k kernel (kernels/cpu/top_k.cpp) against torch's topk and softmax, and its
fallback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from server.model import int4_avx2, top_k_cpu

kernel = top_k_cpu.load()
needs_kernel = pytest.mark.skipif(kernel is None, reason="no AVX2 top-k kernel here")


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = int4_avx2.kernel_threads()
    yield
    int4_avx2.set_kernel_threads(before)


@needs_kernel
@pytest.mark.parametrize("vocab", [7, 13, 64, 1000, 49157])
@pytest.mark.parametrize("k", [1, 3, 8, 64])
def test_matches_torch_topk_and_softmax(vocab: int, k: int) -> None:
    """Vocabularies with and without a tail past the last vector of 8; k up to the kernel's
    most (and past a small vocabulary: clamped to it)."""
    g = torch.Generator().manual_seed(vocab * 100 + k)
    for rows in (1, 3, 70):
        logits = torch.randn(rows, vocab, generator=g) * 4
        ids, probs = top_k_cpu.top_k_probs(logits, k)
        kk = min(k, vocab)
        expect = torch.topk(logits, kk, dim=-1)
        assert ids.dtype == torch.int32 and ids.shape == (rows, kk)
        assert ids.tolist() == expect.indices.tolist()
        reference = torch.softmax(logits.double(), -1).gather(1, expect.indices).float()
        # float32 sums of up to ~50k exponentials: a few 1e-6 relative.
        torch.testing.assert_close(probs, reference, rtol=2e-5, atol=1e-8)


@needs_kernel
def test_ties_keep_the_lower_index_and_a_dominant_logit_takes_all_the_mass() -> None:
    flat = torch.zeros(1, 21)
    ids, probs = top_k_cpu.top_k_probs(flat, 3)
    assert ids.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(probs, torch.full((1, 3), 1 / 21))
    peaked = torch.full((1, 50), -30.0)
    peaked[0, 41] = 30.0
    ids, probs = top_k_cpu.top_k_probs(peaked, 2)
    assert ids[0, 0] == 41 and probs[0, 0] == pytest.approx(1.0) and probs[0, 1] < 1e-20


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3])
def test_rows_are_the_same_on_any_number_of_kernel_threads(restore_threads, threads) -> None:
    logits = torch.randn(37, 3001, generator=torch.Generator().manual_seed(1))
    int4_avx2.set_kernel_threads(1)
    expected = top_k_cpu.top_k_probs(logits, 8)
    int4_avx2.set_kernel_threads(threads)
    for _ in range(20):
        got = top_k_cpu.top_k_probs(logits, 8)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_without_the_kernel_torch_computes_the_same(monkeypatch) -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(top_k_cpu, "load", lambda: None)
    ids, probs = top_k_cpu.top_k_probs(logits, 5)
    expect = torch.topk(logits, 5, dim=-1)
    assert ids.dtype == torch.int32 and ids.tolist() == expect.indices.tolist()
    torch.testing.assert_close(probs, torch.softmax(logits, -1).gather(1, expect.indices))
