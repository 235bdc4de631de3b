"""Block manager: ref counts, free list, prefix caching and LRU eviction."""

from __future__ import annotations

from server.engine.block_manager import BlockManager
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int], **params: object) -> Request:
    return Request(rid, tokens, SamplingParams(**params), frozenset({0}), max_total_tokens=4096)


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    r = make_request("a", list(range(1, 11)))  # 10 tokens -> 3 blocks
    assert bm.allocate_slots(r, 10)
    assert len(r.block_ids) == 3 and bm.num_used_blocks == 3
    r.num_computed_tokens = 10
    assert bm.allocate_slots(r, 3)  # 13 tokens -> 4 blocks
    assert len(r.block_ids) == 4
    bm.free(r)
    assert bm.num_used_blocks == 0 and r.block_ids == []


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = make_request("a", list(range(1, 13)))
    assert bm.allocate_slots(a, 12)
    b = make_request("b", list(range(1, 9)))
    assert not bm.allocate_slots(b, 8)
    assert b.block_ids == [] and bm.num_free_blocks == 1


def test_prefix_hit_reuses_blocks_and_leaves_one_token_to_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    prompt = list(range(1, 13))  # exactly 3 full blocks
    a = make_request("a", prompt)
    assert bm.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    bm.cache_full_blocks(a)
    b = make_request("b", prompt)
    hit = bm.find_cached_prefix(b)
    # All 12 tokens are cached, but the last one must be recomputed to get logits: 2 blocks.
    assert hit == a.block_ids[:2]
    b.num_computed_tokens = 8
    assert bm.allocate_slots(b, 4, hit)
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert bm.ref_counts[a.block_ids[0]] == 2


def test_freed_cached_blocks_are_revived_then_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert bm.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    blocks = list(a.block_ids)
    bm.free(a)
    assert bm.num_used_blocks == 0
    # A request with the same prefix revives the two full blocks from the free queue.
    b = make_request("b", [1, 2, 3, 4, 9])
    hit = bm.find_cached_prefix(b)
    assert hit == blocks[:2]
    b.num_computed_tokens = 4
    assert bm.allocate_slots(b, 1, hit)
    assert bm.num_used_blocks == 3
    bm.free(b)
    # Filling the whole pool evicts the cached blocks: their hashes no longer hit.
    c = make_request("c", list(range(100, 108)))
    assert bm.allocate_slots(c, 8)
    assert bm.find_cached_prefix(make_request("d", [1, 2, 3, 4, 5])) == []


def test_prompt_logprobs_requests_skip_the_prefix_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert bm.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    assert bm.find_cached_prefix(make_request("b", [1, 2, 3, 4, 5])) != []
    assert bm.find_cached_prefix(make_request("c", [1, 2, 3, 4, 5], prompt_logprobs=1)) == []


def test_trim_releases_blocks_past_the_kept_tokens() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    r = make_request("a", list(range(1, 5)))
    assert bm.allocate_slots(r, 12)
    assert len(r.block_ids) == 3
    bm.trim(r, 5)
    assert len(r.block_ids) == 2 and bm.num_used_blocks == 2
