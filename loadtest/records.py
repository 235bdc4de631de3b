"""The data a run passes around: what to send (Sample) and what happened (RequestRecord)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One prompt to send. prompt_len is the dataset's estimate (a tokenizer's count when one
    was given, otherwise ~words); the server's usage.prompt_tokens replaces it when present."""

    prompt: str
    prompt_len: int
    output_len: int
    category: str = ""


@dataclass
class RequestRecord:
    """One request's outcome. Times in seconds, measured with time.perf_counter."""

    index: int
    category: str = ""
    success: bool = False
    error: str = ""
    status_code: int | None = None
    # Offset of the send from the start of the run.
    start_time: float = 0.0
    # Time to the first chunk that carried text; 0.0 when none arrived.
    ttft: float = 0.0
    # Gaps between consecutive text-carrying chunks (one entry per chunk, not per token: a
    # chunk can carry several tokens under speculative decoding, as in `vllm bench serve`).
    itl: list[float] = field(default_factory=list)
    # Send to the last chunk with text (vLLM's "latency" / E2EL).
    latency: float = 0.0
    prompt_len: int = 0
    output_len: int = 0
    # "usage" when the counts came from the server's usage chunk, "chunks" when output_len is
    # the number of text-carrying chunks (a lower bound under speculative decoding).
    token_source: str = "chunks"
    num_chunks: int = 0
    finish_reason: str | None = None
    generated_text: str = ""

    @property
    def tpot(self) -> float:
        """vLLM's time per output token after the first: (E2EL - TTFT) / (output_len - 1)."""
        if not self.success or self.output_len <= 1:
            return 0.0
        return (self.latency - self.ttft) / (self.output_len - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tpot"] = self.tpot
        return d
