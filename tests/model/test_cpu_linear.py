"""The start-up plan for few-row CPU linears: its choice from measured times, and that planned
(padded, transposed) products compute exactly the rows F.linear does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from server.model import cpu_linear
from server.model.cpu_linear import FEW_ROWS, RowChoice, choose_rows, describe_padding

pytestmark = pytest.mark.usefixtures("no_cpu_linear_plans")


def test_a_cliff_is_padded_over_and_noise_is_not() -> None:
    # The measured 2026-12-02 shape: 8 rows cheap, 9-15 dear, 16 as cheap as 8; 17-20 within
    # a few percent of each other (noise), so they stay as they are.
    best = [10.0] * 8 + [15.0] * 7 + [10.5] + [14.0, 13.5, 13.8, 13.6]
    seconds = np.stack([np.array(best), np.array(best) * 2], axis=1)
    plan = choose_rows(seconds)
    assert [c.rows for c in plan] == [*range(1, 9), *[16] * 8, 17, 18, 19, 20]
    assert not any(c.transposed for c in plan)
    assert describe_padding(plan) == "9-15 -> 16"


def test_the_cheaper_product_is_taken_per_row_count() -> None:
    seconds = np.array([[1.0, 2.0], [3.0, 1.5], [2.0, 2.0]])
    plan = choose_rows(seconds)
    # Row 1 pads to nothing cheaper; row 2 takes weight @ x.T; row 3 ties and pads nowhere.
    assert plan == (RowChoice(1, False), RowChoice(2, True), RowChoice(3, False))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 9, 15])
def test_planned_products_compute_the_same_rows(rows: int, transposed: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 32, dtype=torch.float64)
    bias = torch.randn(48, dtype=torch.float64)
    x = torch.randn(rows, 32, dtype=torch.float64)
    # Every row count padded up to 16 (or left alone above it), with the product under test.
    plan = tuple(RowChoice(max(r, 16), transposed) for r in range(1, FEW_ROWS + 1))
    cpu_linear.restore_plans({cpu_linear.plan_key(weight): plan})
    out = cpu_linear.linear(x, weight, bias)
    assert out.shape == (rows, 48) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias))


def test_plan_linears_times_each_shape_once_and_skips_lm_heads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 16), nn.Linear(2048, 2048, bias=False)
    )
    timed: list[tuple[int, int, int]] = []
    real_time_rows = cpu_linear.time_rows

    def counting_time_rows(weights: list[torch.Tensor], max_rows: int = FEW_ROWS) -> np.ndarray:
        timed.append((*weights[0].shape, len(weights)))
        return real_time_rows(weights, max_rows)

    monkeypatch.setattr(cpu_linear, "time_rows", counting_time_rows)
    plans = cpu_linear.plan_linears(model)
    # Both 16 x 8 layers timed together (rotating, as a forward reads them); the 2048 x 2048
    # weight (4M elements, lm_head-sized) is not planned.
    assert sorted(timed) == [(8, 16, 1), (16, 8, 2)]
    assert set(plans) == {(16, 8), (8, 16)}
    for plan in plans.values():
        assert len(plan) == FEW_ROWS
        assert all(c.rows >= r for r, c in enumerate(plan, 1))
    cpu_linear.plan_linears(model)
    assert len(timed) == 2
    x = torch.randn(5, 8)
    torch.testing.assert_close(model[0](x), cpu_linear.linear(x, model[0].weight, model[0].bias))
