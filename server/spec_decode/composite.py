"""``auto``: the suffix source (the request's own context + other requests' prompts and
answers) and recycled top-k, merged into one tree per request.

Each source proposes its own tree at the request's budget. The suffix source's tree is the
trunk; the recycle source adds its nodes only where the suffix source proposed no child (below
its leaves, or at the root when it found no match), and elsewhere only witnesses the suffix
source's nodes it also proposed. The tree handed on is grown from that union best-first by
estimated path probability (server/spec_decode/tree_builder.py). A node's conditional estimate
combines the sources that proposed it as witnesses (noisy-or), each source's raw score first
calibrated online into a probability:

    P(node) = 1 - prod over its sources s of (1 - calibrated_s(score_s))

Calibration is the drafter's own, per (source, score bucket, depth band): after each step the
engine hands it the verified trees (what the policy kept of its proposals) and the accepted
nodes, and every verified node whose parent was accepted is one test of each source behind it.
The merged estimate is the node's score, which the goodput policy calibrates again before it
prunes the tree.

The sources are not independent witnesses, though (the recycle table starts from the prompt's
own n-grams, which the suffix source matches too), so the noisy-or is corrected per
combination of witnesses (the suffix source's score bucket, whether the recycle source proposed
the node, the depth band) by what such nodes achieved against what it predicted for them:
P(node) = noisy-or x (accepted + k) / (predicted + k). A lone source's nodes keep their
calibration (the factor stays near 1).

Why no n-gram source, and why recycle only fills the suffix source's gaps: both used to
propose freely, and their nodes became siblings of the suffix source's. The n-gram drafter's
match is one of the suffix source's own-context votes (the latest occurrence of the longest
match up to ``prompt_lookup_max`` tokens; the suffix source weighs every occurrence up to
``max(prompt_lookup_max, 8)``, and other requests'), so it added no evidence, only a second
opinion on it; where the suffix cache held the answer (the same question served before) the
n-gram's and recycle's siblings each took budget and verify rows from the right branch, and the
policy kept shallower trees. Measured in process, two mix prompts served again with no
finish-together (``python -m loadtest.bench_step_parts --dataset mix --batch 2 --configs
goodput@suffix goodput@auto --scenario repeat --served --repeats 6``, two rounds each way,
loadtest/results/spec/2026-12-05-step-parts-mix-b2-repeat-served-auto-*.json): of the draft
tokens ``auto`` verified, 83% and 82% were accepted before, 97% and 96.5% now (``suffix``:
99%); its tokens/s went from 0.91x and 0.87x ``suffix``'s to 0.93x and 0.98x. Served, the
two servers interleaved at 1, 2 req/s and all at once (three runs a cell, the code before and
after one after the other): 1.01x, 1.15x, 1.14x ``suffix``'s mean latency before, 0.98x,
0.98x, 0.96x after; a full sweep after the change 1.13x, 1.28x, 1.14x there, and two sweeps
with an identical ``suffix`` server as a control (loadtest/results/spec/JOURNAL.md,
"Against the noise") 0.91x, 1.00x, 0.99x, the control itself 1.04x, 1.07x, 1.02x. Without
the model in the loop (``python -m loadtest.bench_drafter_replay``: 16 recorded greedy
answers a dataset, a budget-8 tree proposed at every position), accepted tokens per tree went
4.00 -> 4.04 on repetitive prompts, 0.97 -> 0.95 on chat (what recycle's siblings added
there), and where the same requests were served before 6.48 -> 6.59 and 7.35 -> 7.39 (the
suffix source alone: 4.07, 0.95, 6.63, 7.39).

Everything is deterministic given the context and the drafter's state ("deterministic" kind).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from server.engine.request import Request
from server.spec_decode.acceptance import depth_band
from server.spec_decode.drafter import DraftWork, TopTokens, VerifiedTree, check_budgets
from server.spec_decode.history import TokenHistory
from server.spec_decode.recycle import RecycleDrafter, RecycleScope
from server.spec_decode.suffix_drafter import SuffixDrafter
from server.spec_decode.tree import TokenTree
from server.spec_decode.tree_builder import Child, grow_tree

# Per source, in merge order (the suffix source's tree is the trunk): its score's bucket edges,
# and the prior acceptance of each bucket (what the calibration starts from: suffix vote shares
# by quarter; recycled probabilities).
_SOURCES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "suffix": ((0.25, 0.5, 0.75, 0.95), (0.05, 0.15, 0.3, 0.45, 0.6)),
    # Recycled probabilities, one range per kind of row (a request's own single-token and
    # pair rows, the shared table's behind them: RecycleDrafter.score_edges), same priors.
    "recycle": (
        RecycleDrafter.score_edges,
        (0.02, 0.06, 0.15, 0.27, 0.4, 0.55, 0.7, 0.85) * RecycleDrafter.row_kinds,
    ),
}
_PRIOR_STRENGTH = 4.0
_DEPTH_BAND_COUNT = depth_band(1 << 30) + 1
# Calibration counts decay per test, so it follows the traffic (~ the last 2000 tests).
_DECAY = 0.9995
_P_MAX = 0.98


@dataclass
class _Bucket:
    prior: float
    accepted: float = 0.0
    tested: float = 0.0

    @property
    def prob(self) -> float:
        p = (self.accepted + _PRIOR_STRENGTH * self.prior) / (self.tested + _PRIOR_STRENGTH)
        return min(p, _P_MAX)

    def add(self, ok: bool) -> None:
        self.accepted = self.accepted * _DECAY + ok
        self.tested = self.tested * _DECAY + 1.0


class SourceCalibration:
    """P(accepted | parent accepted) per (source, score bucket, depth band), learned from
    outcomes. By depth as the policy's estimator is (acceptance.depth_band): once a copied
    span is on track its next tokens are surer than its first, whatever their score, and
    without the depth a long verbatim suffix match was priced as its first token and lost its
    budget to wider, shallower candidates of the other sources."""

    def __init__(self) -> None:
        self._buckets = {
            source: [[_Bucket(p) for _ in range(_DEPTH_BAND_COUNT)] for p in priors]
            for source, (_, priors) in _SOURCES.items()
        }

    def _bucket(self, source: str, score: float, depth: int) -> _Bucket:
        return self._buckets[source][score_bucket(source, score)][depth_band(depth)]

    def prob_in(self, source: str, bucket: int, band: int) -> float:
        """``prob`` by the score's bucket (``score_bucket``) and the depth's band."""
        return self._buckets[source][bucket][band].prob

    def prob(self, source: str, score: float, depth: int = 1) -> float:
        return self._bucket(source, score, depth).prob

    def add(self, source: str, score: float, ok: bool, depth: int = 1) -> None:
        self._bucket(source, score, depth).add(ok)

    def table(self) -> dict[str, list[tuple[float, float]]]:
        """Per source, (tests, acceptance) per score bucket over all depths, for reports."""
        out = {}
        for source, buckets in self._buckets.items():
            rows = []
            for bands in buckets:
                tested = sum(b.tested for b in bands)
                accepted = sum(b.accepted for b in bands)
                rows.append((tested, accepted / tested if tested else float("nan")))
            out[source] = rows
        return out


def score_bucket(source: str, score: float) -> int:
    """The calibration bucket of a source's score."""
    return bisect.bisect_right(_SOURCES[source][0], score)


