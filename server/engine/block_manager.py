"""Paged KV block manager: fixed-size blocks, ref counts, a free list and prefix caching.

Prefix caching (on by default, as in vLLM): every *full* block whose K/V has been computed is
registered under a hash of (parent block's hash, its token ids), so the hash names the whole
prefix up to the block's end. A new request walks its prompt's hash chain and reuses every
cached block it finds (ref count + 1) instead of recomputing it. Blocks whose ref count drops to
0 go to the tail of the free queue *but keep their hash*: they can still be revived by a later
request until they reach the head of the queue and are handed out for new data (LRU eviction).

Capacity is a return value: ``allocate_slots`` returns False when the blocks aren't there, and
the scheduler decides whom to preempt.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.request import Request


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    # Python's tuple hash is deterministic for ints within a process, which is all the cache
    # needs (it lives and dies with the engine process).
    return hash((parent_hash, tuple(token_ids)))


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # Free blocks in eviction order: the head is handed out first. Values unused.
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.stats = PrefixCacheStats()

    # --- queries -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache ------------------------------------------------------------------------

    def block_hashes(self, request: Request, num_tokens: int) -> list[int]:
        """Hashes of the full blocks among the request's first num_tokens tokens.

        Extends ``request.block_hashes`` incrementally so each block is hashed once.
        """
        hashes = request.block_hashes
        tokens = request.all_token_ids
        bs = self.block_size
        while (len(hashes) + 1) * bs <= num_tokens:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))
        return hashes[: num_tokens // bs]

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids holding the longest cached prefix of the request's known tokens.

        At least one token is always left to compute: the step that computes it produces the
        logits the next token is sampled from.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        hashes = self.block_hashes(request, request.num_tokens - 1)
        hit: list[int] = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def record_lookup(self, num_queried: int, num_hit: int) -> None:
        self.stats.queries += num_queried
        self.stats.hits += num_hit

    def cache_full_blocks(self, request: Request) -> None:
        """Registers the request's computed full blocks so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        hashes = self.block_hashes(request, request.num_computed_tokens)
        for block, h in zip(request.block_ids, hashes, strict=False):
            if self.block_hash[block] is not None:
                continue  # already registered (or revived from the cache)
            if h in self.cached:
                # Another request computed the same prefix concurrently; keep the first copy.
                continue
            self.block_hash[block] = h
            self.cached[h] = block

    # --- allocation --------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> bool:
        """Makes the request's block table cover num_computed_tokens + num_new_tokens tokens.

        ``cached_blocks`` are prefix-cache hits to take first (new requests only). Returns False
        and changes nothing when there aren't enough free blocks.
        """
        have = len(request.block_ids) + len(cached_blocks)
        need = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - have
        # Cached hits sitting in the free queue are taken out of it, so they don't count twice.
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        if max(need, 0) > self.num_free_blocks - revived:
            return False
        for block in cached_blocks:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1
            request.block_ids.append(block)
        for _ in range(need):
            request.block_ids.append(self._pop_free_block())
        return True

    def _pop_free_block(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict: its old contents are about to be overwritten
            self.block_hash[block] = None
            if self.cached.get(h) == block:
                del self.cached[h]
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def free(self, request: Request) -> None:
        """Releases the request's blocks. Tail blocks go to the free queue first so that,
        under eviction, a shared prefix outlives the request-specific suffix."""
        for block in reversed(request.block_ids):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
        request.block_ids.clear()

    def trim(self, request: Request, num_tokens: int) -> None:
        """Releases blocks beyond what num_tokens tokens need (rejected speculative slots)."""
        keep = self.blocks_needed(num_tokens)
        while len(request.block_ids) > keep:
            block = request.block_ids.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None

    def reset_prefix_cache(self) -> None:
        for h, block in list(self.cached.items()):
            self.block_hash[block] = None
            del self.cached[h]
