"""Draft-model speculation: a small causal LM sharing the target's tokenizer drafts a chain.

Per step, for the requests with a budget: one batched draft forward catches each request's
draft K/V up to its root token (``server.spec_decode.draft_runner`` says which tokens are missing),
then one batched forward per draft depth over the requests still drafting. Greedy requests
draft the draft's argmax (after their logit bias); sampled requests draw from the draft's
processed distribution q (same temperature / top-k / top-p as the request), and ``draft_probs``
hands the q rows to verification, whose chain rejection sampling then keeps the target's
distribution exactly ("sampled" kind; greedy requests are verified greedily regardless).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from server.engine.request import Request
from server.model.attention_backends import get_attention_backend
from server.model.cpu_linear import plan_linears
from server.model.llama import decoder_spec
from server.model.loader import (
    eos_token_ids,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from server.model.sampler import draw, processed_probs
from server.spec_decode.draft_runner import DraftChunk, DraftRunner
from server.spec_decode.drafter import DraftKind, DraftWork, check_budgets
from server.spec_decode.tree import TokenTree

logger = logging.getLogger(__name__)

# A seeded request's draft draws come from their own generator, seeded with the request's seed
# plus this offset: the runner's generator (seeded with the seed itself) draws the acceptance
# uniforms, and drafts sharing that stream would be correlated with them, which biases
# rejection sampling. Odd 63-bit constant (2^63 / golden ratio).
_DRAFT_SEED_OFFSET = 0x4F1BBCDCBFA53E0B


class DraftModelDrafter:
    """Chains drafted by a draft model; see the module docstring."""

    name = "draft_model"
    kind: DraftKind = "sampled"
    # Every draft token is a draft-model forward: the policy sets budgets before drafting.
    free_proposals = False
    score_edges: tuple[float, ...] | None = None

    def __init__(self, runner: DraftRunner) -> None:
        self.runner = runner
        # request_id -> [n + 1, V] q rows of the last proposal (sampled requests only).
        self._draft_probs: dict[str, torch.Tensor] = {}
        # Seeded requests' private draft generators; kept across preemption (a recompute must
        # not replay draws already used), dropped when the request finishes.
        self._generators: dict[str, torch.Generator] = {}
        self.last_work = DraftWork()

    # ---- Drafter protocol ---------------------------------------------------------------

    def propose(self, requests: list[Request], budgets: list[int]) -> list[TokenTree]:
        """One chain per request, rooted at ``all_token_ids[num_computed_tokens]``."""
        check_budgets(requests, budgets)
        self._draft_probs.clear()
        drafting = [i for i, b in enumerate(budgets) if b > 0]
        drafts: dict[int, list[int]] = {i: [] for i in drafting}
        q_rows: dict[int, list[torch.Tensor]] = {i: [] for i in drafting}
        forwards = draft_rows = 0
        if drafting:
            chunks = [self.runner.catch_up_chunk(requests[i]) for i in drafting]
            forwards, draft_rows = 1, sum(len(c.token_ids) for c in chunks)
            logits = self.runner.forward(chunks)  # [B, V]: rows predict each draft's 1st token
            active = drafting
            while True:
                tokens, q = self._choose(logits, [requests[i] for i in active])
                for row, i in enumerate(active):
                    drafts[i].append(tokens[row])
                    if q is not None and not requests[i].sampling_params.greedy:
                        q_rows[i].append(q[row])
                active = [i for i in active if len(drafts[i]) < budgets[i]]
                if not active:
                    break
                # Draft j (1-based) sits at position root + j; its logits give draft j + 1.
                chunks = [
                    DraftChunk(
                        requests[i],
                        [drafts[i][-1]],
                        requests[i].num_computed_tokens + len(drafts[i]),
                    )
                    for i in active
                ]
                forwards += 1
                draft_rows += len(chunks)
                logits = self.runner.forward(chunks)
        trees = []
        for i, r in enumerate(requests):
            tree = TokenTree.chain(r.all_token_ids[r.num_computed_tokens], drafts.get(i, []))
            if q_rows.get(i):
                # Row j = the q node j's child was drawn from; the leaf's row is never read.
                rows = q_rows[i]
                self._draft_probs[r.request_id] = torch.stack([*rows, torch.zeros_like(rows[0])])
            trees.append(tree)
        self.last_work = DraftWork(forwards, draft_rows)
        return trees

    def draft_probs(self, request_id: str) -> torch.Tensor | None:
        """[n + 1, V] float32 from the last ``propose``: row i is the draft distribution node
        i's child was drawn from (the leaf row is zeros). None for greedy requests."""
        return self._draft_probs.get(request_id)

    def reset(self, request_ids: Iterable[str]) -> None:
        """Preempted requests: their blocks (and so the draft K/V) are gone."""
        self.runner.reset(list(request_ids))

    def release(self, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        self.runner.release(ids)
        for rid in ids:
            self._generators.pop(rid, None)
            self._draft_probs.pop(rid, None)

    # ---- drafting -----------------------------------------------------------------------

    def _choose(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> tuple[list[int], torch.Tensor | None]:
        """logits [B, V] float32 -> (one draft token per row, q [B, V] they were drawn from).

        Greedy rows take the argmax (no random numbers); sampled rows draw from q with their
        request's draft generator (seeded requests) or the device's default one.
        """
        q = processed_probs(logits, requests)  # [B, V]; greedy rows one-hot
        tokens = q.argmax(dim=1)
        sampled = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if sampled:
            idx = torch.tensor(sampled, device=q.device)
            tokens[idx] = draw(q[idx], [self._generator(requests[i]) for i in sampled])
        return tokens.tolist(), q

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        g = self._generators.get(request.request_id)
        if g is None:
            g = torch.Generator(device=self.runner.device)
            g.manual_seed((seed + _DRAFT_SEED_OFFSET) % (1 << 63))
            self._generators[request.request_id] = g
        return g


def check_same_tokenizer(
    target_name: str,
    target_tokenizer: Any,
    target_eos: frozenset[int],
    draft_name: str,
    draft_tokenizer: Any,
    draft_eos: frozenset[int],
) -> None:
    """ValueError naming both models and what differs, unless the draft's tokens mean what the
    target's mean: the same vocabulary (token -> id), the same special tokens, the same EOS ids.
    """
    problems: list[str] = []
    tv, dv = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if tv != dv:
        if len(tv) != len(dv):
            problems.append(f"vocabulary sizes differ (target {len(tv)}, draft {len(dv)})")
        moved = [t for t in tv if t in dv and tv[t] != dv[t]][:3]
        if moved:
            problems.append(
                "token ids differ, e.g. "
                + ", ".join(f"{t!r}: target {tv[t]}, draft {dv[t]}" for t in moved)
            )
        missing = [t for t in tv if t not in dv][:3]
        if missing:
            problems.append(f"tokens missing from the draft's vocabulary, e.g. {missing}")
    t_special = _special_tokens(target_tokenizer)
    d_special = _special_tokens(draft_tokenizer)
    if t_special != d_special:
        problems.append(f"special tokens differ (target {t_special}, draft {d_special})")
    if target_eos != draft_eos:
        problems.append(
            f"EOS token ids differ (target {sorted(target_eos)}, draft {sorted(draft_eos)})"
        )
    if problems:
        raise ValueError(
            f"draft model {draft_name!r} cannot draft for {target_name!r}: they must share a "
            f"tokenizer, but {'; '.join(problems)}. Pick a draft from the target's model family "
            "(same tokenizer), or use another speculative method (ngram, tree)."
        )


def _special_tokens(tokenizer: Any) -> dict[str, int]:
    """Special token -> id."""
    tokens = getattr(tokenizer, "all_special_tokens", [])
    return {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}


def draft_kv_bytes_per_block(model: str, dtype: str, device: str, block_size: int) -> int:
    """Bytes one block of the draft's cache takes, from its config alone (before loading it):
    the target runner sizes its block count with it, since both caches share the budget."""
    from transformers import AutoConfig

    spec = decoder_spec(AutoConfig.from_pretrained(resolve_model(model)))
    elem = torch.empty((), dtype=resolve_dtype(dtype, resolve_device(device))).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem


def load_draft_model_drafter(
    *,
    model: str,
    target_model: str,
    target_tokenizer: Any,
    target_eos_token_ids: frozenset[int],
    target_vocab_size: int,
    dtype: str,
    device: str,
    attention_backend: str,
    num_blocks: int,
    block_size: int,
    plan_cpu_linears: bool = False,
) -> DraftModelDrafter:
    """Loads the draft like the target (same dtype, device, attention backend), checks that it
    shares the target's tokenizer, and gives it a paged cache over the target's block ids.
    plan_cpu_linears: time its linears on CPU as the target's are (server/model/cpu_linear.py).
    """
    path = resolve_model(model)
    backend = get_attention_backend(attention_backend, torch.device(device))
    draft, hf_config, tokenizer = load_model(path, dtype, device, backend)
    if plan_cpu_linears and torch.device(device).type == "cpu":
        plan_linears(draft)
    check_same_tokenizer(
        target_model,
        target_tokenizer,
        target_eos_token_ids,
        model,
        tokenizer,
        eos_token_ids(Path(path), hf_config, tokenizer),
    )
    runner = DraftRunner(draft, num_blocks, block_size, target_vocab_size)
    logger.info(
        "draft model %s: %d layers, %.1f MiB of draft KV cache",
        model,
        draft.spec.num_layers,
        runner.kv_cache.numel() * runner.kv_cache.element_size() / 2**20,
    )
    return DraftModelDrafter(runner)
