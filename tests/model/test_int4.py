"""int4 weights: Q4_0 / Q4_1 block decoding, the int4 linear, round-to-nearest, the config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.model.gguf_q4 import _unpermute_rows, decode_q4, decode_q8_0, hf_name
from server.model.int4 import (
    GROUP_SIZE,
    Int4Linear,
    QuantizedWeight,
    clear_int4_plans,
    plan_int4_layers,
    quantize_rtn,
    split_q8,
)

gquants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402


def _q4_bytes(w: np.ndarray, qtype: str) -> np.ndarray:
    """ggml block bytes of w [N, K] (gguf's reference quantizer), and their dequantization."""
    return gquants.quantize(w, getattr(GGMLQuantizationType, qtype))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_blocks_decode_to_ggufs_own_dequantization(qtype: str) -> None:
    rng = np.random.default_rng(0)
    n, k = 48, 96
    w = rng.standard_normal((n, k)).astype(np.float32)
    raw = _q4_bytes(w, qtype)
    ref = torch.from_numpy(gquants.dequantize(raw, getattr(GGMLQuantizationType, qtype)))
    qw = decode_q4(raw, qtype, n, k)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
    # (q - 8) * d + (m + 8 d) vs d * q + m: equal up to float rounding.
    torch.testing.assert_close(qw.dequantize(), ref.reshape(n, k), rtol=0, atol=1e-6)
    if qtype == "Q4_0":
        assert torch.equal(qw.dequantize(), ref.reshape(n, k))  # zero 0: the same expression


def test_nibble_order_low_is_element_j_high_is_j_plus_16() -> None:
    # One Q4_0 block, d = 1: element j = low nibble of qs[j] - 8, element j + 16 = high nibble.
    qs = np.arange(16, dtype=np.uint8) | (np.uint8(15) - np.arange(16, dtype=np.uint8)) << 4
    raw = np.concatenate([np.array([1.0], np.float16).view(np.uint8), qs])[None, :]
    qw = decode_q4(raw, "Q4_0", 1, 32)
    assert qw.q[0].tolist() == list(range(16)) + list(range(15, -1, -1))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("rows", [1, 3, 16, 37])
def test_int4_linear_matches_dequantized_reference(qtype: str, rows: int) -> None:
    rng = np.random.default_rng(1)
    n, k = 40, 128  # n not a multiple of 16: the packing pads rows
    qw = decode_q4(_q4_bytes(rng.standard_normal((n, k)).astype(np.float32), qtype), qtype, n, k)
    bias = torch.randn(n)
    x = torch.randn(rows, k)
    # The kernel in float32: the dequantized weights, to float rounding.
    exact = Int4Linear(qw, bias, compute_dtype=torch.float32)
    ref = x.double() @ qw.dequantize().double().t() + bias.double()
    out = exact(x)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # As served (bfloat16 activations, scales and zeros; float32 accumulation): against the
    # same weights with bf16 scales / zeros and bf16-rounded inputs, to bf16 output rounding.
    fast = Int4Linear(qw, bias, kernel="aten")
    ref16 = x.bfloat16().double() @ qw.kernel_weight().double().t() + bias.double()
    out16 = fast(x)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16.double(), ref16, rtol=1e-2, atol=2e-2 * ref16.abs().max())