# Which sources proposed a node, for the agreement correction: (suffix score bucket + 1, or 0
# without a suffix witness; a recycle witness; depth band).
Combination = tuple[int, bool, int]


class AgreementCorrection:
    """Per combination of witnesses, how far the noisy-or of their calibrated probabilities
    was off (see the module docstring): (accepted + k) / (predicted + k) over such nodes'
    tests, counts decaying as the per-source calibration's do."""

    def __init__(self) -> None:
        self._counts: dict[Combination, list[float]] = {}  # [accepted, predicted]

    def factor(self, combination: Combination) -> float:
        counts = self._counts.get(combination)
        if counts is None:
            return 1.0
        return (counts[0] + _PRIOR_STRENGTH) / (counts[1] + _PRIOR_STRENGTH)

    def add(self, combination: Combination, ok: bool, predicted: float) -> None:
        counts = self._counts.setdefault(combination, [0.0, 0.0])
        counts[0] = counts[0] * _DECAY + ok
        counts[1] = counts[1] * _DECAY + predicted

    def table(self) -> dict[Combination, float]:
        """The correction factor per combination seen, for reports."""
        return {c: self.factor(c) for c in sorted(self._counts)}


@dataclass(slots=True)
class _Node:
    token: int
    depth: int = 0
    children: dict[int, int] = field(default_factory=dict)  # token -> node index
    # (source, raw score) of every source that proposed this node.
    witnesses: list[tuple[str, float]] = field(default_factory=list)
    # Whether the suffix source proposed children of this node (then the recycle source only
    # witnesses them).
    suffix_children: bool = False
    # Set when the node is estimated: its witnesses' combination and their noisy-or.
    combination: Combination = (0, False, 0)
    independent: float = 0.0


