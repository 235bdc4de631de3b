"""Few-row linear layers on CPU, computed the cheapest way this machine measures.

Speculative verify steps at small batch are few-row batches (1 + drafts rows per request), and
this torch build's CPU GEMM is far from monotone in the row count. On 2 EPYC cores, with the
fixed routing this module had before (``weight @ x.T`` for 2-64 rows), a forward's worth of
SmolLM2-135M linears took 35.6 ms at 8 rows, 44.7 at 9, 52.6-84.2 at 10-15 and 44.3 at 16
(loadtest/results/engine/linear-cpu.md). Which of ``F.linear`` and ``weight @ x.T`` is faster
also changes with the rows, and from one machine (or day) to the next: ``weight @ x.T`` was
1.4x faster at 8 rows on 2026-11-22 and 0.87x on the same machine on 2026-12-02.

So no table is written down here. At start-up the runner calls ``plan_linears(model)``, which
times both products for each projection shape of the model at every row count up to
``FEW_ROWS`` and records, per row count, the cheapest way to compute it: which product, and
how many rows (padded with zero rows up to a larger count when that is clearly faster).
``linear`` then follows the plan; shapes without one (a model not planned, tests) take the
fixed routing below. The plan is per process and per thread count; each shape is timed once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K", bound=tuple[Any, ...])

# Largest row count planned and routed away from plain F.linear on CPU (prefill chunks of
# hundreds of rows stay on F.linear).
FEW_ROWS = 64
# Weights at least this large (elements) take the two-row path even for one row (lm_heads),
# and are not planned: timing a 49152 x 576 head at 64 row counts would take seconds.
LARGE_WEIGHT = 1 << 22
# Pad only when the padded count is this much cheaper: timing noise must not pick a pad.
PAD_GAIN = 0.9
# Timing rounds over all row counts (min per cell), and calls per timed cell.
_ROUNDS = 3
_CALLS = 3


@dataclass(frozen=True)
class RowChoice:
    """How to compute a linear of some row count: rows actually computed, and which product."""

    rows: int
    # weight @ x.T (True) or F.linear (False).
    transposed: bool


# (out, in, dtype, torch threads) -> choices for rows 1..FEW_ROWS (index rows - 1).
_PLANS: dict[tuple[int, int, torch.dtype, int], tuple[RowChoice, ...]] = {}


def plan_key(weight: torch.Tensor) -> tuple[int, int, torch.dtype, int]:
    return (weight.shape[0], weight.shape[1], weight.dtype, torch.get_num_threads())


def _product(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    if transposed:
        return (weight @ x.t()).t().contiguous()
    return F.linear(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ weight[out, in].T (+ bias) -> [M, out], fast for few rows on CPU.

    Planned shapes follow their plan (see the module docstring). Unplanned ones use
    ``weight @ x.T`` for 2..FEW_ROWS rows (measured 2.0-2.8x faster at 2-4 rows on
    2026-11-22, loadtest/results/engine/linear-cpu.md) and F.linear for one row. CUDA and
    other layouts use F.linear.
    """
    rows = x.shape[0] if x.dim() == 2 else 0
    if x.device.type != "cpu" or not 1 <= rows <= FEW_ROWS:
        return F.linear(x, weight, bias)
    plan = planned_choices(weight)
    if plan is not None:
        choice = plan[rows - 1]
        if choice.rows > rows:
            padded = torch.cat([x, x.new_zeros(choice.rows - rows, x.shape[1])])
            out = _product(padded, weight, choice.transposed)[:rows]
        else:
            out = _product(x, weight, choice.transposed)
    elif rows == 1 and weight.numel() >= LARGE_WEIGHT:
        # A large matrix (the lm_head) times one row: the GEMV reads it on one core; as a
        # two-row GEMM it takes ~4 ms instead of ~10 ms for SmolLM2's 49152 x 576 head.
        out = (weight @ x.repeat(2, 1).t())[:, :1].t().contiguous()
    else:
        out = _product(x, weight, transposed=rows > 1)
    return out if bias is None else out + bias


def choose_rows(seconds: np.ndarray, pad_gain: float = PAD_GAIN) -> tuple[RowChoice, ...]:
    """The plan from measured times: seconds[r - 1, transposed] for rows r = 1..R.

    Each row count takes the cheaper product at the cheapest row count >= itself, when that
    count is at least 1 / pad_gain times cheaper than computing it as it is.
    """
    best = seconds.min(axis=1)
    transposed = seconds.argmin(axis=1) == 1
    choices = []
    for r in range(len(best)):
        target = r + int(np.argmin(best[r:]))
        if best[target] >= pad_gain * best[r]:
            target = r
        choices.append(RowChoice(rows=target + 1, transposed=bool(transposed[target])))
    return tuple(choices)