def test_q8_0_blocks_are_two_exact_planes() -> None:
    """Q8_0 (w = d * q8) held as planes 16 d hi + d lo: dequantizes to gguf's own values
    exactly, and the kernel computes with those weights (bf16 scales) in one call."""
    rng = np.random.default_rng(3)
    n, k = 40, 96
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[0, :32] = -1.0  # q8 = -127 and friends: hi at its lowest plane values
    raw = gquants.quantize(w, GGMLQuantizationType.Q8_0)
    ref = torch.from_numpy(gquants.dequantize(raw, GGMLQuantizationType.Q8_0)).reshape(n, k)
    qw = decode_q8_0(raw, n, k)
    assert qw.planes == 2 and qw.shape == (n, k) and qw.q.shape == (n, 2 * k)
    assert int(qw.q.max()) <= 15
    assert torch.equal(qw.dequantize(), ref)
    x = torch.randn(5, k)
    exact = Int4Linear(qw, compute_dtype=torch.float32)
    torch.testing.assert_close(
        exact(x).double(), x.double() @ ref.double().t(), rtol=1e-5, atol=1e-5
    )
    fast = Int4Linear(qw, kernel="aten")
    ref16 = x.bfloat16().double() @ qw.kernel_weight().double().t()
    torch.testing.assert_close(fast(x).double(), ref16, rtol=1e-2, atol=2e-2 * ref16.abs().max())
    t = qw.to_tensors("m")
    back = QuantizedWeight.from_tensors(t["m.qweight"], t["m.scales"], t["m.zeros"], 2)
    assert int(t["m.planes"][0]) == 2 and torch.equal(back.dequantize(), ref)


def test_stacking_weights_of_different_planes_pads_with_zero_planes() -> None:
    one = quantize_rtn(torch.randn(16, 64))
    two = split_q8(torch.randint(-128, 128, (32, 64), dtype=torch.int8), torch.rand(32, 2))
    both = QuantizedWeight.cat([one, two])
    assert both.planes == 2 and both.shape == (48, 64)
    assert torch.equal(both.dequantize(), torch.cat([one.dequantize(), two.dequantize()]))
    x = torch.randn(3, 64)
    lin = Int4Linear(both, compute_dtype=torch.float32)
    ref = x.double() @ both.dequantize().double().t()
    torch.testing.assert_close(lin(x).double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max())


def test_rtn_error_is_at_most_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.rand(64, 1) * 3
    w[3, :32] = 0.25  # a constant group
    qw = quantize_rtn(w)
    step = qw.scale.repeat_interleave(GROUP_SIZE, dim=1)
    err = (w - qw.dequantize()).abs()
    assert bool((err <= step / 2 + 1e-6 * w.abs().max()).all())
    assert torch.equal(qw.dequantize()[3, :32], w[3, :32])


def test_storage_round_trip() -> None:
    qw = quantize_rtn(torch.randn(32, 64))
    t = qw.to_tensors("m")
    assert t["m.qweight"].shape == (32, 32)
    back = QuantizedWeight.from_tensors(t["m.qweight"], t["m.scales"], t["m.zeros"])
    assert torch.equal(back.q, qw.q) and torch.equal(back.dequantize(), qw.dequantize())


def test_row_unpermutation_is_transformers() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    qw = quantize_rtn(torch.randn(8 * 16, 64))
    for heads in (8, 2):
        ours = _unpermute_rows(qw, heads).dequantize().numpy()
        proc = LlamaTensorProcessor(config={})
        theirs = proc._reverse_permute_weights(qw.dequantize().numpy(), heads, heads)
        assert np.array_equal(ours, theirs)


def test_gguf_names() -> None:
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.0.attn_norm.weight") is None


def test_rows_are_computed_independently_of_the_batch() -> None:
    # What padding to a planned row count (and speculation's verify rows) rely on.
    for dtype in (torch.bfloat16, torch.float32):
        lin = Int4Linear(quantize_rtn(torch.randn(96, 64)), compute_dtype=dtype)
        x = torch.randn(70, 64)
        full = lin(x)
        for r in (1, 2, 7, 16, 33, 64):
            assert torch.equal(lin(x[:r]), full[:r])


def test_few_row_plan_keeps_results() -> None:
    lin = Int4Linear(quantize_rtn(torch.randn(64, 64)), kernel="aten")
    x = torch.randn(9, 64)
    before = lin(x)
    clear_int4_plans()
    try:
        plans = plan_int4_layers([lin])
        plan = plans[(64, 64)]
        assert len(plan) == 64 and all(c.rows >= r for r, c in enumerate(plan, 1))
        assert torch.equal(lin(x), before)
    finally:
        clear_int4_plans()


