"""Speculative decoding: token trees, drafters and lossless verification.

- ``tree``: ``TokenTree`` (node 0 = last verified token, drafts in topological order, masks).
- ``drafter``: the ``Drafter`` protocol; ``drafters``: the ``make_drafter`` registry.
- ``policy``: the ``SpecPolicy`` protocol and the baselines; ``policies``: ``make_policy``.
- ``ngram`` / ``suffix_tree``: model-free drafters (prompt lookup chain, suffix-match tree).
- ``draft_model`` (+ ``draft_runner``: its paged K/V over the target's block ids): a small LM
  sharing the target's tokenizer drafts chains. ``synthetic``: benchmarks and tests only.
- ``verify``: greedy, chain rejection sampling, and tree multi-step / deterministic rules.

Imports point down only: engine -> spec_decode -> model (sampler) / engine.request.
"""

from server.spec_decode.drafter import Drafter
from server.spec_decode.drafters import make_drafter, register_drafter
from server.spec_decode.tree import TokenTree
from server.spec_decode.verify import (
    VerifyResult,
    verify,
    verify_chain_sampled,
    verify_greedy,
    verify_tree_sampled,
)

__all__ = [
    "Drafter",
    "TokenTree",
    "VerifyResult",
    "make_drafter",
    "register_drafter",
    "verify",
    "verify_chain_sampled",
    "verify_greedy",
    "verify_tree_sampled",
]