def time_rows(weights: list[torch.Tensor], max_rows: int = FEW_ROWS) -> np.ndarray:
    """seconds[r - 1, transposed] per call, for rows 1..max_rows.

    Calls rotate over ``weights`` (the model's layers of one shape) so that, as in a forward,
    a weight is read from memory rather than from a cache it has just warmed. Each cell is the
    min over rounds that sweep all row counts in turn, so that a busy moment costs one
    sample, not one row count.
    """
    in_features, dtype = weights[0].shape[1], weights[0].dtype
    xs = [torch.randn(r, in_features, dtype=dtype) for r in range(1, max_rows + 1)]
    seconds = np.full((max_rows, 2), np.inf)
    turn = 0
    for x in xs:  # warm-up: first calls allocate and pick kernels
        _product(x, weights[0], False)
        _product(x, weights[0], True)
    for _ in range(_ROUNDS):
        for r, x in enumerate(xs):
            for transposed in (False, True):
                start = time.perf_counter()
                for _ in range(_CALLS):
                    _product(x, weights[turn % len(weights)], transposed)
                    turn += 1
                elapsed = (time.perf_counter() - start) / _CALLS
                seconds[r, int(transposed)] = min(seconds[r, int(transposed)], elapsed)
    return seconds


def plan_linears(model: nn.Module) -> dict[tuple[int, int], tuple[RowChoice, ...]]:
    """Times and plans every CPU linear shape of ``model`` (lm_heads aside) not planned yet;
    returns the plans of its shapes."""
    return plan_weights(
        module.weight.detach()
        for module in model.modules()
        if isinstance(module, nn.Linear)
        and module.weight.device.type == "cpu"
        and module.weight.numel() < LARGE_WEIGHT
    )


def plan_weights(weights: Iterable[torch.Tensor]) -> dict[tuple[int, int], tuple[RowChoice, ...]]:
    """Plans each shape among ``weights`` (timed over all the weights of that shape), logging
    progress and the row counts it pads; shapes planned before are not timed again."""
    return plan_groups(
        weights,
        plan_key,
        _PLANS,
        time_rows,
        "CPU linear",
        lambda plan: (
            f"; weight @ x.T at {sum(c.transposed for c in plan)} of {len(plan)} row counts"
        ),
    )


def plan_groups(
    items: Iterable[T],
    key_of: Callable[[T], K],
    plans: dict[K, tuple[RowChoice, ...]],
    time_group: Callable[[list[T]], np.ndarray],
    what: str,
    detail: Callable[[tuple[RowChoice, ...]], str] = lambda plan: "",
) -> dict[tuple[int, int], tuple[RowChoice, ...]]:
    """Groups ``items`` by ``key_of`` ((out, in, ...) first), times each group not in ``plans``
    with ``time_group`` and records its choices there, logging progress as ``what``; returns
    the plans of all the groups by (out, in). Shared by the dense and the int4 linears."""
    by_key: dict[K, list[T]] = {}
    for item in items:
        by_key.setdefault(key_of(item), []).append(item)
    todo = [key for key in by_key if key not in plans]
    start = time.perf_counter()
    for i, key in enumerate(todo, 1):
        out_features, in_features = key[0], key[1]
        logger.info(
            "timing %s %d/%d (%d x %d) at 1..%d rows",
            what,
            i,
            len(todo),
            out_features,
            in_features,
            FEW_ROWS,
        )
        plan = choose_rows(time_group(by_key[key]))
        plans[key] = plan
        logger.info(
            "%s %d x %d: pads %s%s",
            what,
            out_features,
            in_features,
            describe_padding(plan),
            detail(plan),
        )
    if todo:
        logger.info("planned %d %s shapes in %.1f s", len(todo), what, time.perf_counter() - start)
    return {(key[0], key[1]): plans[key] for key in by_key}


def describe_padding(plan: tuple[RowChoice, ...]) -> str:
    """'9-15 -> 16, 17 -> 24': the padded row counts of a plan."""
    runs: list[list[int]] = []  # [first, last, target]
    for r, choice in enumerate(plan, 1):
        if choice.rows == r:
            continue
        if runs and runs[-1][1] == r - 1 and runs[-1][2] == choice.rows:
            runs[-1][1] = r
        else:
            runs.append([r, r, choice.rows])
    return ", ".join(f"{a}-{b} -> {t}" if a != b else f"{a} -> {t}" for a, b, t in runs) or (
        "no row count"
    )


def planned_choices(weight: torch.Tensor) -> tuple[RowChoice, ...] | None:
    """The plan for ``weight``'s shape (rows 1..FEW_ROWS), None if it has none."""
    return _PLANS.get(plan_key(weight))


def saved_plans() -> dict[tuple[int, int, torch.dtype, int], tuple[RowChoice, ...]]:
    """A copy of every plan, for ``restore_plans`` (benchmarks compare planned and not)."""
    return dict(_PLANS)


def restore_plans(plans: dict[tuple[int, int, torch.dtype, int], tuple[RowChoice, ...]]) -> None:
    _PLANS.clear()
    _PLANS.update(plans)


def clear_plans() -> None:
    """Forget every plan (tests, and benchmarks that compare planned with unplanned)."""
    _PLANS.clear()
