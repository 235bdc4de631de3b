"""Prompt lookup (vLLM's "ngram" speculation): continue the context the way it went before.

For n from ``prompt_lookup_max`` down to ``prompt_lookup_min``: find the most recent earlier
occurrence of the context's last n tokens and propose the tokens that followed it, as a chain.
Free to run (no model), deterministic, and strong on inputs that repeat themselves (code edits,
summaries quoting the prompt, structured output).
"""

from __future__ import annotations

from server.engine.request import Request
from server.spec_decode.history import HistoryDrafter, TokenHistory, continuation
from server.spec_decode.tree import TokenTree


class NgramDrafter(HistoryDrafter):
    name = "ngram"
    # Node score = the suffix match length behind the chain; buckets 1, 2, 3, 4-5, 6+.
    score_edges = (1.5, 2.5, 3.5, 5.5)

    def __init__(
        self,
        prompt_lookup_min: int = 1,
        prompt_lookup_max: int = 4,
        history: TokenHistory | None = None,
    ) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(
                "need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{prompt_lookup_min} and {prompt_lookup_max}"
            )
        self.prompt_lookup_min = prompt_lookup_min
        self.prompt_lookup_max = prompt_lookup_max
        super().__init__(history)

    def draft_tokens(self, request: Request, budget: int) -> list[int]:
        """The chain's draft tokens (<= budget; [] when nothing matches)."""
        return self._draft(request, budget)[0]

    def _draft(self, request: Request, budget: int) -> tuple[list[int], int]:
        """(draft tokens, the match length behind them)."""
        if budget <= 0:
            return [], 0
        tokens, ends, lengths = self._history.matches(request, self.prompt_lookup_max)
        if len(ends) == 0:
            return [], 0
        best = int(lengths.max())
        if best < self.prompt_lookup_min:
            return [], 0
        # The longest n that matches anywhere wins; among its occurrences the latest one.
        # ends is ascending, so the last index with the best length is the most recent.
        end = int(ends[lengths == best][-1])
        return continuation(tokens, end, budget), best

    def _propose_one(self, request: Request, budget: int) -> TokenTree:
        drafts, match = self._draft(request, budget)
        return TokenTree.chain(request.all_token_ids[-1], drafts, [float(match)] * len(drafts))
