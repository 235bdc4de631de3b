"""Rope parameters and frequencies against transformers' own rope initialisers."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from server.model.layers import RotaryEmbedding, rope_inv_freq, rope_parameters

LLAMA31 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
    "rope", [LLAMA31, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}]
)
def test_scaled_inv_freq_matches_transformers(rope):
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=dict(rope))
    params = rope_parameters(cfg)
    assert params["rope_type"] == rope["rope_type"]
    theirs, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, torch.device("cpu"))
    assert scaling == 1.0
    ours = rope_inv_freq(128, params, torch.float32)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)


def test_default_rope_theta_from_either_field():
    cfg = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 12345.0})
    assert rope_parameters(cfg)["rope_theta"] == 12345.0

    class Old:  # a transformers-4 style config: rope_theta + rope_scaling
        rope_theta = 777.0
        rope_scaling = None

    assert rope_parameters(Old()) == {"rope_type": "default", "rope_theta": 777.0}


def test_unsupported_rope_type_says_so():
    with pytest.raises(ValueError, match="yarn"):
        rope_inv_freq(64, {"rope_type": "yarn", "rope_theta": 1e4}, torch.float32)


def test_rotary_tables_shape_and_position_zero():
    rot = RotaryEmbedding(8, {"rope_type": "default", "rope_theta": 10000.0})
    cos, sin = rot.cos_sin(torch.tensor([0, 5, 7]), torch.float64)
    assert cos.shape == (3, 1, 8) and cos.dtype == torch.float64
    assert torch.all(cos[0] == 1) and torch.all(sin[0] == 0)
