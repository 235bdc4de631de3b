"""The drafter registry: a drafter by the name given in config, built with its options.

It sits above the drafter modules (they import only ``drafter`` for the protocol), so the
registry can name every built-in without an import circle.
"""

from __future__ import annotations

from collections.abc import Callable

from server.config import SpeculativeConfig
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


# The drafters that need no model of their own (built from the config and the vocabulary).
MODEL_FREE_METHODS = ("ngram", "tree", "suffix", "recycle", "auto")


def model_free_drafter(spec: SpeculativeConfig, vocab_size: int) -> Drafter:
    """The model-free drafter ``spec`` names, with the options it gives: what the engine
    serves, and what offline tools (loadtest.bench_drafter_replay) replay."""
    if spec.method == "ngram":
        return make_drafter(
            "ngram",
            prompt_lookup_min=spec.prompt_lookup_min,
            prompt_lookup_max=spec.prompt_lookup_max,
        )
    if spec.method == "tree":
        return make_drafter(
            "tree",
            max_width=spec.max_tree_width,
            min_match=spec.prompt_lookup_min,
            max_match=spec.prompt_lookup_max,
        )
    if spec.method == "suffix":
        return make_drafter(
            "suffix",
            max_width=spec.max_tree_width,
            min_match=spec.prompt_lookup_min,
            max_match=max(spec.prompt_lookup_max, 8),
            cache_mb=spec.suffix_cache_mb,
        )
    if spec.method == "recycle":
        return make_drafter(
            "recycle",
            vocab_size=vocab_size,
            top_k=spec.recycle_top_k,
            max_width=spec.max_tree_width,
            scope=spec.recycle_scope,
        )
    if spec.method == "auto":
        return make_drafter(
            "auto",
            vocab_size=vocab_size,
            prompt_lookup_min=spec.prompt_lookup_min,
            prompt_lookup_max=spec.prompt_lookup_max,
            max_width=spec.max_tree_width,
            recycle_top_k=spec.recycle_top_k,
            recycle_scope=spec.recycle_scope,
            suffix_cache_mb=spec.suffix_cache_mb,
        )
    raise ValueError(f"{spec.method!r} is not a model-free drafter: {MODEL_FREE_METHODS}")
