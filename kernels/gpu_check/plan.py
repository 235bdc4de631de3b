"""The sizes and budgets of a run (real on CUDA, dry on CPU) and the repository root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
)
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)


@dataclass(frozen=True)
class Plan:
    """The sizes and budgets of one run: the real one on CUDA, or the dry run on CPU."""

    dry_run: bool
    device: str
    model: dict[str, int | float]
    dtype: str  # ModelConfig.dtype
    block_size: int
    context: int  # tokens already cached per request in the timed steps
    decode_batches: tuple[int, ...]
    verify_batches: tuple[int, ...]
    draft_rows: tuple[int, ...]
    repeats: int
    copy_bytes: int  # buffer of the bandwidth measurement
    greedy_prompts: int
    greedy_tokens: int
    # Seconds per stage; the sum stays under 8 minutes with room for start-up and writing.
    budgets: dict[str, float]


def make_plan(dry_run: bool) -> Plan:
    if dry_run:
        return Plan(
            dry_run=True,
            device="cpu",
            model=TINY_LLAMA,
            dtype="float32",
            block_size=16,
            context=16,
            decode_batches=(1, 2),
            verify_batches=(1,),
            draft_rows=(1, 4),
            repeats=1,
            copy_bytes=16 << 20,
            greedy_prompts=2,
            greedy_tokens=12,
            budgets={
                "environment": 20,
                "kernel-tests": 60,
                "kernel-bench": 60,
                "engine-decode": 60,
                "engine-verify": 60,
                "int4-linear": 60,
                "int4-engine": 60,
                "greedy-identity": 60,
                "bf16-greedy": 60,
                "int4-greedy": 60,
            },
        )
    return Plan(
        dry_run=False,
        device="cuda",
        model=LLAMA3_8B,
        dtype="bfloat16",
        block_size=16,
        context=512,
        decode_batches=(1, 8, 32, 64),
        verify_batches=(1, 8),
        draft_rows=(1, 2, 4, 8, 16, 32, 64),
        repeats=5,
        copy_bytes=1 << 30,
        greedy_prompts=16,
        greedy_tokens=40,
        # The H200 runs (loadtest/results/gpu/2026-12-04-nvidia-h200*.md) took 65-85 s of
        # kernel tests, 54-61 s of bench, 11-14 s of decode, 16-23 s of verify, 4 s of int4
        # linears, 3 s of int4 engine, 3-4 s of greedy identity, 24 s of bf16 speculation
        # (Triton compiling for bf16) and 1-12 s of int4 speculation.
        budgets={
            "environment": 20,
            "kernel-tests": 110,
            "kernel-bench": 75,
            "engine-decode": 40,
            "engine-verify": 45,
            "int4-linear": 30,
            "int4-engine": 40,
            "greedy-identity": 25,
            "bf16-greedy": 35,
            "int4-greedy": 25,
        },
    )
