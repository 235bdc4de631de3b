"""``suffix``: the suffix-tree drafter, fed by earlier requests too (a cross-request cache).

A request's candidates are the continuations of its suffix in its own context (as the
``tree`` drafter finds them) and in earlier requests' prompts and outputs
(``server/spec_decode/suffix_cache.py``). All of them vote, longer matches more, into one trie
that is grown into a tree best-first by path probability; a node's score is its vote share.
When a request finishes, its tokens join the cache, so a second, similar request is drafted
from the first one's output.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.engine.request import Request
from server.spec_decode.history import TokenHistory
from server.spec_decode.suffix_cache import SuffixCache
from server.spec_decode.suffix_tree import SuffixTreeDrafter

# Cross-request occurrences considered per step (newest first).
_MAX_CACHE_CANDIDATES = 16


class SuffixDrafter(SuffixTreeDrafter):
    name = "suffix"

    def __init__(
        self,
        max_width: int = 4,
        min_match: int = 1,
        max_match: int = 8,
        cache_mb: float = 64.0,
        history: TokenHistory | None = None,
    ) -> None:
        super().__init__(max_width, min_match, max_match, history)
        self.cache = SuffixCache(int(cache_mb * 2**20))

    def candidates(self, request: Request, budget: int) -> list[tuple[list[int], int]]:
        own = super().candidates(request, budget)
        tokens = self._history.tokens(request)
        shared = self.cache.matches(tokens, budget, self.max_match, _MAX_CACHE_CANDIDATES)
        # The request's own context first: on equal votes, earlier-inserted nodes win ties.
        return own + [(path, length) for path, length in shared if length >= self.min_match]

    def observe_finished(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.cache.add(request.all_token_ids)

    @property
    def state_bytes(self) -> int:
        return self.cache.nbytes

    def memory(self) -> dict[str, tuple[int, int]]:
        return {"suffix_cache": (self.cache.nbytes, self.cache.max_bytes)}
