"""Test-only fault injection: real faults at real points inside the engine, armed by an env var.

    SPECD_INJECT_FAULTS='{"nan_logits": 7, "step_error": 8, "exit": 9}' specd serve ...

Each value is a token id. A request whose prompt *starts* with that id triggers the fault:

- ``nan_logits``: its logits rows become NaN after the forward once it has two output tokens
  (a model that breaks mid-generation, while other requests share its batches);
- ``step_error``: the engine step that carries it raises before the forward;
- ``exit``: the engine process exits at once when that step starts (a crash, an OOM kill).

And one that is not a token id: ``load_delay_s`` (seconds) makes the engine core wait that
long before it loads the model, a slow start-up (a large model, a cold disk) that the tests of
`/ready` during loading can count on.

The reliability tests (tests/api/test_faults.py) use it to show that each fault fails only
what it touches. Unset - always, outside those tests - nothing is checked.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from server.engine.request import Request

logger = logging.getLogger(__name__)

ENV_VAR = "SPECD_INJECT_FAULTS"


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class FaultInjector:
    nan_logits: int | None = None
    step_error: int | None = None
    exit: int | None = None
    load_delay_s: float | None = None

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        text = os.environ.get(ENV_VAR)
        if not text:
            return None
        injector = cls(**json.loads(text))
        logger.warning("fault injection is armed (%s=%s): for tests only", ENV_VAR, text)
        return injector

    @staticmethod
    def _marked(request: Request, token: int | None) -> bool:
        return token is not None and request.prompt_token_ids[:1] == [token]

    def before_step(self, requests: Iterable[Request]) -> None:
        for request in requests:
            if self._marked(request, self.exit):
                logger.error("injected fault: the engine process exits (%s)", request.request_id)
                os._exit(13)
            if self._marked(request, self.step_error):
                raise InjectedFault(f"injected step error ({request.request_id})")

    def poison_logits(
        self, logits: torch.Tensor, rows: dict[str, list[int]], requests: Iterable[Request]
    ) -> None:
        for request in requests:
            if (
                self._marked(request, self.nan_logits)
                and request.num_output_tokens >= 2
                and rows.get(request.request_id)
            ):
                logits[rows[request.request_id]] = float("nan")
