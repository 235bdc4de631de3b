"""The drafter registry: a drafter by the name given in config, built with its options.

It sits above the drafter modules (they import only ``drafter`` for the protocol), so the
registry can name every built-in without an import circle.
"""

from __future__ import annotations

from collections.abc import Callable

from server.spec_decode.composite import AutoDrafter
from server.spec_decode.draft_model import load_draft_model_drafter
from server.spec_decode.drafter import Drafter
from server.spec_decode.ngram import NgramDrafter
from server.spec_decode.recycle import RecycleDrafter
from server.spec_decode.suffix_drafter import SuffixDrafter
from server.spec_decode.suffix_tree import SuffixTreeDrafter
from server.spec_decode.synthetic import SyntheticDrafter

DrafterFactory = Callable[..., Drafter]
_REGISTRY: dict[str, DrafterFactory] = {
    "ngram": NgramDrafter,
    "tree": SuffixTreeDrafter,
    "suffix": SuffixDrafter,
    "recycle": RecycleDrafter,
    "auto": AutoDrafter,
    "draft_model": load_draft_model_drafter,
    "synthetic": SyntheticDrafter,
}


def register_drafter(name: str, factory: DrafterFactory) -> None:
    """Make ``make_drafter(name, ...)`` build drafters with ``factory(**options)``."""
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"a drafter named {name!r} is already registered")
    _REGISTRY[name] = factory


def available_drafters() -> list[str]:
    return sorted(_REGISTRY)


def make_drafter(name: str, **options: object) -> Drafter:
    """Build the drafter registered as ``name`` ("ngram", "tree", ...) with its options."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown drafter {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    try:
        return factory(**options)
    except TypeError as exc:  # an option the drafter does not take
        raise ValueError(f"bad options for drafter {name!r}: {exc}") from exc
