"""4-bit weights in groups of 32 along the input dim, computed by torch's CPU int4 kernel.

A quantized weight [N, K] is q in 0..15 with, per row and group of GROUP_SIZE inputs, a scale
and a zero: w = (q - 8) * scale + zero. That is the form of
``torch.ops.aten._weight_int4pack_mm_for_cpu`` (checked against a dense reference on torch
2.13: scales_and_zeros is [K / group, N, 2] holding (scale, zero)), and both GGUF 4-bit types
map onto it exactly: Q4_0 (w = d * (q - 8)) is scale d, zero 0; Q4_1 (w = d * q + m) is
scale d, zero m + 8 d. GGUF's Q8_0 (w = d * q, q int8) is exact as two 4-bit planes summed
in the kernel's accumulator (``split_q8``). The embedded SmolLM2's LM head (its Q8_0
embedding, 49152 x 576) runs that way 1.2-1.8x faster than dense fp32 at 1-16 rows on one
thread and slower from 32 rows (``python -m loadtest.bench_lm_head``,
loadtest/results/engine/lm-head.md).

Decode on CPU is bound by the bytes of weights read per token; these read ~1/6 of fp32's
(4 bits a weight plus a bf16 scale and zero per 32 weights: 5 bits a weight).

The kernel computes in bfloat16 (COMPUTE_DTYPE): in torch 2.13 its float32 path is ~10-20x
slower than its bfloat16 one on this machine (seen 1.7 ms vs 0.08-0.15 ms for one row of a
1536 x 576 matrix, noisy) and slower than a dense fp32 matmul, so float32 would defeat the
purpose. bfloat16 rounds each layer's input activations, the scales and zeros (8 bits of
mantissa; a GGUF fp16 scale loses 3) and the output; the sums themselves are wider (against
a float64 product of the same bf16 inputs the error is at the output's bf16 rounding, 2^-9).
The model around the linears (norms, attention, residuals) stays float32.

Where the CPU has AVX2 and FMA, specd's own float32 kernel (server/model/int4_avx2.py) is
used instead when a quick timing at load finds it faster: on CPUs without AVX-512 BF16,
torch's kernel emulates bfloat16 and is the slower of the two. ``--int4-kernel`` (``auto``,
``avx2``, ``aten``; ModelConfig.int4_kernel) overrides the choice. A layer keeps its kernel
for every row count, so a verify row is computed as the decode row it stands for.

On CUDA the layers use torch's tinygemm kernel, ``torch.ops.aten._weight_int4pack_mm``
(``tinygemm``): the same w = (q - 8) * scale + zero, bfloat16 activations, scales and zeros
(the model runs in bfloat16 there), weights repacked on the device by
``_convert_weight_to_int4pack`` (two values a byte, even k in the high nibble, as torch's
own tests pack them). ``make gpu-check`` measured it on an H200 at Llama-3-8B shapes
(loadtest/results/gpu/2026-12-04-nvidia-h200.md): within 4% of the error bound the int4
head assumes for bf16 kernels, each row the same whatever the row count, but 1.0-1.4x a dense
bf16 linear only at one row, 0.1-0.7x at 8-64 rows and 0.04x at 512; so on CUDA it is served
only when named (server/model/quantize.py), for its memory.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from server.model import int4_avx2
from server.model.cpu_linear import FEW_ROWS, LARGE_WEIGHT, RowChoice, plan_groups

logger = logging.getLogger(__name__)

GROUP_SIZE = 32
# The CPU packing wants N divisible by 16; other row counts are padded with zero rows.
_ROW_MULTIPLE = 16
# The checkpoint tensors of one int4 module (QuantizedWeight.to_tensors); ".planes" only
# when there are several.
TENSOR_SUFFIXES = (".qweight", ".scales", ".zeros", ".planes")
# inner_k_tiles of _convert_weight_to_int4pack_for_cpu (the CPU kernel accepts 2, 4 or 8).
_INNER_K_TILES = 2
# inner_k_tiles of the CUDA packing, largest first: K must be a multiple of 16 times it.
_CUDA_INNER_K_TILES = (8, 4, 2)
# The kernel's activation / scale dtype (see the module docstring). float32 is exact to float
# rounding against dequantize() and serves as the reference in tests.
COMPUTE_DTYPE = torch.bfloat16

Kernel = Literal["aten", "avx2", "tinygemm"]
# The kernels that run on each device type (auto: on CPU the faster, timed; on CUDA tinygemm).
DEVICE_KERNELS: dict[str, tuple[Kernel, ...]] = {"cpu": ("avx2", "aten"), "cuda": ("tinygemm",)}
KERNEL_NAMES: tuple[Kernel, ...] = ("avx2", "aten", "tinygemm")


@dataclass
class QuantizedWeight:
    """w[n, k] = (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G]; G = GROUP_SIZE.

    With ``planes`` > 1 the weight is a sum of 4-bit planes laid side by side along the input
    dim: q is [N, planes * K] and w = sum over p of plane p (columns p * K .. (p + 1) * K).
    An 8-bit block is two planes (``split_q8``); the kernel sees one [N, planes * K] matrix
    and an input repeated ``planes`` times, so the planes are summed inside its accumulator.
    """

    q: torch.Tensor  # uint8 [N, planes * K], values 0..15
    scale: torch.Tensor  # float32 [N, planes * K / G]
    zero: torch.Tensor  # float32 [N, planes * K / G]
    planes: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1] // self.planes)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], computed as the kernel does: (q - 8) * scale + zero, planes summed."""
        scale = self.scale.repeat_interleave(GROUP_SIZE, dim=1)
        zero = self.zero.repeat_interleave(GROUP_SIZE, dim=1)
        w = (self.q.float() - 8) * scale + zero
        if self.planes == 1:
            return w
        n, k = self.shape
        return w.reshape(n, self.planes, k).sum(dim=1)

    def kernel_weight(self, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
        """float32 [N, K]: the weights the kernel computes with, scales and zeros in ``dtype``."""
        return QuantizedWeight(
            self.q, self.scale.to(dtype).float(), self.zero.to(dtype).float(), self.planes
        ).dequantize()

    def rows(self, index: torch.Tensor | slice) -> QuantizedWeight:
        return QuantizedWeight(self.q[index], self.scale[index], self.zero[index], self.planes)

    def with_planes(self, planes: int) -> QuantizedWeight:
        """The same weight in ``planes`` planes: the extra ones are zero (q 8, scale and zero 0)."""
        extra = planes - self.planes
        if extra <= 0:
            return self
        n, k = self.shape
        groups = k // GROUP_SIZE
        return QuantizedWeight(
            torch.cat([self.q, self.q.new_full((n, extra * k), 8)], dim=1),
            torch.cat([self.scale, self.scale.new_zeros(n, extra * groups)], dim=1),
            torch.cat([self.zero, self.zero.new_zeros(n, extra * groups)], dim=1),
            planes,
        )

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Stacked along N (fused q/k/v, gate/up): groups run along K, so this is exact. Parts
        with fewer planes get zero planes (a Q4 q_proj fused with a Q8_0 v_proj)."""
        planes = max(p.planes for p in parts)
        parts = [p.with_planes(planes) for p in parts]
        return QuantizedWeight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.zero for p in parts]),
            planes,
        )

    # Storage: two values a byte (even k in the low nibble) halves the cache entry.
    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        q = self.q.reshape(self.q.shape[0], -1, 2)
        out = {
            f"{prefix}.qweight": (q[..., 0] | (q[..., 1] << 4)).contiguous(),
            f"{prefix}.scales": self.scale.contiguous(),
            f"{prefix}.zeros": self.zero.contiguous(),
        }
        if self.planes > 1:
            out[f"{prefix}.planes"] = torch.tensor([self.planes], dtype=torch.int32)
        return out

    @staticmethod
    def from_tensors(
        packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, planes: int = 1
    ) -> QuantizedWeight:
        q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        return QuantizedWeight(q, scales.float(), zeros.float(), planes)


def split_q8(q8: torch.Tensor, d: torch.Tensor) -> QuantizedWeight:
    """An 8-bit weight w = d * q8 (q8 int8 [N, K], one scale d per group of 32: GGUF's Q8_0)
    as two exact 4-bit planes: q8 = 16 hi + lo with hi = q8 >> 4 in -8..7 and lo = q8 & 15.
    Plane hi: (hi + 8 - 8) * 16 d + 0; plane lo: (lo - 8) * d + 8 d. The kernel reads 10 bits a
    weight instead of 32 and computes the 8-bit weights exactly (scales rounded to its dtype)."""
    q = q8.to(torch.int16)
    hi = (q >> 4) + 8
    lo = q & 15
    d = d.float()
    return QuantizedWeight(
        torch.cat([hi, lo], dim=1).to(torch.uint8),
        torch.cat([16 * d, d], dim=1),
        torch.cat([torch.zeros_like(d), 8 * d], dim=1),
        planes=2,
    )


def supports(shape: tuple[int, ...]) -> bool:
    """Whether a weight [N, K] can take the int4 path (K in whole groups)."""
    return len(shape) == 2 and shape[1] % GROUP_SIZE == 0


def quantize_rtn(w: torch.Tensor) -> QuantizedWeight:
    """Round-to-nearest asymmetric quantization per group of GROUP_SIZE along the input dim.

    scale = (max - min) / 15 and zero = min + 8 scale, so q = round((w - min) / scale)
    reconstructs every element within scale / 2.
    """
    n, k = w.shape
    g = w.detach().float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = (hi - lo) / 15
    # A constant group: any positive scale works; q = 0 then reconstructs lo exactly.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - lo[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)
    zero = lo + 8 * scale
    return QuantizedWeight(q.reshape(n, k), scale, zero)


def relative_error(w: torch.Tensor, qw: QuantizedWeight) -> float:
    """||w - deq(qw)||_F / ||w||_F."""
    w = w.float()
    return float((w - qw.dequantize()).norm() / w.norm().clamp_min(1e-30))


class Int4Linear(nn.Module):
    """A linear layer whose weight is held packed for one int4 kernel: torch's CPU kernel
    (``aten``), specd's AVX2 one (``avx2``) or torch's CUDA one (``tinygemm``, packed on the
    current CUDA device).

    Inputs are cast to ``compute_dtype`` (see the module docstring) and outputs back to the
    input's dtype. The bias, if any, stays a parameter so checkpoints load it as before.
    """

    def __init__(
        self,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = COMPUTE_DTYPE,
        kernel: Kernel | None = None,
    ) -> None:
        super().__init__()
        n, k = qw.shape
        if not supports(qw.shape):
            raise ValueError(f"int4 needs in_features divisible by {GROUP_SIZE} (got {k})")
        self.in_features, self.out_features = k, n
        self.planes = qw.planes
        # An explicit compute dtype other than the default asks for torch's kernel (tests use
        # its float32 path as a reference).
        if kernel is None:
            kernel = choose_kernel() if compute_dtype == COMPUTE_DTYPE else "aten"
        self.kernel: Kernel = kernel
        self.compute_dtype = torch.float32 if kernel == "avx2" else compute_dtype
        if kernel == "tinygemm":
            self.compute_dtype = torch.bfloat16
            self.planes_in_kernel = qw.planes
            self._pack_for_tinygemm(qw)
        elif kernel == "avx2":
            # Q8_0 blocks (two planes from split_q8) go as int8: half the vector work.
            q8 = int4_avx2.as_q8(qw.q, qw.scale, qw.zero) if qw.planes == 2 else None
            packed, scales, offsets = q8 or int4_avx2.pack(qw.q, qw.scale, qw.zero)
            self.planes_in_kernel = 1 if q8 is not None else qw.planes
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scales", scales, persistent=False)
            self.register_buffer("offsets", offsets, persistent=False)
        else:
            self.planes_in_kernel = qw.planes
            self._pack_for_torch(qw)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def _pack_for_torch(self, qw: QuantizedWeight) -> None:
        q, scale, zero = _padded_rows(qw)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), _INNER_K_TILES
        )
        self.register_buffer("packed", packed, persistent=False)
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(self.compute_dtype).contiguous()
        self.register_buffer("scales_and_zeros", sz, persistent=False)

    def _pack_for_tinygemm(self, qw: QuantizedWeight) -> None:
        """torch's CUDA layout: N padded to a multiple of 16 with zero rows, q two values a
        byte (even k high), scales and zeros bf16 [K / G, N, 2]; on the current CUDA device."""
        device = torch.device("cuda", torch.cuda.current_device())
        q, scale, zero = (t.to(device) for t in _padded_rows(qw))
        k = q.shape[1]
        tiles = next(t for t in _CUDA_INNER_K_TILES if k % (16 * t) == 0)
        pairs = ((q[:, ::2].to(torch.int32) << 4) | q[:, 1::2].to(torch.int32)).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), tiles)
        self.register_buffer("packed", packed, persistent=False)
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.register_buffer("scales_and_zeros", sz, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 g{GROUP_SIZE}{f' x {self.planes} planes' if self.planes > 1 else ''}, "
            f"{self.kernel} kernel, {self.compute_dtype}"
        )

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in the compute dtype."""
        x = x.to(self.compute_dtype)
        if self.planes_in_kernel > 1:
            x = x.repeat(1, self.planes_in_kernel)
        if self.kernel == "avx2":
            return int4_avx2.linear(x, self.packed, self.scales, self.offsets)
        if self.kernel == "tinygemm":
            out = torch.ops.aten._weight_int4pack_mm(
                x.contiguous(), self.packed, GROUP_SIZE, self.scales_and_zeros
            )
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.packed, GROUP_SIZE, self.scales_and_zeros
            )
        return out[:, : self.out_features] if out.shape[1] != self.out_features else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rows = x2.shape[0]
        plan = _PLANS.get(plan_key(self)) if self.kernel == "aten" else None
        if plan is not None and 1 <= rows <= FEW_ROWS and plan[rows - 1].rows > rows:
            padded = torch.cat([x2, x2.new_zeros(plan[rows - 1].rows - rows, x2.shape[1])])
            out = self._mm(padded)[:rows]
        else:
            out = self._mm(x2)
        out = out.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def _padded_rows(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) with N padded to a multiple of _ROW_MULTIPLE by rows that compute 0."""
    pad = -qw.shape[0] % _ROW_MULTIPLE
    q, scale, zero = qw.q, qw.scale, qw.zero
    if pad:
        q = torch.cat([q, q.new_full((pad, q.shape[1]), 8)])
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
    return q, scale, zero


# ---- few-row plan (as server/model/cpu_linear.py does for dense linears) -------------------

# (out, in, planes, compute dtype, torch threads) -> choices for rows 1..FEW_ROWS (index rows - 1).
# Only torch's kernel is planned: the AVX2 kernel's time grows smoothly with the rows.
_PlanKey = tuple[int, int, int, torch.dtype, int]
_PLANS: dict[_PlanKey, tuple[RowChoice, ...]] = {}
_ROUNDS, _CALLS = 3, 3


def plan_key(layer: Int4Linear) -> _PlanKey:
    return (
        layer.out_features,
        layer.in_features,
        layer.planes,
        layer.compute_dtype,
        torch.get_num_threads(),
    )


def _time_rows(layers: list[Int4Linear], max_rows: int = FEW_ROWS) -> np.ndarray:
    """seconds[r - 1, 0] per call for rows 1..max_rows, rotating over ``layers`` (so weights
    come from memory, as in a forward), min over rounds that sweep all row counts."""
    xs = [torch.randn(r, layers[0].in_features) for r in range(1, max_rows + 1)]
    seconds = np.full((max_rows, 1), np.inf)
    for x in xs:  # warm-up
        layers[0]._mm(x)
    turn = 0
    for _ in range(_ROUNDS):
        for r, x in enumerate(xs):
            start = time.perf_counter()
            for _ in range(_CALLS):
                layers[turn % len(layers)]._mm(x)
                turn += 1
            seconds[r, 0] = min(seconds[r, 0], (time.perf_counter() - start) / _CALLS)
    return seconds


def plan_int4_linears(model: nn.Module) -> dict[tuple[int, int], tuple[RowChoice, ...]]:
    """Times every Int4Linear shape of ``model`` (lm_heads aside) at 1..FEW_ROWS rows and
    pads row counts to a larger one where that is >= 10 % faster (cpu_linear.choose_rows)."""
    return plan_int4_layers(
        m
        for m in model.modules()
        if isinstance(m, Int4Linear)
        and m.kernel == "aten"
        and m.packed.device.type == "cpu"
        and m.in_features * m.out_features < LARGE_WEIGHT
    )


def plan_int4_layers(layers: Iterable[Int4Linear]) -> dict[tuple[int, int], tuple[RowChoice, ...]]:
    return plan_groups(layers, plan_key, _PLANS, _time_rows, "int4 linear")


def clear_int4_plans() -> None:
    _PLANS.clear()


# ---- which kernel -----------------------------------------------------------------------------

# The shape timed to choose a kernel (SmolLM2-135M's gate/up projection: a typical decoder
# matrix), the row counts that matter (decode, a short verify chain, a longer one) and how many
# distinct matrices the calls rotate over (so weights come from memory, as in a forward).
_CHOICE_SHAPE = (1536, 576)
_CHOICE_ROWS = (1, 4, 16)
_CHOICE_LAYERS = 8


def choose_kernel(wanted: str = "auto", device_type: str = "cpu") -> Kernel:
    """The kernel ``wanted`` names (``--int4-kernel``), or for ``auto`` the one for
    ``device_type``: on CPU the faster of the two on this machine (``host_kernel``), on CUDA
    torch's tinygemm kernel. Raises ValueError for a kernel that doesn't run on the device."""
    if wanted not in ("auto", *KERNEL_NAMES):
        raise ValueError(f"int4 kernel must be auto, {', '.join(KERNEL_NAMES)} (got {wanted!r})")
    runs_here = DEVICE_KERNELS.get(device_type)
    if runs_here is None:
        raise ValueError(f"int4 weights run on CPU or CUDA (got device {device_type!r})")
    if wanted != "auto" and wanted not in runs_here:
        raise ValueError(
            f"--int4-kernel {wanted} does not run on {device_type}; there use "
            f"{' or '.join(('auto', *runs_here))}"
        )
    if device_type == "cuda":
        return "tinygemm"
    if wanted == "aten":
        return "aten"
    if wanted == "avx2":
        if int4_avx2.load() is None:
            raise RuntimeError(
                "--int4-kernel avx2 but the kernel is not available: "
                f"{int4_avx2.unavailable_reason() or 'it failed to build (see the log)'}"
            )
        return "avx2"
    return host_kernel(torch.get_num_threads(), int4_avx2.kernel_threads())


@functools.cache
def host_kernel(threads: int, kernel_threads: int = 1) -> Kernel:
    """The kernel that computes a decoder-sized int4 matrix faster here, summed over 1, 4 and
    16 rows (the fastest of 7 rounds in which the two take turns); torch's where the AVX2 kernel
    can't be had. Timed once per process and thread counts (torch's, ``threads``; specd's
    kernels', ``kernel_threads``; ~0.3 s with quantizing the probe matrices), logged."""
    if int4_avx2.load() is None:
        return "aten"
    generator = torch.Generator().manual_seed(0)
    weights = [
        quantize_rtn(torch.randn(*_CHOICE_SHAPE, generator=generator))
        for _ in range(_CHOICE_LAYERS)
    ]
    layers = {k: [Int4Linear(qw, kernel=k) for qw in weights] for k in ("aten", "avx2")}
    seconds = {k: 0.0 for k in layers}
    for rows in _CHOICE_ROWS:
        # The fastest round, not the median: a busy neighbour slows the AVX2 kernel (2
        # threads) far more than torch's (1 thread), and a server that started while the
        # host was busy took medians of 2.2 ms for the AVX2 kernel (0.4-0.7 ms quiet) against
        # 2.0 for torch's and served a whole sweep 2x slower.
        for k, t in kernel_seconds(layers, rows, rounds=7, fastest=True).items():
            seconds[k] += t / len(weights)
    choice: Kernel = "avx2" if seconds["avx2"] < seconds["aten"] else "aten"
    logger.info(
        "int4 kernel: %s (a %d x %d matrix at %s rows took %.0f us with torch's bf16 kernel, "
        "%.0f us with the AVX2 float32 one; %d torch / %d kernel threads)",
        choice,
        *_CHOICE_SHAPE,
        "/".join(map(str, _CHOICE_ROWS)),
        seconds["aten"] * 1e6,
        seconds["avx2"] * 1e6,
        threads,
        kernel_threads,
    )
    return choice


def kernel_seconds(
    layers: dict[Kernel, list[Int4Linear]], rows: int, rounds: int, fastest: bool = False
) -> dict[Kernel, float]:
    """Median (``fastest``: least) seconds to run every layer of each kernel once on
    ``rows`` random rows. The
    kernels take turns round by round, so that a slow moment of a shared machine falls on
    both rather than on whichever was timed then; a group's layers are distinct matrices, so
    weights come from memory as in a forward. Used by ``host_kernel`` and
    loadtest/bench_int4_kernels.py."""
    in_features = {layer.in_features for group in layers.values() for layer in group}
    xs = {k: torch.randn(rows, k) for k in in_features}
    times: dict[Kernel, list[float]] = {kernel: [] for kernel in layers}
    for group in layers.values():  # warm-up: first calls allocate
        for layer in group:
            layer._mm(xs[layer.in_features])
    for _ in range(rounds):
        for kernel, group in layers.items():
            start = time.perf_counter()
            for layer in group:
                layer._mm(xs[layer.in_features])
            times[kernel].append(time.perf_counter() - start)
    reduce = np.min if fastest else np.median
    return {kernel: float(reduce(t)) for kernel, t in times.items()}
