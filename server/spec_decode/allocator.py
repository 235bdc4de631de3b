"""Goodput-maximising allocation of draft tokens across a batch (the heart of the policy).

Every decoding request offers candidates: chain positions (model drafters, before drafting)
or the nodes of a proposed tree (model-free drafters, after proposing). A candidate's value is
the probability that its whole path is accepted, which is the expected number of tokens it
adds to the step's output. The step's goodput is

    G = (tokens the step emits without drafts + sum of chosen values) / T(step shape)

with T from the online cost model. Candidates are taken in decreasing value (ties: shallower
first), which keeps every chosen set parent-closed (a child's value is its parent's times a
conditional probability < 1), so a pruned tree stays a tree.

Rather than stop at the first candidate that does not raise G, every prefix of that order is
scored and the best one taken: on CPU a step's cost is a staircase in rows (the runner pads a
row count up to the next cheaper one, loadtest/results/engine/linear-cpu.md), so a candidate
that lands on a step of the staircase may not pay while the two after it, on the flat, do;
the first candidate that doesn't raise G would stop a greedy walk short of them. SmartSpec's
uniform-k allocations are scored too, so the result's predicted goodput is never below any
uniform k's, nor below no speculation (m = 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.spec_decode.cost_model import CostModel, StepShape, feature_matrix, shapes_matrix


@dataclass(frozen=True)
class RequestCandidates:
    """One request's draft candidates, in its own order of decreasing value (parents first).

    values: [c] P(the path root..candidate is accepted); parents: [c] index of the parent
    candidate (-1 = the root); depths: [c] 1 = a child of the root.
    """

    values: np.ndarray
    parents: np.ndarray
    depths: np.ndarray

    @classmethod
    def chain(cls, conditional: Sequence[float] | np.ndarray) -> RequestCandidates:
        """Chain positions 1..k with conditional acceptance ``conditional[j]``."""
        cond = np.asarray(conditional, dtype=np.float64)
        k = len(cond)
        return cls(np.cumprod(cond), np.arange(-1, k - 1), np.arange(1, k + 1))

    @property
    def size(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class StepBase:
    """The step without drafts.

    shape: all of it (decoding requests + prefill chunks), which prices what drafts add;
    decode_shape: the decoding requests alone (None: the same as shape); emitted_tokens: the
    tokens the decoding requests emit without drafts (one each).

    Goodput is measured over the decode part: prefill chunks cost time that drafts neither
    cause nor can earn back, and counting that time in the denominator would make a step
    with a long prefill look slow and any draft look worth it (the simulator showed budgets
    kept at ~1.7 under saturation, where 0 was 25% faster).

    most_remaining_tokens: set when the step's requests are all the work left and are
    returned together (an offline batch with nothing waiting): the most output tokens any of
    them may still produce, which bounds the steps until the batch is done. None otherwise.
    runner_up_remaining_tokens: then, the most any of the others (with fewer left) may still
    produce (0: none).
    """

    shape: StepShape
    emitted_tokens: float
    decode_shape: StepShape | None = None
    most_remaining_tokens: int | None = None
    runner_up_remaining_tokens: int = 0


@dataclass
class Allocation:
    # Per request: how many of its candidates are chosen (its first `counts[i]` in its order).
    counts: list[int]
    expected_tokens: float
    predicted_seconds: float

    @property
    def goodput(self) -> float:
        """Expected emitted tokens per second."""
        return self.expected_tokens / self.predicted_seconds


@dataclass(frozen=True)
class DraftCost:
    """How drafting scales, for model drafters (both zero for model-free ones).

    A chain of k drafts costs k draft forwards (sequential) and catch-up + k - 1 rows.
    """

    model_drafter: bool = False
    catchup_rows_per_request: float = 1.0


@dataclass
class Allocations:
    """Several allocations of one step, scored together (``Allocator.evaluate_many``)."""

    counts: np.ndarray  # [A, requests]
    expected_tokens: np.ndarray  # [A]
    predicted_seconds: np.ndarray  # [A]

    @property
    def goodputs(self) -> np.ndarray:
        return self.expected_tokens / self.predicted_seconds

    def row(self, a: int) -> Allocation:
        return Allocation(
            self.counts[a].tolist(),
            float(self.expected_tokens[a]),
            float(self.predicted_seconds[a]),
        )


class Allocator:
    def __init__(self, cost: CostModel, draft_cost: DraftCost | None = None) -> None:
        self.cost = cost
        self.draft_cost = draft_cost or DraftCost()
        # The last step base's prefill share and plain allocation: a step prices several
        # allocations of one base, and each numpy call counts (the policy runs every step).
        self._last_base: StepBase | None = None
        self._last_coef: np.ndarray | None = None
        self._prefill_share = math.nan
        self._decode_alone = 0.0
        self._plain: Allocation | None = None

    def best(
        self,
        base: StepBase,
        candidates: Sequence[RequestCandidates],
        uniform_ks: Sequence[int] = (),
    ) -> Allocation:
        """The allocation with the highest predicted goodput (see the module docstring)."""
        best = self._best_prefix(base, candidates)
        # One request: its uniform-k allocations are prefixes of its own order, scored above.
        if len(uniform_ks) and len(candidates) > 1:
            sizes = np.array([c.size for c in candidates])
            ks = np.sort(np.asarray(uniform_ks))[:, None]
            uniform = self.evaluate_many(base, candidates, np.minimum(ks, sizes[None, :]))
            # As for the prefixes: a larger k is never priced below a smaller one, nor below
            # no drafts at all.
            plain = self.plain(base).predicted_seconds
            uniform.predicted_seconds = np.maximum.accumulate(
                np.maximum(uniform.predicted_seconds, plain)
            )
            i = int(np.argmax(uniform.goodputs))
            if uniform.goodputs[i] > best.goodput:
                best = uniform.row(i)
        return best

    def best_first_drafts(self, base: StepBase, values: Sequence[float]) -> Allocation:
        """``best`` when request i's only candidate is one first draft worth ``values[i]``:
        the m likeliest first drafts for the best m (0..n), ties to the earlier request. The
        goodput policy asks this every valued step (its best case), so it skips ``best``'s
        general bookkeeping (a chain object per request, the sort by three keys)."""
        p = np.asarray(values, dtype=np.float64)
        order = np.argsort(-p, kind="stable")
        drafts = np.arange(len(p) + 1, dtype=np.float64)
        # Prefix m: the m likeliest first drafts, in m requests, none deeper than 1.
        depth = np.minimum(drafts, 1.0)
        return self._best_of_prefixes(base, p[order], order, drafts, depth, len(p))

    def plain(self, base: StepBase) -> Allocation:
        """No drafts: plain decoding's expected tokens and predicted time."""
        self._remember(base)
        if self._plain is None:
            self._plain = self.evaluate(base, [RequestCandidates.chain([])], [0])
        return self._plain

    def _remember(self, base: StepBase) -> None:
        """Forgets what was computed for another base or another fit of the cost model."""
        coef = self.cost.coefficient_vector
        if base is not self._last_base or coef is not self._last_coef:
            self._last_base, self._last_coef = base, coef
            self._plain = None
            self._prefill_share = math.nan

    def evaluate(
        self, base: StepBase, candidates: Sequence[RequestCandidates], counts: Sequence[int]
    ) -> Allocation:
        """The allocation choosing the first ``counts[i]`` candidates of request i."""
        return self.evaluate_many(base, candidates, np.asarray(counts)[None, :]).row(0)

    def evaluate_many(
        self, base: StepBase, candidates: Sequence[RequestCandidates], counts: np.ndarray
    ) -> Allocations:
        """Several allocations at once (one cost-model call): ``counts`` is [A, requests],
        row a choosing the first ``counts[a, i]`` candidates of request i. The policy runs
        every step, so its own time is part of what speculation costs."""
        sizes = np.array([c.size for c in candidates], dtype=np.int64)
        counts = np.clip(np.asarray(counts, dtype=np.int64), 0, sizes[None, :])
        num = counts.shape[0]
        value = np.zeros(num)
        max_depth = np.zeros(num)
        for i, c in enumerate(candidates):
            if c.size:
                n = counts[:, i]
                value += np.concatenate([[0.0], np.cumsum(c.values)])[n]
                depth = np.concatenate([[0.0], np.maximum.accumulate(c.depths)])
                max_depth = np.maximum(max_depth, depth[n])
        drafts = counts.sum(axis=1).astype(np.float64)
        spec = (counts > 0).sum(axis=1).astype(np.float64)
        x = self._features(base, drafts, spec, max_depth)
        seconds = self._decode_seconds(base, self.cost.predict_matrix(x))
        return Allocations(counts, base.emitted_tokens + value, seconds)

    def _best_prefix(self, base: StepBase, candidates: Sequence[RequestCandidates]) -> Allocation:
        sizes = [c.size for c in candidates]
        total = sum(sizes)
        if total == 0:
            return self.evaluate(base, candidates, [0] * len(candidates))
        values = np.concatenate([c.values for c in candidates])
        depths = np.concatenate([c.depths for c in candidates])
        owner = np.repeat(np.arange(len(candidates)), sizes)
        local = np.concatenate([np.arange(n) for n in sizes])
        # Primary key -value, then depth, then the request's own order (lexsort: last first).
        order = np.lexsort((local, depths, -values))
        v, d, o = values[order], depths[order], owner[order]
        # Requests with a draft among the first m: +1 where a request's first candidate sits.
        first_seen = np.zeros(total, dtype=np.float64)
        first_seen[np.unique(o, return_index=True)[1]] = 1.0
        spec = np.concatenate([[0.0], np.cumsum(first_seen)])
        max_depth = np.concatenate([[0.0], np.maximum.accumulate(d.astype(np.float64))])
        return self._best_of_prefixes(base, v, o, spec, max_depth, len(candidates))

    def _best_of_prefixes(
        self,
        base: StepBase,
        values: np.ndarray,
        owners: np.ndarray,
        spec_requests: np.ndarray,
        max_depth: np.ndarray,
        num_requests: int,
    ) -> Allocation:
        """The best prefix m = 0..n of candidates taken in order (``values`` [n], the request
        each belongs to ``owners`` [n]); ``spec_requests`` / ``max_depth`` [n + 1]: per prefix,
        the requests verifying a draft and the deepest draft."""
        expected = base.emitted_tokens + np.concatenate([[0.0], np.cumsum(values)])
        drafts = np.arange(len(values) + 1, dtype=np.float64)
        full = self.cost.predict_matrix(self._features(base, drafts, spec_requests, max_depth))
        # More drafts are never priced below fewer. The runner makes that true of the real
        # cost (cpu_linear pads a row count up to a larger one whenever that is faster), so a
        # fitted dip is noise, and a policy maximising predicted goodput would spend draft
        # rows exactly on it.
        seconds = np.maximum.accumulate(self._decode_seconds(base, full))
        m = int(np.argmax(expected / seconds))  # the first maximum: fewest drafts on ties
        counts = np.bincount(owners[:m], minlength=num_requests).tolist()
        return Allocation(counts, float(expected[m]), float(seconds[m]))

    def _decode_seconds(self, base: StepBase, full: np.ndarray) -> np.ndarray:
        """Step times with the prefill chunks' share taken out: T(step) - (T(base) -
        T(decode part of base)). Floored at half the decode part's own time, so a cost that
        dips with more rows (CPU few-row effects) never makes a step look nearly free."""
        if base.decode_shape is None or base.decode_shape == base.shape:
            return full
        self._remember(base)
        if math.isnan(self._prefill_share):
            whole, decode = self.cost.predict_matrix(shapes_matrix([base.shape, base.decode_shape]))
            self._prefill_share, self._decode_alone = max(whole - decode, 0.0), decode
        return np.maximum(full - self._prefill_share, 0.5 * self._decode_alone)

    def _features(
        self,
        base: StepBase,
        drafts: np.ndarray,
        spec_requests: np.ndarray,
        max_depth: np.ndarray,
    ) -> np.ndarray:
        s = base.shape
        ones = np.ones_like(drafts, dtype=np.float64)
        if self.draft_cost.model_drafter:
            forwards = max_depth
            # The first forward catches up and drafts position 1; each later one adds a row.
            rows = spec_requests * self.draft_cost.catchup_rows_per_request + (
                drafts - spec_requests
            )
        else:
            forwards = rows = np.zeros_like(ones)
        return feature_matrix(
            rows=s.num_tokens + drafts,
            logit_rows=s.num_logit_rows + drafts,
            kv_tokens=s.num_kv_tokens + drafts,
            requests=s.num_requests * ones,
            spec_requests=spec_requests,
            draft_forwards=forwards,
            draft_rows=rows,
        )
