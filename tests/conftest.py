"""Shared test set-up. Environment first: it must be in place before torch is imported."""

import os

# See server/__init__.py: spinning OpenMP threads starve the live server under test.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

# Without a GPU, Triton kernels run under the interpreter (tests/kernels, and the "triton"
# attention backend on CPU). Triton reads the variable when it is first imported, and the
# engine may import it through server/model/attention.py, hence here, before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random model per supported architecture, built once per test session."""
    from tests.tiny_models import TINY_ARCHS, make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(arch, root / arch) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture
def no_cpu_linear_plans() -> Iterator[None]:
    """No CPU linear plan during the test (server/model/cpu_linear.py); the plans the process
    had are back afterwards."""
    from server.model import cpu_linear

    saved = cpu_linear.saved_plans()
    cpu_linear.clear_plans()
    yield
    cpu_linear.restore_plans(saved)
