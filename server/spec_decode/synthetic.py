"""SYNTHETIC drafter: FOR BENCHMARKS AND TESTS ONLY. It never makes serving faster.

It drafts with the TARGET model itself (its greedy argmax is the target's own next token) and
replaces each drafted token, with probability ``1 - acceptance_rate``, by a different token
drawn uniformly from the rest of the vocabulary (a seeded private generator), so greedy
requests see a settable, known acceptance rate: the policy and the engine can be measured at
any acceptance without hunting for a draft model that happens to have it. Drafting costs k
target forwards, which is why it is never a default.

It shares the target's weights and the target's KV cache (``DraftRunner`` with
``shares_target_cache``: slots below ``num_computed_tokens`` already hold the K/V the draft
would compute, and the verify forward rewrites every slot from the root on before reading it),
so it costs no extra memory. Kind "deterministic": drafts are a function of the context and a
private generator independent of verification's random numbers, so the deterministic rule keeps
sampled requests exact too (they accept with p(draft), not ``acceptance_rate``).
"""

from __future__ import annotations

import logging

import torch

from server.engine.request import Request
from server.model.llama import CausalLM
from server.model.sampler import processed_probs
from server.spec_decode.draft_model import DraftModelDrafter
from server.spec_decode.draft_runner import DraftRunner
from server.spec_decode.drafter import DraftKind

logger = logging.getLogger(__name__)


class SyntheticDrafter(DraftModelDrafter):
    """FOR BENCHMARKS AND TESTS ONLY; see the module docstring."""

    name = "synthetic"
    kind: DraftKind = "deterministic"

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        num_blocks: int,
        block_size: int,
        target_vocab_size: int,
        acceptance_rate: float,
        seed: int = 0,
    ) -> None:
        """model, kv_cache: the TARGET's own (shared, not copied)."""
        if not 0.0 <= acceptance_rate <= 1.0:
            raise ValueError(f"acceptance_rate must be in [0, 1], got {acceptance_rate}")
        if target_vocab_size < 2:
            raise ValueError("a wrong token needs a vocabulary of at least 2 tokens")
        super().__init__(
            DraftRunner(model, num_blocks, block_size, target_vocab_size, kv_cache=kv_cache)
        )
        self.acceptance_rate = acceptance_rate
        # CPU: a handful of uniforms per step; the stream is independent of the batch's device.
        self._rng = torch.Generator().manual_seed(seed)
        logger.warning(
            "SYNTHETIC drafter (acceptance_rate %.2f): for benchmarks and tests only; it drafts "
            "with the target model itself and never speeds up serving",
            acceptance_rate,
        )

    def _choose(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> tuple[list[int], torch.Tensor | None]:
        """logits [B, V] -> the target's argmax per row, each replaced by another token with
        probability 1 - acceptance_rate. No q: the drafts are deterministic-kind."""
        # The argmax after the request's logit bias: the token greedy decoding would emit.
        tokens = processed_probs(logits, requests).argmax(dim=1).cpu()  # [B]
        b, v = tokens.shape[0], logits.shape[1]
        wrong = torch.rand(b, generator=self._rng) >= self.acceptance_rate  # [B]
        # A uniform offset in 1..V-1 always lands on a different token.
        offset = torch.randint(1, v, (b,), generator=self._rng)
        tokens = torch.where(wrong, (tokens + offset) % v, tokens)
        return tokens.tolist(), None
