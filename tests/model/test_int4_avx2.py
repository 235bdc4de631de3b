"""specd's float32 AVX2 int4 kernel (kernels/cpu/int4_linear.cpp) against plain torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from server.model import int4, int4_avx2
from server.model.gguf_q4 import decode_q4, decode_q8_0
from server.model.int4 import (
    GROUP_SIZE,
    Int4Linear,
    QuantizedWeight,
    choose_kernel,
    quantize_rtn,
    split_q8,
)
from tests.model.test_int4 import _q4_bytes

needs_kernel = pytest.mark.skipif(
    int4_avx2.load() is None, reason=f"no AVX2 kernel here: {int4_avx2.unavailable_reason()}"
)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The kernel's layout read back in plain torch: value at position p = 8 c + 4 h + d of a
    group is nibble t = 2 c + h of little-endian dword d (int4_avx2.pack's docstring)."""
    n = packed.shape[0]
    groups = packed.reshape(n, -1, 4, 4).to(torch.int64)  # [n, group, dword, byte]
    dwords = sum(groups[..., b] << (8 * b) for b in range(4))  # [n, group, d]
    t = torch.arange(8)
    nibbles = (dwords[..., None] >> (4 * t)) & 0xF  # [n, group, d, t]
    c_h_d = nibbles.permute(0, 1, 3, 2).reshape(n, -1, 4, 2, 4)  # t = 2c + h -> [c, h, d]
    return c_h_d.reshape(n, -1).to(torch.uint8)


def test_packing_puts_every_value_where_the_layout_says() -> None:
    # Independent of the kernel: the layout is checked by reading it back in torch.
    q = torch.randint(0, 16, (24, 4 * GROUP_SIZE), dtype=torch.uint8)
    scale, zero = torch.rand(24, 4), torch.randn(24, 4)
    packed, scales, offsets = int4_avx2.pack(q, scale, zero)
    assert packed.shape == (24, 2 * GROUP_SIZE) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed), q)
    assert torch.equal(scales, scale)
    torch.testing.assert_close(offsets, zero - 8 * scale)


