"""The CPU linear benchmark describes the plan it measures."""

from __future__ import annotations

import pytest
import torch

from loadtest.bench_linear_cpu import SHAPES, plan_summary
from server.model import cpu_linear
from server.model.cpu_linear import FEW_ROWS, RowChoice

pytestmark = pytest.mark.usefixtures("no_cpu_linear_plans")


def test_plan_summary_names_rows_and_product_per_shape() -> None:
    assert plan_summary(9) == "- / - / - / -"
    qkv = torch.empty(*SHAPES[0])
    plan = tuple(RowChoice(16 if 9 <= r <= 15 else r, r > 1) for r in range(1, FEW_ROWS + 1))
    cpu_linear.restore_plans({cpu_linear.plan_key(qkv): plan})
    assert plan_summary(9) == "16T / - / - / -"
    assert plan_summary(1) == "1F / - / - / -"
    assert plan_summary(65) == "F.linear"
