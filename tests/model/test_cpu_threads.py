"""--cpu-threads: auto leaves a core to the API process; the engine applies it (and
--kernel-threads, tests/model/test_kernel_threads.py) on CPU."""

from __future__ import annotations

import pytest
import torch

from server.cli import build_parser, config_from_args
from server.config import ModelConfig
from server.model import cpu_threads, int4_avx2
from server.model.cpu_threads import apply_cpu_threads, resolve_cpu_threads


@pytest.mark.parametrize(
    ("cores", "requested", "expected"), [(2, 0, 1), (1, 0, 1), (16, 0, 15), (2, 3, 3)]
)
def test_auto_leaves_one_core(monkeypatch, cores: int, requested: int, expected: int) -> None:
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: cores)
    assert resolve_cpu_threads(requested) == expected


def test_flag_variable_and_validation() -> None:
    assert ModelConfig().cpu_threads == 0
    with pytest.raises(ValueError, match="cpu_threads must be >= 0"):
        ModelConfig(cpu_threads=-1)
    args = build_parser().parse_args(["serve", "--cpu-threads", "2"])
    assert config_from_args(args, environ={}).engine.model.cpu_threads == 2
    args = build_parser().parse_args(["serve"])
    cfg = config_from_args(args, environ={"SPECD_CPU_THREADS": "1"})
    assert cfg.engine.model.cpu_threads == 1


def test_the_engine_sets_torchs_and_the_kernels_threads(tiny_model_dirs) -> None:
    from server.config import CacheConfig, EngineConfig, SchedulerConfig
    from server.engine.offline import OfflineEngine

    before, kernels_before = torch.get_num_threads(), int4_avx2.kernel_threads()
    try:
        torch.set_num_threads(2)
        OfflineEngine(
            EngineConfig(
                model=ModelConfig(
                    model=str(tiny_model_dirs["llama"]), cpu_threads=1, kernel_threads=3
                ),
                cache=CacheConfig(num_blocks=16),
                scheduler=SchedulerConfig(max_num_seqs=2),
                separate_process=False,
            )
        )
        assert torch.get_num_threads() == 1
        assert int4_avx2.kernel_threads() == 3
        module = int4_avx2.load()
        assert module is None or module.get_threads() == 3
        assert apply_cpu_threads(0) == resolve_cpu_threads(0) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
        int4_avx2.set_kernel_threads(kernels_before)
