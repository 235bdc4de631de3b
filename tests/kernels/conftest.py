"""Kernel tests run for real on CUDA and under the Triton interpreter on CPU.

TRITON_INTERPRET is set in tests/conftest.py (it must be in place before triton is imported).
"""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE
