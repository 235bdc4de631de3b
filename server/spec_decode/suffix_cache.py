"""A cross-request suffix cache: earlier requests' prompts and outputs, indexed for drafting.

The idea behind SuffixDecoding and Lookahead's trie retrieval: serving traffic repeats itself
across requests (agents re-reading the same tools, templated answers, code), so the tokens that
followed the current context's suffix in *another* request are good drafts. Finished requests'
token sequences (prompt + output) go into a bounded store, evicted least-recently-used, with an
index from every bigram to where it occurred. A lookup takes the context's last two tokens,
measures how far back each occurrence matches, and returns the continuations with their match
lengths, newest first; ``server/spec_decode/suffix_drafter.py`` merges them with the request's
own matches into one tree.

Memory is capped (``max_bytes``): the count below is the store's own estimate (token arrays
plus index entries), which a test holds against tracemalloc's measurement.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np

# Occurrences kept per bigram, newest last: a common bigram ("of the") must not grow without
# bound, and old occurrences of it predict little.
_MAX_POSITIONS_PER_KEY = 32
# Estimated bytes per index entry (a list slot + an int object) and per distinct key (a dict
# slot, the key int and an empty list), CPython 3.11 on 64-bit; checked by a tracemalloc test.
_BYTES_PER_ENTRY = 40
_BYTES_PER_KEY = 200
# Per stored sequence: the numpy array header and the LRU dict slot.
_BYTES_PER_SEQUENCE = 250
_TOKEN_BITS = 32


def _key(a: int, b: int) -> int:
    return (a << _TOKEN_BITS) | b


def _entries(seq_id: int, arr: np.ndarray) -> Iterator[tuple[int, int]]:
    """(bigram key, packed (sequence, end position)) of every index entry of a sequence:
    position e indexes the bigram ending at e; only e < len - 1 has a token after it."""
    values = arr.tolist()
    base = seq_id << _TOKEN_BITS
    for end in range(1, len(values) - 1):
        yield _key(values[end - 1], values[end]), base | end


class SuffixCache:
    def __init__(self, max_bytes: int, max_sequence_tokens: int = 16384) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        # A sequence longer than this keeps only its last tokens (a long prompt's tail is what
        # a similar request's output would continue).
        self.max_sequence_tokens = max_sequence_tokens
        self._sequences: OrderedDict[int, np.ndarray] = OrderedDict()
        self._index: dict[int, list[int]] = {}
        self._next_id = 0
        self._entries = 0
        self._tokens = 0
        self.num_added = 0
        self.num_evicted = 0

    # ---- size ---------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Estimated bytes held (token arrays, index entries and keys)."""
        return (
            4 * self._tokens
            + _BYTES_PER_ENTRY * self._entries
            + _BYTES_PER_KEY * len(self._index)
            + _BYTES_PER_SEQUENCE * len(self._sequences)
        )

    @property
    def num_sequences(self) -> int:
        return len(self._sequences)

    # ---- adding and evicting ------------------------------------------------------------

    def add(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Stores one finished request's tokens and evicts the least recently used until
        the cache fits its cap (a sequence larger than the cap alone is not stored)."""
        arr = np.asarray(tokens, dtype=np.int64)[-self.max_sequence_tokens :].astype(np.int32)
        if len(arr) < 3:
            return  # no bigram with a token after it
        if self._size_of(len(arr)) > self.max_bytes:
            return
        seq_id = self._next_id
        self._next_id += 1
        self._sequences[seq_id] = arr
        self._tokens += len(arr)
        for key, packed in _entries(seq_id, arr):
            positions = self._index.get(key)
            if positions is None:
                positions = self._index[key] = []
            positions.append(packed)
            self._entries += 1
            if len(positions) > _MAX_POSITIONS_PER_KEY:
                positions.pop(0)
                self._entries -= 1
        self.num_added += 1
        while self.nbytes > self.max_bytes and len(self._sequences) > 1:
            self._evict_oldest()

    def _size_of(self, num_tokens: int) -> int:
        return (4 + _BYTES_PER_ENTRY + _BYTES_PER_KEY) * num_tokens + _BYTES_PER_SEQUENCE

    def _evict_oldest(self) -> None:
        seq_id, arr = self._sequences.popitem(last=False)
        self._tokens -= len(arr)
        for key, packed in _entries(seq_id, arr):
            positions = self._index.get(key)
            if positions is None:
                continue
            try:
                positions.remove(packed)
            except ValueError:
                continue  # already pushed out by newer occurrences of a common bigram
            self._entries -= 1
            if not positions:
                del self._index[key]
        self.num_evicted += 1

    # ---- lookup -------------------------------------------------------------------------

    def matches(
        self, context: np.ndarray, count: int, max_match: int, limit: int
    ) -> list[tuple[list[int], int]]:
        """Up to ``limit`` (continuation of up to ``count`` tokens, match length) for stored
        occurrences of the context's last two tokens, newest first. The match length counts
        how many trailing context tokens (2..max_match) the occurrence repeats."""
        if len(context) < 2 or count <= 0:
            return []
        positions = self._index.get(_key(int(context[-2]), int(context[-1])))
        if not positions:
            return []
        tail = context[-max_match:][::-1]  # tail[k] = the k-th token from the end
        out: list[tuple[list[int], int]] = []
        for packed in reversed(positions):
            seq_id, end = packed >> _TOKEN_BITS, packed & ((1 << _TOKEN_BITS) - 1)
            arr = self._sequences.get(seq_id)
            if arr is None:
                continue
            follow = arr[end + 1 : end + 1 + count]
            if len(follow) == 0:
                continue
            span = min(len(tail), end + 1)
            before = arr[end + 1 - span : end + 1][::-1]
            same = before == tail[:span]
            length = span if same.all() else int(np.argmin(same))
            out.append((follow.tolist(), length))
            self._sequences.move_to_end(seq_id)  # recently useful: evicted last
            if len(out) >= limit:
                break
        return out
