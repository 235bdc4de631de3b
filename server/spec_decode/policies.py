"""The policy registry: a speculation policy by the name given in config.

It sits above the policy modules (they import only ``policy`` for the protocol), so the
registry can name every built-in without an import circle.
"""

from __future__ import annotations

from collections.abc import Callable

from server.spec_decode.goodput import GoodputPolicy
from server.spec_decode.policy import (
    FixedBudget,
    NoSpeculation,
    PolicyContext,
    SpecPolicy,
)
from server.spec_decode.smartspec import SmartSpecUniform

PolicyFactory = Callable[[PolicyContext], SpecPolicy]
_POLICIES: dict[str, PolicyFactory] = {
    "none": NoSpeculation,
    "fixed": FixedBudget,
    "smartspec_uniform": SmartSpecUniform,
    "goodput": GoodputPolicy,
}
# Policies that weigh cost: the engine profiles step times at start-up for them.
_COST_AWARE: set[str] = {"smartspec_uniform", "goodput"}


def register_policy(name: str, factory: PolicyFactory, cost_aware: bool = False) -> None:
    _POLICIES[name] = factory
    if cost_aware:
        _COST_AWARE.add(name)


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def needs_cost_model(name: str) -> bool:
    return name in _COST_AWARE


def make_policy(name: str, context: PolicyContext) -> SpecPolicy:
    try:
        factory = _POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown speculation policy {name!r}; choose one of {sorted(_POLICIES)}"
        ) from None
    return factory(context)
