"""An int4 LM head whose candidates for the largest logit are recomputed exactly.

torch's int4 kernel computes in bfloat16 (server/model/int4.py): inputs, scales and zeros are
rounded to 8 bits of mantissa and so is each output. Inside the decoder that is part of the
int4 model (its tests compare against a dense model rounding the same way), but at the head
it decides tokens: on the embedded SmolLM2 the head's logits moved by up to 0.27 (median row
maximum 0.13), enough to turn "Paris" into "L'Étoile" on a near tie.

So the head runs the kernel for every logit (the 49152 x 576 head reads 10 bits a weight as
two planes of its Q8_0 blocks: 3.5 ms for one row on one thread here against 6.1 ms for the
fp32 table, loadtest/results/engine/lm-head.md; the exact weights are kept a byte a value,
28 MB a plane, beside the packed copy),
bounds the kernel's error E_v on each logit from above, and recomputes in float32, from the
quantized weights themselves (fp32 scales: the file's own values), every logit whose upper
bound reaches the largest lower bound of its row. The true largest logit is always among them
(if |l~_v - l_v| <= E_v, the true argmax v has l~_v + E_v >= l_v >= l_u >= l~_u - E_u for all
u), so greedy decoding is that of the dense weights, and speculative verification sees the
same logits whatever the number of rows. The other logits keep the kernel's error; they lie
at least E_u + E_v below the top (a few logits on SmolLM2), where sampling rarely reaches.

Error bound per row: each product x_i * w_i carries at most ALPHA relative error (x, the
scale and the zero rounded to bf16, and the dequantized weight if the kernel rounds it too),
and the output's rounding adds 2^-9 |l_v|, so |error| <= ALPHA * sum_i |x_i| A_vi + 2^-9 |l_v|,
where A_vi sums |(q - 8) * scale| and |zero| over the planes. Both terms are at most a
multiple of ||x|| ||A_v|| (Cauchy-Schwarz, and |l_v| <= sum_i |x_i| A_vi), so
E_v = (ALPHA + 2^-9) ||x|| ||A_v||, with ||A_v|| computed once at load: it holds with a bias
too (added exactly outside the kernel). On SmolLM2 the measured error stayed under a tenth of
the bound.

specd's AVX2 kernel (kernels/cpu/int4_linear.cpp) computes in float32: each weight is one FMA
(q * scale + offset, rounded once) with offset = zero - 8 scale rounded once at load (an error
of at most u (|zero| + 8 |scale|) on the weight, u = 2^-24), and each output accumulates its
products with FMAs, 8 lanes of n / 8 in input order (n = K times the planes the kernel
reads), then a horizontal sum of 3 adds. With A'_vi = A_vi + 8 |scale| per plane (which
covers |w| and the offset's rounding), the classic dot-product bound gives |error| <=
(n / 8 + 6) u sum_i |x_i| A'_vi to first order; the factor used, (n + 8) u, is several times
that and, for SmolLM2's head, still ~50 times tighter than the bfloat16 one: fewer logits
are rescored.
"""

from __future__ import annotations

import torch
from torch import nn

from server.model.int4 import GROUP_SIZE, Int4Linear, Kernel, QuantizedWeight

# Relative error of one product in torch's kernel: input, scale, zero and weight rounded to bf16.
ALPHA = 4 * 2.0**-9
# torch's kernel's output is rounded to bf16 too.
OUTPUT_ROUNDING = 2.0**-9
# float32's unit roundoff (the AVX2 kernel's arithmetic).
FLOAT32_ROUNDOFF = 2.0**-24


def error_factor(kernel: Kernel, in_features: int, planes: int) -> float:
    """c such that |kernel logit - exact logit| <= c sum_i |x_i| A_vi (module docstring)."""
    if kernel == "avx2":
        return (in_features * planes + 8) * FLOAT32_ROUNDOFF
    # torch's CPU kernel and tinygemm alike: bf16 inputs, scales, zeros and output.
    return ALPHA + OUTPUT_ROUNDING


# Rows of the weight per chunk when the bound's row norms are computed at load (bounds the
# temporary memory: chunk x K x planes floats).
_NORM_CHUNK = 4096


def weight_magnitudes(qw: QuantizedWeight, offset_slack: bool = False) -> torch.Tensor:
    """float32 [N, K]: A_vi = sum over planes of |(q - 8) * scale| + |zero| (+ 8 |scale| with
    ``offset_slack``: the AVX2 kernel's rounded offsets, module docstring)."""
    n, k = qw.shape
    scale = qw.scale.abs().repeat_interleave(GROUP_SIZE, dim=1)
    zero = qw.zero.abs().repeat_interleave(GROUP_SIZE, dim=1)
    mag = (qw.q.float() - 8).abs() * scale + zero
    if offset_slack:
        mag = mag + 8 * scale
    return mag.reshape(n, qw.planes, k).sum(dim=1)


