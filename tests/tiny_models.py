"""Tiny random Llama-family models and a tokenizer, built offline (no model hub).

Shared by the whole test suite::

    from tests.tiny_models import make_tiny_model
    path = make_tiny_model("llama", tmp_path / "m")   # a HF directory: config, safetensors,
                                                      # tokenizer (ChatML template), gen config
Architectures: llama, llama3 (Llama-3 rope scaling), mistral, qwen2 (qkv bias), qwen3 (q/k norm).
Weights are drawn with a larger std than transformers' default (0.02) so the next-token
distribution is peaked: near-ties in argmax would make greedy comparisons flaky.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts tokens cheaply and verifies them in one forward pass.",
    "Hello, world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Paged attention stores keys and values in fixed-size blocks of the cache.",
    "One two three four five six seven eight nine ten.",
]


def make_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer (every byte encodable, exact decode) with ChatML specials.

    ids: 0 <|endoftext|> (BOS/EOS/pad), 1 <|im_start|>, 2 <|im_end|>, then bytes and merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    """A 2-layer, hidden-64, 4-head / 2-KV-head config of `arch` (see TINY_ARCHS)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cfg = LlamaConfig(**common, rope_parameters=rope)
        cfg.tie_word_embeddings = True
    elif arch == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    elif arch == "qwen3":
        cfg = Qwen3Config(**{**common, "num_attention_heads": 4}, head_dim=32)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_tiny_model(arch: str, path: Path, seed: int = 0, **overrides: Any) -> Path:
    """Builds and saves a random tiny model + tokenizer into `path`; returns `path`."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    cfg = tiny_config(arch, len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Norm weights default to 1; jitter them (and any biases) so a wrong norm/bias shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