@dataclass
class _Proposal:
    tree: TokenTree
    nodes: list[_Node]  # per tree node, the union node it came from


class AutoDrafter:
    name = "auto"
    kind = "deterministic"
    free_proposals = True
    # Node score = the merged probability estimate.
    score_edges = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)
    last_work = DraftWork()

    def __init__(
        self,
        vocab_size: int,
        prompt_lookup_min: int = 1,
        prompt_lookup_max: int = 4,
        max_width: int = 4,
        recycle_top_k: int = 8,
        recycle_scope: RecycleScope = "request",
        suffix_cache_mb: float = 64.0,
    ) -> None:
        # One token history for the sources: each context converted once a step. The n-gram
        # options bound the suffix source's own-context matching (see the module docstring).
        history = TokenHistory()
        self.suffix = SuffixDrafter(
            max_width=max_width,
            min_match=prompt_lookup_min,
            max_match=max(prompt_lookup_max, 8),
            cache_mb=suffix_cache_mb,
            history=history,
        )
        self.recycle = RecycleDrafter(
            vocab_size,
            top_k=recycle_top_k,
            max_width=max_width,
            scope=recycle_scope,
            history=history,
        )
        self.max_width = max_width
        self.feedback_top_k = recycle_top_k
        self.calibration = SourceCalibration()
        self.agreement = AgreementCorrection()
        self._last: dict[str, _Proposal] = {}

    # ---- proposing ----------------------------------------------------------------------

    def propose(self, requests: list[Request], budgets: list[int]) -> list[TokenTree]:
        check_budgets(requests, budgets)
        sources = {
            "suffix": self.suffix.propose(requests, budgets),
            "recycle": self.recycle.propose(requests, budgets),
        }
        trees = []
        for i, (request, budget) in enumerate(zip(requests, budgets, strict=True)):
            tree, nodes = self._merge({s: t[i] for s, t in sources.items()}, budget)
            self._last[request.request_id] = _Proposal(tree, nodes)
            trees.append(tree)
        return trees

    def _merge(self, trees: dict[str, TokenTree], budget: int) -> tuple[TokenTree, list[_Node]]:
        """The union of the sources' trees grown best-first into one of ``budget`` nodes,
        and per node of it the union node (its witnesses and estimate) it came from. The
        suffix source's nodes all go in; the recycle source's only where the suffix source
        proposed no child (see the module docstring)."""
        root = next(iter(trees.values())).root_token
        nodes = [_Node(root)]
        for source in _SOURCES:
            tree = trees.get(source)
            if tree is None:
                continue
            trunk = source == "suffix"
            index = [0] * tree.num_nodes  # per tree node its union node, -1 when left out
            scores = tree.scores or (0.0,) * tree.num_nodes
            for i in range(1, tree.num_nodes):
                at = index[tree.parents[i]]
                if at < 0:
                    index[i] = -1
                    continue
                parent = nodes[at]
                token = tree.token_ids[i]
                found = parent.children.get(token)
                if found is None:
                    if not trunk and parent.suffix_children:
                        index[i] = -1
                        continue
                    found = parent.children[token] = len(nodes)
                    nodes.append(_Node(token, parent.depth + 1))
                parent.suffix_children |= trunk
                nodes[found].witnesses.append((source, scores[i]))
                index[i] = found

        calibration = self.calibration
        factor = self.agreement.factor

        def estimate(node: _Node) -> float:
            band = depth_band(node.depth)
            miss = 1.0
            suffix, recycle = 0, False
            for source, score in node.witnesses:
                bucket = score_bucket(source, score)
                miss *= 1.0 - calibration.prob_in(source, bucket, band)
                if source == "suffix":
                    suffix = bucket + 1
                else:
                    recycle = True
            node.independent = 1.0 - miss
            node.combination = (suffix, recycle, band)
            # Raised at most to _P_MAX (agreeing sources' noisy-or may already be above it).
            return min(node.independent * factor(node.combination), max(node.independent, _P_MAX))

        def expand(node_index: int) -> list[Child[int]]:
            kids = [(estimate(nodes[k]), k) for k in nodes[node_index].children.values()]
            kids.sort(key=lambda pk: -pk[0])  # stable: earlier sources win ties
            return [Child(nodes[k].token, p, p, k) for p, k in kids]

        # grow_tree keeps no handle on which union node became which tree node, so record it.
        tree = grow_tree(root, 0, expand, budget, self.max_width)
        return tree, _tree_nodes(tree, nodes)

    # ---- learning -----------------------------------------------------------------------

    def observe_verified(self, verified: Iterable[VerifiedTree]) -> None:
        """Learns from the step's verified trees (the policy's pruning of this drafter's
        proposals): every node whose parent was accepted was tested, once per source."""
        for v in verified:
            last = self._last.get(v.request_id)
            if last is None:
                continue
            child_of = {
                (last.tree.parents[i], last.tree.token_ids[i]): i
                for i in range(1, last.tree.num_nodes)
            }
            proposed = [0] * v.tree.num_nodes  # verified node -> proposed node
            accepted = {0, *v.accepted_nodes}
            for i in range(1, v.tree.num_nodes):
                parent = v.tree.parents[i]
                node = child_of.get((proposed[parent], v.tree.token_ids[i]))
                if node is None:
                    break  # not this drafter's tree (cannot happen unless state was reset)
                proposed[i] = node
                if parent in accepted:
                    depth = last.tree.depths[node]
                    union = last.nodes[node]
                    for source, score in union.witnesses:
                        self.calibration.add(source, score, i in accepted, depth)
                    self.agreement.add(union.combination, i in accepted, union.independent)

    def observe_top_tokens(self, top: TopTokens) -> None:
        self.recycle.observe_top_tokens(top)

    def observe_finished(self, requests: Iterable[Request]) -> None:
        self.suffix.observe_finished(requests)

    # ---- lifecycle ----------------------------------------------------------------------

    def release(self, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        for part in (self.suffix, self.recycle):
            part.release(ids)
        for rid in ids:
            self._last.pop(rid, None)

    def reset(self, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        for part in (self.suffix, self.recycle):
            part.reset(ids)

    def draft_probs(self, request_id: str) -> None:
        return None

    @property
    def state_bytes(self) -> int:
        return self.suffix.state_bytes + self.recycle.state_bytes

    def memory(self) -> dict[str, tuple[int, int]]:
        return self.suffix.memory() | self.recycle.memory()


def _tree_nodes(tree: TokenTree, nodes: list[_Node]) -> list[_Node]:
    """Per tree node, the union node it came from (found by its path)."""
    union_of = [0] * tree.num_nodes
    for i in range(1, tree.num_nodes):
        union_of[i] = nodes[union_of[tree.parents[i]]].children[tree.token_ids[i]]
    return [nodes[u] for u in union_of]