def row_magnitude_norms(qw: QuantizedWeight, offset_slack: bool = False) -> torch.Tensor:
    """float32 [N]: ||A_v||_2 per row v (``weight_magnitudes``), a chunk of rows at a time."""
    n = qw.shape[0]
    norms = [
        weight_magnitudes(qw.rows(slice(start, start + _NORM_CHUNK)), offset_slack).norm(dim=1)
        for start in range(0, n, _NORM_CHUNK)
    ]
    return torch.cat(norms)


class RescoredInt4Head(nn.Module):
    """An Int4Linear LM head (see the module docstring) that returns float32 logits with the
    candidates for each row's largest logit recomputed exactly."""

    def __init__(
        self, qw: QuantizedWeight, bias: torch.Tensor | None = None, kernel: Kernel | None = None
    ) -> None:
        super().__init__()
        self.kernel = Int4Linear(qw, kernel=kernel)
        # Here rather than in the kernel: checkpoints name it lm_head.bias.
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.in_features, self.out_features = qw.shape[1], qw.shape[0]
        # The exact weights, a byte a 4-bit value (unpacking nibbles per call cost more than
        # the rescoring itself): rows are dequantized only for the candidates.
        # On the kernel's device (CUDA for tinygemm): candidates are gathered where the logits are.
        device = self.kernel.packed.device
        self.register_buffer("exact_q", qw.q.to(device).contiguous(), persistent=False)
        self.register_buffer("exact_scales", qw.scale.to(device).contiguous(), persistent=False)
        self.register_buffer("exact_zeros", qw.zero.to(device).contiguous(), persistent=False)
        self.planes = qw.planes
        # C_v = c ||A_v|| per row of the weight (c: the kernel's error_factor), and its
        # maximum: the error bound of logit v is ||x|| C_v (see the module docstring).
        kernel_name = self.kernel.kernel
        factor = error_factor(kernel_name, self.in_features, self.kernel.planes_in_kernel)
        per_row = factor * row_magnitude_norms(qw, offset_slack=kernel_name == "avx2")
        self.register_buffer("bound_per_row", per_row.to(device), persistent=False)
        self.bound_max = float(per_row.max())
        # Counters for tests and benchmarks: rows computed, logits recomputed.
        self.rows_seen = 0
        self.logits_rescored = 0

    def extra_repr(self) -> str:
        return "candidates for the largest logit rescored in float32"

    def exact_weights(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 [len(rows), K]: the quantized weights of those rows, fp32 scales."""
        return QuantizedWeight(
            self.exact_q[rows], self.exact_scales[rows], self.exact_zeros[rows], self.planes
        ).dequantize()

    def candidates(
        self, x: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of every logit whose upper bound reaches its row's largest lower bound.

        Two stages keep the passes over [rows, vocab] to three (max, compare, nonzero): one
        bound per row, E = ||x|| max_v C_v, keeps all within 2E of the top (a superset: no
        logit outside it can be the largest, nor hold the largest lower bound); then the
        per-logit bounds E_v = ||x|| C_v on those. C_v = (ALPHA + 2^-9) ||A_v||.
        """
        high = logits.amax(dim=1, keepdim=True)
        x_norm = x.norm(dim=1, keepdim=True)
        rows, cols = (logits >= high - 2 * self.bound_max * x_norm).nonzero(as_tuple=True)
        found = logits[rows, cols]
        bound = x_norm[rows, 0] * self.bound_per_row[cols]
        floor = torch.full((logits.shape[0],), -torch.inf, device=logits.device).scatter_reduce(
            0, rows, found - bound, "amax"
        )
        keep = found + bound >= floor[rows]
        return rows[keep], cols[keep]

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """[M, V]: an upper bound on |kernel logit - exact logit| for every logit (tests)."""
        return torch.outer(x.norm(dim=1), self.bound_per_row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        logits = self.kernel(x2).float()
        if self.bias is not None:
            logits = logits + self.bias.float()
        if logits.shape[0]:
            rows, cols = self.candidates(x2, logits)
            exact = (self.exact_weights(cols) * x2[rows]).sum(dim=1)
            if self.bias is not None:
                exact = exact + self.bias[cols].float()
            logits[rows, cols] = exact
            self.rows_seen += logits.shape[0]
            self.logits_rescored += int(cols.numel())
        return logits.reshape(*shape[:-1], self.out_features)
