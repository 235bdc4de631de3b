"""Offline generation on the engine core in this process: benchmarks, tests, scripts.

Same scheduler, runner and sampling as the server, minus HTTP and the process boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from server.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.outputs import EngineCoreOutput
from server.engine.request import Logprob
from server.engine.sampling_params import SamplingParams
from server.model.loader import resolve_model


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    error: str | None = None


class OfflineEngine:
    def __init__(self, config: EngineConfig) -> None:
        model_dir = resolve_model(config.model.model)
        config = replace(config, model=replace(config.model, model=str(model_dir)))
        # generate() returns when its last request is done: a request finished early gains
        # nothing, so the speculation policy aims at the batch's finishing time.
        self.core = EngineCore(config, finish_together=True)
        self.tokenizer = self.core.runner.tokenizer
        self._next_id = 0

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
    ) -> list[Completion]:
        """Runs all prompts concurrently (one batch, as the scheduler admits them)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, Completion] = {}
        order: list[str] = []
        for prompt, p in zip(prompts, params_list, strict=True):
            rid = f"offline-{self._next_id}"
            self._next_id += 1
            order.append(rid)
            results[rid] = Completion(rid, list(prompt))
            rejected = self.core.add_request(rid, list(prompt), p)
            if rejected is not None:
                self._consume(results[rid], rejected)
        while self.core.has_unfinished:
            for out in self.core.step():
                self._consume(results[out.request_id], out)
        return [results[rid] for rid in order]

    @staticmethod
    def _consume(completion: Completion, out: EngineCoreOutput) -> None:
        completion.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            completion.logprobs.extend(out.new_logprobs)
        completion.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            completion.finish_reason = out.finish_reason
            completion.error = out.error
