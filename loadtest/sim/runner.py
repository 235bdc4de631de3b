"""The simulated model runner: a RunnerOutput shaped exactly like the real runner's.

Every request that samples this step (``plan.samples(r)``) gets one token; a request with a
draft tree gets its accepted drafts + one bonus token, and ``spec_accepted_nodes`` lists the
accepted path's nodes. Acceptance is decided per OUTPUT POSITION: request i's draft for its
output position p is right iff ``u_i[p] < alpha_i``, with ``u_i`` drawn once per request. So a
chain accepts node j + 1 with probability alpha given node j was accepted, and every policy
run on the same workload sees the same "text" (common random numbers: the policies differ by
their choices, not by luck). A plain decode (no tree) emits DRAFT_TOKEN at a position where a
draft would have been right, as a real target emits the token a right draft guessed: the
speculator's shadow drafts (Speculator.fill) are scored against it. Tokens are never an EOS
(requests end by length).
"""

from __future__ import annotations

import numpy as np

from loadtest.sim.drafter import DRAFT_TOKEN
from server.engine.plan import RunnerOutput, StepPlan

# A sampled token that is not a draft: the correction after a rejected draft, the bonus after
# an accepted chain, a plain decode's token.
BONUS_TOKEN = 2


class SimRunner:
    def __init__(self) -> None:
        self._alpha: dict[str, float] = {}
        self._uniforms: dict[str, np.ndarray] = {}

    def add(self, request_id: str, alpha: float, uniforms: np.ndarray) -> None:
        """uniforms: [>= output length] the request's U(0, 1) draw per output position."""
        self._alpha[request_id] = alpha
        self._uniforms[request_id] = uniforms

    def release(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._alpha.pop(rid, None)
            self._uniforms.pop(rid, None)

    def execute(self, plan: StepPlan) -> RunnerOutput:
        out = RunnerOutput()
        for r in plan.requests:
            rid = r.request_id
            tree = plan.spec_trees.get(rid)
            if tree is not None:
                alpha, u = self._alpha[rid], self._uniforms[rid]
                position = r.num_output_tokens  # the output position of depth-1 drafts
                path: list[int] = []
                node = 0
                # Deterministic drafts: at most one child can be the target's token; the
                # drafter's first child stands for it (chains: the only child).
                while tree.children[node]:
                    child = tree.children[node][0]
                    p = position + len(path)
                    if p >= len(u) or u[p] >= alpha:
                        break
                    path.append(child)
                    node = child
                out.sampled_token_ids[rid] = [DRAFT_TOKEN] * len(path) + [BONUS_TOKEN]
                out.spec_accepted_nodes[rid] = path
            elif plan.samples(r):
                out.sampled_token_ids[rid] = [self._plain_token(rid, r.num_output_tokens)]
        return out

    def _plain_token(self, request_id: str, position: int) -> int:
        """The token a plain decode emits at output ``position``: DRAFT_TOKEN where a draft
        would have been accepted (so an unverified draft is scored as verify would score it)."""
        u = self._uniforms[request_id]
        right = position < len(u) and u[position] < self._alpha[request_id]
        return DRAFT_TOKEN if right else BONUS_TOKEN
