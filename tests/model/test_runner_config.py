"""ModelRunner set-up: cache sizing, max_model_len, EOS ids."""

from __future__ import annotations

import pytest

from server.config import CacheConfig, EngineConfig, ModelConfig
from server.model.runner import ModelRunner
from tests.model.harness import make_runner
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama") / "m")


def _runner(path, **cache) -> ModelRunner:
    return ModelRunner(
        EngineConfig(
            model=ModelConfig(model=str(path), device="cpu"),
            cache=CacheConfig(**cache),
        )
    )


def test_properties(llama):
    r = make_runner(llama, num_blocks=10, block_size=8)
    assert (r.num_blocks, r.block_size, r.vocab_size, r.max_model_len) == (10, 8, 320, 512)
    assert r.eos_token_ids == frozenset({2})
    assert r.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    # [layers, K/V, blocks, block_size, kv heads, head_dim]
    assert tuple(r.kv_cache.shape) == (2, 2, 10, 8, 2, 16)


def test_num_blocks_from_memory(llama):
    r = _runner(llama, kv_cache_memory=1 << 20, block_size=16)
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K+V x layers x tokens x kv heads x dim x fp32
    assert r.kv_bytes_per_block() == per_block
    assert r.num_blocks == (1 << 20) // per_block
    with pytest.raises(ValueError, match="kv-cache-memory"):
        _runner(llama, kv_cache_memory=100)


def test_max_model_len_validated(llama):
    cfg = EngineConfig(model=ModelConfig(model=str(llama), device="cpu", max_model_len=10_000))
    with pytest.raises(ValueError, match="max-model-len"):
        ModelRunner(cfg)


def test_sliding_window_caps_max_model_len(tmp_path):
    path = make_tiny_model("mistral", tmp_path / "m", sliding_window=128)
    assert make_runner(path).max_model_len == 128
