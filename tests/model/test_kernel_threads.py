"""--kernel-threads: specd's CPU kernels split each call over a pool whose caller never waits
for a worker to wake (kernels/cpu/work_pool.h). Which thread computes a chunk must not change
a bit of any output, however the workers are scheduled."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from server.cli import build_parser, config_from_args
from server.config import ModelConfig
from server.model import attention_cpu, cpu_threads, int4_avx2
from server.model.cpu_threads import apply_kernel_threads, resolve_kernel_threads
from server.model.int4 import Int4Linear, quantize_rtn
from tests.model.test_attention_cpu import _call
from tests.model.test_int4_avx2 import _q8_weight

needs_kernels = pytest.mark.skipif(
    int4_avx2.load() is None or attention_cpu.load() is None,
    reason=f"no AVX2 kernels here: {int4_avx2.unavailable_reason()}",
)


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = int4_avx2.kernel_threads()
    yield
    int4_avx2.set_kernel_threads(before)  # also re-applies it to the loaded extension


def _layers() -> list[Int4Linear]:
    torch.manual_seed(0)
    return [
        Int4Linear(quantize_rtn(torch.randn(200, 96)), kernel="avx2"),
        Int4Linear(_q8_weight(1000, 64), kernel="avx2"),
    ]


def _outputs(layers: list[Int4Linear], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randn(12, 16, 3, 64, generator=g)
    v_cache = torch.randn(12, 16, 3, 64, generator=g)
    rows = [list(range(n)) for n in (1, 40, 191, 7)]
    q = torch.randn(len(rows), 9, 64, generator=g)
    out = [layer(x[:, : layer.in_features]) for x in xs for layer in layers]
    out.append(_call(q, k_cache, v_cache, rows, 0.125))
    return out


@needs_kernels
@pytest.mark.parametrize(("threads", "spin_us"), [(2, 1000), (2, 0), (3, 200), (8, 50)])
def test_outputs_are_bitwise_those_of_one_thread(restore_threads, threads, spin_us) -> None:
    """Many calls in a row, of every size the kernels split differently (1..70 rows, a tail
    block), against one thread. spin_us 0: workers sleep between calls and join late; 8
    threads on this machine's cores: workers lose their core mid-call."""
    layers = _layers()
    xs = [torch.randn(r, 96) for r in (1, 2, 5, 9, 16, 17, 70)]
    module = int4_avx2.load()
    module.set_threads(1, 0)
    expected = _outputs(layers, xs)
    module.set_threads(threads, spin_us)
    assert module.get_threads() == threads
    for _ in range(30):
        got = _outputs(layers, xs)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize(("cores", "requested", "expected"), [(2, 0, 2), (1, 0, 1), (2, 1, 1)])
def test_auto_takes_every_core(monkeypatch, cores: int, requested: int, expected: int) -> None:
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: cores)
    assert resolve_kernel_threads(requested) == expected


def test_flag_and_validation(restore_threads) -> None:
    assert ModelConfig().kernel_threads == 0
    with pytest.raises(ValueError, match="kernel_threads must be >= 0"):
        ModelConfig(kernel_threads=-1)
    args = build_parser().parse_args(["serve", "--kernel-threads", "1"])
    assert config_from_args(args, environ={}).engine.model.kernel_threads == 1
    with pytest.raises(ValueError, match="kernel threads must be >= 1"):
        int4_avx2.set_kernel_threads(0)
    assert apply_kernel_threads(0) == len(os.sched_getaffinity(0)) == int4_avx2.kernel_threads()
