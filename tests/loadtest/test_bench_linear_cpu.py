"""The padded few-row linear of the CPU benchmark computes the same rows."""

from __future__ import annotations

import pytest
import torch

from loadtest.bench_linear_cpu import padded
from server.model.layers import linear


@pytest.mark.parametrize("rows", [1, 8, 9, 15, 17])
def test_padded_linear_returns_the_same_rows(rows: int) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(rows, 32, dtype=torch.float64), torch.randn(48, 32, dtype=torch.float64)
    out = padded(8)(x, w)
    assert out.shape == (rows, 48)
    torch.testing.assert_close(out, linear(x, w))
