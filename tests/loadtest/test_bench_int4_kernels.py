"""loadtest.bench_int4_kernels' timing and report on small random int4 layers (the script's
main reads the embedded model's weights; this checks its pieces, not a measurement)."""

from __future__ import annotations

import pytest
import torch

from loadtest import bench_int4_kernels
from loadtest.bench_engine import machine_info
from server.model import int4_avx2
from server.model.int4 import Int4Linear, quantize_rtn


@pytest.mark.skipif(int4_avx2.load() is None, reason="no AVX2 kernel here")
def test_kernels_take_turns_and_the_report_has_a_row_per_row_count() -> None:
    weights = [quantize_rtn(torch.randn(64, 64)) for _ in range(3)]
    layers = {k: [Int4Linear(qw, kernel=k) for qw in weights] for k in ("aten", "avx2")}
    ms = bench_int4_kernels.forward_ms(layers, rows=2, rounds=3)
    assert set(ms) == {"aten", "avx2"} and all(v > 0 for v in ms.values())
    result = {
        "command": "python -m loadtest.bench_int4_kernels --rows 1 2",
        "machine": machine_info(),
        "load_average": {"start": [0.5, 0.4, 0.3], "end": [0.6, 0.5, 0.4]},
        "torch_threads": 1,
        "decoder_matrices": 3,
        "rows": [
            {"rows": r, "decoder_ms": {"aten": 2.0, "avx2": 1.0}, "head_ms": ms} for r in (1, 2)
        ],
    }
    md = bench_int4_kernels.report(result)
    assert md.startswith("# CPU int4 kernels, ")
    assert "Command: `python -m loadtest.bench_int4_kernels --rows 1 2`" in md
    assert "Load average at start: 0.50 0.40 0.30; at end: 0.60 0.50 0.40." in md
    assert "\n| 1 | 2.00 | 1.00 | 2.00x |" in md and "\n| 2 | 2.00 | 1.00 | 2.00x |" in md
