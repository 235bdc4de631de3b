"""SmartSpec's uniform-k policy (arXiv 2406.14066), the baseline the goodput policy must beat.

One speculation length k for the whole batch, found by enumerating k = 0, 1, 2, ... on the
same cost model and acceptance estimates as ``goodput``: the goodput of k = 0 gets a 1.1x
margin (speculation must clearly pay), and enumeration stops at the first k that does not
improve on the best so far. k is re-chosen every ``every`` steps, as the paper does.
Requests whose cap is below k get their cap.
"""

from __future__ import annotations

import numpy as np

from server.engine.request import Request
from server.spec_decode.allocator import StepBase
from server.spec_decode.learned import LearnedPolicy
from server.spec_decode.policy import PolicyContext
from server.spec_decode.tree import TokenTree

_ZERO_MARGIN = 1.1
_EVERY = 8


class SmartSpecUniform(LearnedPolicy):
    name = "smartspec_uniform"

    def __init__(self, context: PolicyContext, every: int = _EVERY) -> None:
        super().__init__(context)
        if every < 1:
            raise ValueError(f"every must be >= 1 step, got {every}")
        self.every = every
        self.k: int | None = None
        self._steps_since_choice = 0

    def allocate(self, base: StepBase, requests: list[Request], caps: list[int]) -> list[int]:
        if self.k is None or self._steps_since_choice >= self.every:
            self.k = self.choose_k(base, requests, caps)
            self._steps_since_choice = 0
        self._steps_since_choice += 1
        return [min(self.k, c) for c in caps]

    def select(
        self, base: StepBase, requests: list[Request], trees: list[TokenTree]
    ) -> list[TokenTree]:
        return trees  # the proposals already have k nodes at most

    def choose_k(self, base: StepBase, requests: list[Request], caps: list[int]) -> int:
        candidates = [self.chain_candidates(r, c) for r, c in zip(requests, caps, strict=True)]
        # Every k at once (one cost-model call), then the paper's walk over them.
        ks = np.arange(max(caps, default=0) + 1)[:, None]
        goodputs = self.allocator.evaluate_many(
            base, candidates, np.minimum(ks, np.asarray(caps)[None, :])
        ).goodputs
        best_k, best_goodput = 0, goodputs[0] * _ZERO_MARGIN
        chosen = goodputs[0]
        for k in range(1, len(goodputs)):
            if goodputs[k] <= best_goodput:
                break
            best_k, best_goodput = k, goodputs[k]
            chosen = goodputs[k]
        self.record_goodput(float(chosen))
        return best_k
