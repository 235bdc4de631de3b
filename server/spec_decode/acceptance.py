"""Acceptance estimates: how likely each draft node is to be accepted, learned online.

Everything is a *conditional* acceptance, P(node accepted | its parent accepted): a node is
tested only when its parent was accepted (the root always is), and along a path the
conditionals multiply into the probability that the whole path is accepted, which is the
node's value to the policy (expected tokens it adds).

Three levels of evidence, each a Beta-style posterior over exponentially decayed counts:

- global, per draft depth: the drafter's acceptance by position over recent steps; the prior
  for requests the policy knows nothing about yet;
- per request, per depth (model drafters) or pooled over depths (scored drafters): the
  request's own record, shrunk toward the global estimate and fading back to it while the
  request is not speculating (so a request refused speculation gets to try again);
- per score bucket (drafters that attach a score to each node: n-gram match lengths, suffix
  vote shares): the score calibrated into a probability, per depth band, from the bucket's
  recent tests around its long-run record (what a score is worth moves with the traffic, see
  ``_RECENT_DECAY``). A scored node's estimate is the calibrated probability shifted by the
  request's own skill in logit space, an offset fitted to the nodes the request tested (a
  logistic regression with the calibration's logit as a fixed term and the offset as its one
  parameter, under a Gaussian prior at 0). Why: the request's record is a handful of tests,
  and the pooled ratio it replaces (logit of the request's acceptance minus logit of what
  the calibration expected, with 2 pseudo-tests of prior) turned one lucky one-token match
  into a +1.5 logit skill that then lifted the request's long matches from 0.9 to 0.97; the
  policy verified exactly the requests that had been lucky (measured: chat prompts at batch
  8, long-match first drafts rated 0.92-0.95 and accepted 0.56-0.71, the verified drafts'
  expected tokens 2.2x those accepted; 1.5-1.7x with the fit, the rest is the winner's curse
  that goodput.py's margin answers). The prior's variance (0.25) lets sustained evidence
  move the offset, not one test. (Measured against the global acceptance instead of the
  calibration, a request whose drafts were mostly short matches read as unskilled twice
  over: first-draft estimates at 0.10 where 0.17 were accepted.)
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from server.spec_decode.tree import TokenTree

# Pseudo-observations behind each prior (how fast evidence overrides it).
_PRIOR_STRENGTH = 2.0
# Count decay per observation: global ~ last 1000 tested nodes per depth, per request ~ 10 steps.
_GLOBAL_DECAY = 0.999
_REQUEST_DECAY = 0.9
# A score bucket's calibration also keeps its last ~50 tests, whose posterior around the
# long-run one (worth _RECENT_STRENGTH tests) is the bucket's estimate. Why: what a score is
# worth depends on the traffic. Long n-gram matches were accepted ~0.9 of the time on
# repetitive prompts and 0.39-0.58 on chat; after a spell of repetitive traffic, the long-run
# counts alone (~1000 tests) rated chat's long matches 0.9 for hundreds of steps.
_RECENT_DECAY = 0.98
_RECENT_STRENGTH = 5.0
# Per engine step a request is not observed, its evidence fades by this factor.
_IDLE_DECAY = 0.97
# Before any data at all.
_INITIAL_PRIOR = 0.5
_P_MIN, _P_MAX = 1e-3, 0.98
# Cache key of best_first_prob's request-independent part (no real bucket is negative).
_BEST_FIRST = (-1, 0)
# Depth bands of the score calibration: 1, 2, 3-4, 5-8, 9+.
_DEPTH_BANDS = (1, 2, 4, 8)
# A request's skill offset (logits): the variance of its Gaussian prior at 0, the tests it is
# fitted to (the most recent, weighed by _REQUEST_DECAY per test: older ones weigh < 0.04),
# and the Newton steps per refit (warm-started from the last fit; the log-posterior is
# concave, so a few steps settle it).
_OFFSET_PRIOR_VARIANCE = 0.25
_OFFSET_WINDOW = 32
_OFFSET_NEWTON_STEPS = 2
_OFFSET_LIMIT = 6.0


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _clip(p: float) -> float:
    return min(max(p, _P_MIN), _P_MAX)


@dataclass
class _Counts:
    accepted: float = 0.0
    tested: float = 0.0

    def add(self, accepted: float, decay: float) -> None:
        """One more tested node, ``accepted`` 1/0 (or a probability: expected counts)."""
        self.accepted = self.accepted * decay + float(accepted)
        self.tested = self.tested * decay + 1.0

    def scale(self, factor: float) -> None:
        self.accepted *= factor
        self.tested *= factor

    def posterior(self, prior: float, strength: float = _PRIOR_STRENGTH) -> float:
        return _clip((self.accepted + strength * prior) / (self.tested + strength))


@dataclass
class _RequestRecord:
    by_depth: dict[int, _Counts] = field(default_factory=dict)
    # Scored drafters: the request's recent tests, each the calibration's logit for the node
    # when it was tested, whether it was accepted, and its weight (decayed per later test and
    # per idle step); ``offset`` is fitted to them (``fit_offset``).
    logits: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    offset: float = 0.0
    # The tests' Fisher information about the offset at the last fit (prior excluded).
    information: float = 0.0
    last_step: int = 0

    def add_test(self, logit: float, accepted: bool) -> None:
        self.weights = [w * _REQUEST_DECAY for w in self.weights[1 - _OFFSET_WINDOW :]]
        self.weights.append(1.0)
        self.logits = [*self.logits[1 - _OFFSET_WINDOW :], logit]
        self.accepted = [*self.accepted[1 - _OFFSET_WINDOW :], float(accepted)]

    def fit_offset(self) -> None:
        """The offset maximising the posterior of the request's tests (Newton's method)."""
        theta = self.offset
        for _ in range(_OFFSET_NEWTON_STEPS):
            gradient = -theta / _OFFSET_PRIOR_VARIANCE
            information = 1.0 / _OFFSET_PRIOR_VARIANCE
            for logit, ok, weight in zip(self.logits, self.accepted, self.weights, strict=True):
                p = _sigmoid(logit + theta)
                gradient += weight * (ok - p)
                information += weight * p * (1.0 - p)
            theta = min(max(theta + gradient / information, -_OFFSET_LIMIT), _OFFSET_LIMIT)
        self.offset = theta
        self.information = information - 1.0 / _OFFSET_PRIOR_VARIANCE

    def fade(self, factor: float) -> None:
        """Every test's weight times ``factor``: the offset shrinks toward the prior as the
        tests' information does (one Newton step from the last fit: every live request
        fades every step, and a refit loops over its tests in Python)."""
        self.weights = [w * factor for w in self.weights]
        precision = 1.0 / _OFFSET_PRIOR_VARIANCE
        data = self.information
        self.offset *= (
            (factor * data / (factor * data + precision)) * ((data + precision) / data)
            if data > 0
            else 1.0
        )
        self.information = factor * data


class AcceptanceEstimator:
    """Conditional acceptance per node; see the module docstring.

    score_edges: bucket boundaries of the drafter's node scores (``np.digitize``); None = the
    drafter gives no scores, and estimates are per request and depth.
    """

    def __init__(self, max_depth: int, score_edges: Sequence[float] | None = None) -> None:
        self.max_depth = max(1, max_depth)
        self.score_edges = None if score_edges is None else np.asarray(score_edges, float)
        self._global = [_Counts() for _ in range(self.max_depth + 1)]  # index = depth
        self._global_pooled = _Counts()
        self._buckets: dict[tuple[int, int], _Counts] = {}
        self._recent_buckets: dict[tuple[int, int], _Counts] = {}
        self._requests: dict[str, _RequestRecord] = {}
        self._step = 0
        self._edges: tuple[float, ...] = tuple(score_edges or ())
        # Calibrated probability per (score bucket, depth), valid until the next observation.
        self._cache: dict[tuple[int, int], float] = {}

    # ---- estimates ----------------------------------------------------------------------

    def global_prob(self, depth: int) -> float:
        d = min(depth, self.max_depth)
        return self._global[d].posterior(self._global_pooled.posterior(_INITIAL_PRIOR))

    def global_probs(self) -> list[float]:
        """Global conditional acceptance by depth 1..max_depth (the prior of new requests)."""
        return [self.global_prob(d) for d in range(1, self.max_depth + 1)]

    def chain_probs(self, request_id: str, length: int) -> np.ndarray:
        """[length] conditional acceptance of chain positions 1..length for this request."""
        record = self._record(request_id)
        out = np.empty(length)
        for i in range(length):
            d = min(i + 1, self.max_depth)
            counts = record.by_depth.get(d) if record is not None else None
            prior = self.global_prob(d)
            out[i] = counts.posterior(prior) if counts is not None else prior
        return out

    def node_probs(self, request_id: str, tree: TokenTree) -> np.ndarray:
        """[n + 1] conditional acceptance per node (node 0, the root, is 1)."""
        if tree.scores is None or self.score_edges is None:
            probs = np.ones(tree.num_nodes)
            chain = self.chain_probs(request_id, max(tree.max_depth, 1))
            for i in range(1, tree.num_nodes):
                probs[i] = chain[tree.depths[i] - 1]
            return probs
        offset = self._request_offset(request_id)
        probs = np.ones(tree.num_nodes)
        for i in range(1, tree.num_nodes):
            calibrated = self._calibrated(tree.scores[i], tree.depths[i])
            probs[i] = _clip(_sigmoid(_logit(calibrated) + offset))
        return probs

    def first_draft_prob(self, request_id: str, tree: TokenTree) -> float:
        """The largest estimate among the root's children (0 for an empty tree): no path of
        the tree is worth more, since a path's value is a product of conditionals <= 1."""
        first = [i for i in range(1, tree.num_nodes) if tree.parents[i] == 0]
        if not first:
            return 0.0
        if tree.scores is None or self.score_edges is None:
            return float(self.chain_probs(request_id, 1)[0])
        offset = self._request_offset(request_id)
        best = max(self._calibrated(tree.scores[i], 1) for i in first)
        return _clip(_sigmoid(_logit(best) + offset))

    def best_first_prob(self, request_id: str) -> float:
        """The most a first draft of this request can be worth: the best depth-1 estimate
        over every score bucket (or the request's own depth-1 estimate, unscored)."""
        if self.score_edges is None:
            return float(self.chain_probs(request_id, 1)[0])
        best = self._cache.get(_BEST_FIRST)
        if best is None:  # the same for every request until the next observation
            prior = self.global_prob(1)
            best = max(
                [prior] + [self._bucket_prob(key, prior) for key in self._buckets if key[1] == 0]
            )
            self._cache[_BEST_FIRST] = best
        return _clip(_sigmoid(_logit(best) + self._request_offset(request_id)))

    def path_values(self, request_id: str, tree: TokenTree) -> np.ndarray:
        """[n + 1] probability that the path root..node is accepted (node 0: 1)."""
        probs = self.node_probs(request_id, tree)
        values = probs.copy()
        for i in range(1, tree.num_nodes):
            values[i] = values[tree.parents[i]] * probs[i]
        return values

    def _calibrated(self, score: float, depth: int) -> float:
        assert self.score_edges is not None
        # bisect_right == np.digitize for increasing edges, at a tenth of the cost per call.
        bucket = bisect.bisect_right(self._edges, score)
        cache_key = (bucket, depth)
        cached = self._cache.get(cache_key)
        if cached is None:
            cached = self._bucket_prob((bucket, depth_band(depth)), self.global_prob(depth))
            self._cache[cache_key] = cached
        return cached

    def _bucket_prob(self, key: tuple[int, int], prior: float) -> float:
        """A score bucket's calibrated probability: its recent tests' posterior around its
        long-run one (see ``_RECENT_DECAY``)."""
        counts = self._buckets.get(key)
        long_run = counts.posterior(prior) if counts is not None else prior
        recent = self._recent_buckets.get(key)
        return long_run if recent is None else recent.posterior(long_run, _RECENT_STRENGTH)

    def _request_offset(self, request_id: str) -> float:
        record = self._record(request_id)
        return 0.0 if record is None else record.offset

    def _record(self, request_id: str) -> _RequestRecord | None:
        record = self._requests.get(request_id)
        if record is not None and record.last_step < self._step:
            # Evidence fades while the request is not observed (it reverts to the prior).
            factor = _IDLE_DECAY ** (self._step - record.last_step)
            for counts in record.by_depth.values():
                counts.scale(factor)
            record.last_step = self._step
            if record.weights:
                record.fade(factor)
        return record

    # ---- learning -----------------------------------------------------------------------

    def next_step(self) -> None:
        """Marks the end of an engine step (idle requests' evidence fades per step)."""
        self._step += 1

    def observe(
        self,
        request_id: str,
        tree: TokenTree,
        accepted_nodes: Sequence[int],
        tested_nodes: Sequence[int] | None = None,
    ) -> None:
        """One verified tree: every child of the root and of an accepted node was tested, or
        only ``tested_nodes`` where given (VerifiedTree.tested)."""
        self._cache.clear()
        record = self._record(request_id)
        if record is None:
            record = self._requests[request_id] = _RequestRecord(last_step=self._step)
        accepted = set(accepted_nodes)
        if tested_nodes is None:
            tested_parents = {0, *accepted}
            tested = [i for i in range(1, tree.num_nodes) if tree.parents[i] in tested_parents]
        else:
            tested = list(tested_nodes)
        scores = tree.scores if self.score_edges is not None else None
        if scores is not None:  # before this tree moves the buckets
            for i in tested:
                calibrated = self._calibrated(scores[i], tree.depths[i])
                record.add_test(_logit(calibrated), i in accepted)
            record.fit_offset()
            self._cache.clear()
        for i in tested:
            ok = i in accepted
            d = min(tree.depths[i], self.max_depth)
            self._global[d].add(ok, _GLOBAL_DECAY)
            self._global_pooled.add(ok, _GLOBAL_DECAY)
            record.by_depth.setdefault(d, _Counts()).add(ok, _REQUEST_DECAY)
            if scores is not None:
                key = (bisect.bisect_right(self._edges, scores[i]), depth_band(d))
                self._buckets.setdefault(key, _Counts()).add(ok, _GLOBAL_DECAY)
                self._recent_buckets.setdefault(key, _Counts()).add(ok, _RECENT_DECAY)

    def release(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._requests.pop(rid, None)

    def calibration_table(self) -> list[tuple[int, int, float, float]]:
        """(score bucket, depth band, tested, acceptance) per bucket, for reports."""
        return [
            (b, d, c.tested, c.accepted / c.tested if c.tested else math.nan)
            for (b, d), c in sorted(self._buckets.items())
        ]


def depth_band(depth: int) -> int:
    """The calibration's depth band of a node at ``depth`` (see ``_DEPTH_BANDS``)."""
    for band, upper in enumerate(_DEPTH_BANDS):
        if depth <= upper:
            return band
    return len(_DEPTH_BANDS)
