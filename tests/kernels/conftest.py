"""Kernel tests run for real on CUDA and under the Triton interpreter on CPU.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE
