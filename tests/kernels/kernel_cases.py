"""Builders for paged-cache test cases (random trees, shuffled block tables, mask words)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_parents(n: int, gen: torch.Generator) -> list[int]:
    """Topologically ordered random tree: node 0 is the root, parent[i] < i."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]


def chain_parents(n: int) -> list[int]:
    return [i - 1 for i in range(n)]


def star_parents(n: int) -> list[int]:
    return [-1] + [0] * (n - 1)


def mask_words_of(parents: list[int], words: int) -> torch.Tensor:
    """[n, words] int32: bit j of word j // 32 in row i = j is an ancestor-or-self of i."""
    n = len(parents)
    bits = torch.zeros(n, words * 32, dtype=torch.bool)
    for i in range(n):
        a = i
        while a >= 0:
            bits[i, a] = True
            a = parents[a]
    weights = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)
    packed = (bits.view(n, words, 32).long() * weights).sum(-1)  # [n, words] in [0, 2^32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


@dataclass
class Case:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [NB, BS, Hkv, D]
    v_cache: torch.Tensor
    cu_q: torch.Tensor  # int32 [R + 1]
    prefix_lens: torch.Tensor  # int32 [R]
    block_tables: torch.Tensor  # int32 [R, MB]
    mask_words: torch.Tensor | None  # int32 [T, W]

    def args(self) -> tuple:
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.cu_q,
            self.prefix_lens,
            self.block_tables,
            self.mask_words,
        )

    def kv(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous K/V [kv_len, Hkv, D] of request r, gathered through its block table."""
        bs = self.k_cache.shape[1]
        n = int(self.prefix_lens[r]) + int(self.cu_q[r + 1] - self.cu_q[r])
        pos = torch.arange(n, device=self.q.device)
        blocks = self.block_tables[r, pos // bs].long()
        return self.k_cache[blocks, pos % bs], self.v_cache[blocks, pos % bs]


def make_case(
    *,
    q_lens: list[int],
    prefixes: list[int],
    hq: int = 4,
    hkv: int = 1,
    d: int = 64,
    bs: int = 8,
    dtype: torch.dtype = torch.float16,
    trees: list[list[int]] | None = None,
    device: str = "cpu",
    seed: int = 0,
    words: int | None = None,
) -> Case:
    """Random paged case. Block tables are a random permutation of the pool (plus spare blocks
    that hold garbage), so any indexing mistake reads wrong data."""
    gen = torch.Generator().manual_seed(seed)
    r = len(q_lens)
    kv_lens = [p + n for p, n in zip(prefixes, q_lens, strict=True)]
    mb = max(1, max((k + bs - 1) // bs for k in kv_lens))
    nb = r * mb + 3
    perm = torch.randperm(nb, generator=gen)[: r * mb].view(r, mb).to(torch.int32)
    k_cache = torch.randn(nb, bs, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(nb, bs, hkv, d, generator=gen).to(dtype)
    t = sum(q_lens)
    q = torch.randn(t, hq, d, generator=gen).to(dtype)
    cu = torch.zeros(r + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens).cumsum(0)
    mask = None
    if trees is not None:
        w = words or max(1, (max(q_lens) + 31) // 32)
        mask = torch.cat([mask_words_of(p, w) for p in trees]) if t else torch.zeros(0, w)
        mask = mask.to(torch.int32)
    to = (lambda x: x.to(device)) if device != "cpu" else (lambda x: x)
    return Case(
        to(q),
        to(k_cache),
        to(v_cache),
        to(cu),
        to(torch.tensor(prefixes, dtype=torch.int32)),
        to(perm),
        to(mask) if mask is not None else None,
    )