@needs_kernel
@pytest.mark.parametrize("source", ["Q4_0", "Q4_1", "Q8_0", "rtn"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16, 37])
def test_matches_the_dequantized_weights_in_float64(source: str, rows: int) -> None:
    rng = np.random.default_rng(7)
    n, k = 43, 128  # n: not a multiple of the kernel's block of 8 rows
    w = rng.standard_normal((n, k)).astype(np.float32)
    if source == "rtn":
        qw = quantize_rtn(torch.from_numpy(w))
    elif source == "Q8_0":
        from gguf import GGMLQuantizationType
        from gguf import quants as gquants

        qw = decode_q8_0(gquants.quantize(w, GGMLQuantizationType.Q8_0), n, k)
    else:
        qw = decode_q4(_q4_bytes(w, source), source, n, k)
    bias = torch.randn(n)
    x = torch.randn(rows, k)
    layer = Int4Linear(qw, bias, kernel="avx2")
    ref = x.double() @ qw.dequantize().double().t() + bias.double()
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    # float32 products and sums of K = 128 (x 2 planes for Q8_0) terms: float rounding only.
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def _q8_weight(n: int, k: int) -> QuantizedWeight:
    q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    return split_q8(q8, torch.rand(n, k // GROUP_SIZE) * 0.01)


@needs_kernel
@pytest.mark.parametrize("form", ["4-bit", "Q8_0 as int8"])
def test_rows_do_not_depend_on_the_batch_or_the_threads(form: str) -> None:
    """Speculation's verify rows must equal the decode rows they stand for: bit for bit,
    whichever path (registers up to 16 rows, a buffer above) and thread split computes them."""
    qw = quantize_rtn(torch.randn(100, 96)) if form == "4-bit" else _q8_weight(100, 96)
    layer = Int4Linear(qw, kernel="avx2")
    x = torch.randn(70, 96)
    full = layer(x)
    for r in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64):
        assert torch.equal(layer(x[:r]), full[:r])
        assert torch.equal(layer(x[r : r + 1]), full[r : r + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(layer(x), full)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_q8_0_planes_run_as_int8_and_mixed_planes_stay_4_bit() -> None:
    q8 = _q8_weight(40, 64)
    layer = Int4Linear(q8, kernel="avx2")
    assert layer.packed.dtype == torch.int8 and layer.planes_in_kernel == 1
    assert torch.equal(layer.packed.to(torch.int16), _int8_values(q8))
    # A fused matrix of a Q4 part (zero planes added) and a Q8_0 part is not Q8_0 throughout.
    mixed = QuantizedWeight.cat([quantize_rtn(torch.randn(16, 64)), q8])
    fused = Int4Linear(mixed, kernel="avx2")
    assert fused.packed.dtype == torch.uint8 and fused.planes_in_kernel == 2
    x = torch.randn(5, 64)
    for qw, lin in ((q8, layer), (mixed, fused)):
        ref = x.double() @ qw.dequantize().double().t()
        torch.testing.assert_close(lin(x).double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())


def _int8_values(qw: QuantizedWeight) -> torch.Tensor:
    """The int8 values behind split_q8's planes, in plain torch: 16 (hi - 8) + lo."""
    k = qw.shape[1]
    return 16 * (qw.q[:, :k].to(torch.int16) - 8) + qw.q[:, k:].to(torch.int16)


@needs_kernel
def test_no_rows_and_bad_inputs() -> None:
    layer = Int4Linear(quantize_rtn(torch.randn(16, 64)), kernel="avx2")
    assert layer(torch.randn(0, 64)).shape == (0, 16)
    assert layer(torch.randn(2, 3, 64)).shape == (2, 3, 16)  # leading dims kept
    with pytest.raises(RuntimeError, match="multiple of 32 and match"):
        int4_avx2.linear(torch.randn(1, 32), layer.packed, layer.scales, layer.offsets)


def test_the_kernel_is_chosen_by_flag_or_by_timing() -> None:
    qw = quantize_rtn(torch.randn(32, 64))
    assert choose_kernel("aten") == "aten"
    assert choose_kernel("auto") == int4.host_kernel(
        torch.get_num_threads(), int4_avx2.kernel_threads()
    )
    assert Int4Linear(qw).kernel == choose_kernel("auto")
    # An explicit compute dtype asks for torch's kernel (its float32 path is a test reference).
    assert Int4Linear(qw, compute_dtype=torch.float32).kernel == "aten"
    with pytest.raises(ValueError, match="auto, avx2, aten, tinygemm"):
        choose_kernel("int8")
    # Each kernel on its own device only; auto on CUDA is torch's tinygemm kernel.
    assert choose_kernel("auto", "cuda") == "tinygemm"
    assert choose_kernel("tinygemm", "cuda") == "tinygemm"
    with pytest.raises(ValueError, match="tinygemm does not run on cpu; there use auto or avx2"):
        choose_kernel("tinygemm")
    with pytest.raises(ValueError, match="avx2 does not run on cuda; there use auto or tinygemm"):
        choose_kernel("avx2", "cuda")
    with pytest.raises(ValueError, match="run on CPU or CUDA"):
        choose_kernel("auto", "mps")


def test_the_flag_reaches_the_layers(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import build_parser, config_from_args
    from server.config import ModelConfig
    from server.model.loader import load_model
    from tests.tiny_models import make_tiny_model

    args = build_parser().parse_args(["serve", "--int4-kernel", "aten"])
    assert config_from_args(args, environ={}).engine.model.int4_kernel == "aten"
    args = build_parser().parse_args(["serve"])
    cfg = config_from_args(args, environ={"SPECD_INT4_KERNEL": "avx2"})
    assert cfg.engine.model.int4_kernel == "avx2"
    with pytest.raises(ValueError, match="int4_kernel must be"):
        ModelConfig(int4_kernel="int8")  # type: ignore[arg-type]
    monkeypatch.setenv("SPECD_CACHE_DIR", str(tmp_path / "cache"))
    src = make_tiny_model("llama", tmp_path / "llama")
    model, _, _ = load_model(src, "float32", "cpu", quantization="int4", int4_kernel="aten")
    kernels = {m.kernel for m in model.modules() if isinstance(m, Int4Linear)}
    assert kernels == {"aten"}


def test_without_the_kernel_auto_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int4_avx2, "load", lambda: None)
    monkeypatch.setattr(int4_avx2, "unavailable_reason", lambda: "the CPU lacks avx2")
    int4.host_kernel.cache_clear()
    try:
        assert Int4Linear(quantize_rtn(torch.randn(32, 64))).kernel == "aten"
        with pytest.raises(RuntimeError, match="the CPU lacks avx2"):
            choose_kernel("avx2")
    finally:
        int4.host_kernel.cache_clear()


def test_unavailable_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int4_avx2.platform, "machine", lambda: "aarch64")
    assert "not an x86-64 CPU" in (int4_avx2.unavailable_reason() or "")
    monkeypatch.setattr(int4_avx2.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(int4_avx2, "cpu_flags", lambda: {"avx", "sse4_2"})
    assert int4_avx2.unavailable_reason() == "the CPU lacks avx2, fma"
    monkeypatch.setattr(int4_avx2, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(int4_avx2.shutil, "which", lambda name: None)
    assert int4_avx2.unavailable_reason() == "no C++ compiler on PATH"


@needs_kernel
def test_rescored_head_on_the_avx2_kernel_keeps_the_dense_argmax() -> None:
    from server.model.int4_head import RescoredInt4Head
    from tests.model.test_int4 import _near_tie_head

    qw, x = _near_tie_head()
    head = RescoredInt4Head(qw, kernel="avx2")
    exact = x.double() @ qw.dequantize().double().t()
    # The float32 bound holds, and the argmax is exact.
    bound = head.error_bound(x).double()
    assert bool(((head.kernel(x).double() - exact).abs() <= bound).all())
    assert torch.equal(head(x).argmax(1), exact.argmax(1))
    # It is far tighter than the bfloat16 kernel's, so fewer logits are recomputed.
    bf16 = RescoredInt4Head(qw, kernel="aten")
    assert bool((bound * 50 < bf16.error_bound(x).double()).all())
    bf16(x)
    assert head.logits_rescored < bf16.logits_rescored


def test_a_build_lock_left_by_a_killed_compile_is_removed_and_a_live_one_kept(
    tmp_path: Path,
) -> None:
    """torch's loader waits for the lock to go; one left by a compile that was killed would
    hang every later start."""
    assert not int4_avx2.clear_stale_build_lock(tmp_path)  # no lock: nothing to do
    lock = tmp_path / "lock"
    lock.touch()
    assert not int4_avx2.clear_stale_build_lock(tmp_path)  # a compile in progress
    assert lock.exists()
    later = lock.stat().st_mtime + int4_avx2.STALE_LOCK_S + 1
    assert int4_avx2.clear_stale_build_lock(tmp_path, now=later)
    assert not lock.exists()


def test_the_lock_checked_is_in_the_directory_torch_builds_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = int4_avx2._build_directory("specd_probe")
    assert build_dir is not None and build_dir.parent == tmp_path
    assert build_dir.name == "specd_probe"