def test_config_and_flag() -> None:
    from server.cli import build_parser, config_from_args
    from server.config import ModelConfig

    assert ModelConfig().quantization == "auto"
    with pytest.raises(ValueError, match="auto, none or int4"):
        ModelConfig(quantization="int8")  # type: ignore[arg-type]
    args = build_parser().parse_args(["serve", "--quantization", "int4"])
    assert config_from_args(args, environ={}).engine.model.quantization == "int4"
    args = build_parser().parse_args(["serve"])
    cfg = config_from_args(args, environ={"SPECD_QUANTIZATION": "none"})
    assert cfg.engine.model.quantization == "none"


def test_reading_a_gguf_file_matches_transformers_processing(tmp_path) -> None:
    """Q4 tensors written to a GGUF file come back by HF name, q/k rows un-permuted as
    transformers' GGUF loader does, equal to its dequantization."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from server.model.gguf_q4 import exact_int4_tensors, q4_summary

    rng = np.random.default_rng(2)
    shapes = {
        "blk.0.attn_q.weight": ((64, 64), "Q4_1"),
        "blk.0.attn_k.weight": ((32, 64), "Q4_0"),
        "blk.0.ffn_down.weight": ((64, 128), "Q4_1"),
    }
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    raws = {}
    for name, ((n, k), qtype) in shapes.items():
        raws[name] = _q4_bytes(rng.standard_normal((n, k)).astype(np.float32), qtype)
        writer.add_tensor(name, raws[name], raw_dtype=getattr(GGMLQuantizationType, qtype))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    class Cfg:
        num_attention_heads, num_key_value_heads = 4, 2

    got = exact_int4_tensors(path, Cfg())
    assert q4_summary(path) == (3, 3)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, ((n, k), qtype) in shapes.items():
        deq = gquants.dequantize(raws[name], getattr(GGMLQuantizationType, qtype)).reshape(n, k)
        expected = proc.process(deq, name).weights
        ours = got[hf_name(name)].dequantize().numpy()
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def _near_tie_head(n: int = 512, k: int = 96) -> tuple[QuantizedWeight, torch.Tensor]:
    """A Q8_0-like head whose rows come in near-equal pairs (logits a hair apart), and inputs."""
    torch.manual_seed(4)
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    q8[1::2] = q8[0::2]
    q8[1::2, 0] = (q8[0::2, 0].to(torch.int16) + 1).clamp(-127, 127).to(torch.int8)
    d = torch.rand(n, k // GROUP_SIZE) * 0.02 + 0.001
    d[1::2] = d[0::2]
    return split_q8(q8, d), torch.randn(200, k) * 3


def test_rescored_head_argmax_is_the_dense_heads() -> None:
    from server.model.int4_head import RescoredInt4Head

    qw, x = _near_tie_head()
    # torch's bf16 kernel: its error turns some near ties, which the rescoring mends.
    head = RescoredInt4Head(qw, kernel="aten")
    exact = x.double() @ qw.dequantize().double().t()
    kernel = head.kernel(x).double()
    out = head(x)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    # The bound holds, and the kernel alone picks another token on some near tie.
    bound = head.error_bound(x).double()
    assert bool(((kernel - exact).abs() <= bound).all())
    assert bool((kernel.argmax(1) != exact.argmax(1)).any())
    assert torch.equal(out.argmax(1), exact.argmax(1))
    # The recomputed logits are the dense ones; each row's largest is among them.
    top = exact.argmax(1)
    got, want = out.double().gather(1, top[:, None]), exact.gather(1, top[:, None])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # float32 sums
    assert head.rows_seen == 200 and head.logits_rescored >= 200
    # Rows do not depend on the batch (verify rows see what plain decode sees).
    for r in (1, 3, 64):
        assert torch.equal(head(x[:r]), out[:r])


def test_rescored_head_bias() -> None:
    from server.model.int4_head import RescoredInt4Head

    qw, x = _near_tie_head(64, 64)
    bias = torch.randn(64)
    head = RescoredInt4Head(qw, bias)
    exact = x.double() @ qw.dequantize().double().t() + bias.double()
    assert torch.equal(head(x).argmax(1), exact.argmax(1))
    assert [n for n, _ in head.named_parameters()] == ["bias"]
