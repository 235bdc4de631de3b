"""Tree masks as int32 ancestor bit words: the format `tree_attention` reads (plain torch).

Row i of a request with n new tokens holds W = ceil(n / 32) int32 words (at least 1); bit j of
word j // 32 is set when new token j is an ancestor-or-self of token i. Nodes are in
topological order (parent < child), so every set bit has j <= i. Causal rows (prefill chunks,
chains, plain decode) are the same format with bits 0..i set, which lets one masked launch
serve a batch that mixes trees with other requests.

No triton here: the model runner builds masks once per step on any device.
"""

from __future__ import annotations

import torch

# bit b of a word -> its value; packing goes through int64 and wraps bit 31 to the sign.
_BIT_VALUES = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)


def num_words(q_len: int) -> int:
    """Words per row for requests of up to q_len new tokens (at least one)."""
    return max(1, (q_len + 31) // 32)


def pack_mask_words(dense: torch.Tensor, words: int | None = None) -> torch.Tensor:
    """bool [n, n] (row i sees new token j) -> int32 [n, W] bit words, W = num_words(n) unless
    given (a batch pads every request to its widest). Stays on dense's device."""
    assert dense.dim() == 2 and dense.shape[0] == dense.shape[1], tuple(dense.shape)
    n = dense.shape[0]
    words = num_words(n) if words is None else words
    assert words * 32 >= n, f"{words} words cannot hold {n} columns"
    bits = torch.zeros(n, words * 32, dtype=torch.int64, device=dense.device)
    bits[:, :n] = dense.to(torch.int64)
    packed = (bits.view(n, words, 32) * _BIT_VALUES.to(dense.device)).sum(-1)  # [0, 2^32)
    return _wrap_int32(packed)


def _wrap_int32(packed: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> int32 with the same bits."""
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _causal_rows(local: torch.Tensor, words: int) -> torch.Tensor:
    """int64 [T] row index within its request -> int32 [T, W] words with bits 0..i set."""
    # word w holds min(32, max(0, i + 1 - 32 w)) low bits: (1 << k) - 1, in int64 (k = 32 ok).
    k = (local[:, None] + 1 - 32 * torch.arange(words, device=local.device)[None, :]).clamp(0, 32)
    return _wrap_int32((1 << k) - 1)


def causal_mask_words(
    n: int, words: int | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int32 [n, W]: row i sees new tokens 0..i (a chain, a prefill chunk, or decode)."""
    return _causal_rows(torch.arange(n, device=device), num_words(n) if words is None else words)


def batch_mask_words(
    query_lens: list[int],
    tree_masks: list[torch.Tensor | None],
    words: int | None = None,
) -> torch.Tensor:
    """Mask words for every row of a flattened batch (host tensor, int32 [sum(query_lens), W]).

    tree_masks[r]: bool [n_r, n_r] ancestor-or-self mask of request r, or None = causal. W =
    num_words(max(query_lens)) unless given. Causal rows are built in one vectorised pass; only
    tree requests are packed one by one.
    """
    assert len(query_lens) == len(tree_masks), (len(query_lens), len(tree_masks))
    words = num_words(max(query_lens, default=0)) if words is None else words
    lens = torch.tensor(query_lens, dtype=torch.int64)
    starts = torch.cumsum(lens, 0) - lens
    total = int(lens.sum())
    local = torch.arange(total) - torch.repeat_interleave(starts, lens)
    out = _causal_rows(local, words)
    for r, tree in enumerate(tree_masks):
        if tree is None:
            continue
        n, s = query_lens[r], int(starts[r])
        assert tuple(tree.shape) == (n, n), f"request {r}: tree mask {tuple(tree.shape)}, q_len {n}"
        out[s : s + n] = pack_mask_words(tree.cpu(), words)
    return out


def ancestor_words(parents: list[int], words: int | None = None) -> torch.Tensor:
    """Topologically ordered parent list (parents[0] = -1, parents[i] < i) -> int32 [n, W]
    ancestor-or-self bit words, W = num_words(n) unless given."""
    n = len(parents)
    dense = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if i > 0 and not 0 <= p < i:
            raise ValueError(f"parents must be topological (0 <= parent < index): node {i} -> {p}")
        if i > 0:
            dense[i] = dense[p]
        dense[i, i] = True
    return pack_mask_words(dense, words)


def tree_mask_dense(mask_words: torch.Tensor, q_len: int) -> torch.Tensor:
    """[q_len, W] int32 ancestor words -> [q_len, q_len] bool (row i sees new token j)."""
    j = torch.arange(q_len, device=mask_words.device)
    words = mask_words[:, j // 32].to(torch.int64)  # [q_len, q_len]
    return ((words >> (j % 32)) & 1).bool()
