"""Speculation policies: how many draft tokens each decoding request gets this step.

A policy is a plain object with two calls, so it is unit-tested without a model:

- ``allocate(requests, caps) -> budgets``: called once per step with every decoding request
  that may speculate and its cap (the most draft tokens it can use: config maximum, the
  request's own ``speculation.max_tokens``, and the room left before max_tokens /
  max_model_len). Returns one budget per request, 0 <= budget <= cap; 0 = plain decode.
- ``observe(observation)``: called after each step with what was proposed, accepted and how
  long the step took (the goodput policy fits its cost model and acceptance estimates on it).

``none`` and ``fixed`` are the baselines; the goodput policy (SmartSpec) has its own module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.request import Request


@dataclass
class StepObservation:
    """One engine step as the policy sees it."""

    # Seconds the runner's execute took (forward + verification + sampling).
    execute_time: float
    # Tokens computed in the step: prefill chunks + 1 per decoding request + draft tokens.
    num_batched_tokens: int
    num_requests: int
    # request_id -> (draft tokens proposed, draft tokens accepted) for requests that drafted.
    acceptance: dict[str, tuple[int, int]] = field(default_factory=dict)


class SpecPolicy(Protocol):
    name: str

    def allocate(self, requests: list[Request], caps: list[int]) -> list[int]: ...

    def observe(self, observation: StepObservation) -> None: ...


class NoSpeculation:
    """Every request decodes one token per step."""

    name = "none"

    def allocate(self, requests: list[Request], caps: list[int]) -> list[int]:
        return [0] * len(requests)

    def observe(self, observation: StepObservation) -> None:
        pass


class FixedBudget:
    """Every decoding request gets the maximum budget (its cap) every step: vLLM's behaviour."""

    name = "fixed"

    def allocate(self, requests: list[Request], caps: list[int]) -> list[int]:
        return list(caps)

    def observe(self, observation: StepObservation) -> None:
        pass


_POLICIES: dict[str, Callable[[], SpecPolicy]] = {
    "none": NoSpeculation,
    "fixed": FixedBudget,
}


def register_policy(name: str, factory: Callable[[], SpecPolicy]) -> None:
    _POLICIES[name] = factory


def make_policy(name: str) -> SpecPolicy:
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown speculation policy {name!r}; choose one of {sorted(_POLICIES)}"
        ) from None
