"""Distributions of prompt length, output length and per-request acceptance, as the YAML
writes them:

- a number: every request gets it;
- ``{uniform: [lo, hi]}``: integers lo..hi inclusive for lengths, reals in [lo, hi) for alpha;
- ``{choice: [v, ...]}``: one of the values, equally likely (an empirical distribution);
- ``{dataset: repetitive|chat|mix}``: the prompt token counts of a shipped loadtest dataset
  (the client's regex estimate, ``loadtest.tokens.ApproxCounter``), drawn with replacement;
- ``{mixture: [{weight: w, dist: SPEC}, ...]}``: each request picks a component by weight.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from loadtest.data import DATASET_DIR, load_jsonl
from loadtest.tokens import ApproxCounter

DistSpec = Any  # int | float | dict, as parsed from YAML
_KINDS = ("uniform", "choice", "dataset", "mixture")


def validate(spec: DistSpec, what: str) -> None:
    """Raises ValueError naming ``what`` if ``spec`` is not a distribution this module draws."""
    if isinstance(spec, bool):
        raise ValueError(f"{what}: a distribution, not a boolean")
    if isinstance(spec, (int, float)):
        return
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _KINDS:
        raise ValueError(f"{what}: a number or one of {{{', '.join(_KINDS)}: ...}}, got {spec!r}")
    kind, arg = next(iter(spec.items()))
    if kind == "uniform":
        if not (isinstance(arg, list) and len(arg) == 2 and arg[0] <= arg[1]):
            raise ValueError(f"{what}: uniform takes [lo, hi] with lo <= hi, got {arg!r}")
    elif kind == "choice":
        if not (isinstance(arg, list) and arg):
            raise ValueError(f"{what}: choice takes a non-empty list, got {arg!r}")
    elif kind == "dataset":
        _dataset_prompt_lens(str(arg))  # raises for an unknown name
    else:
        if not (isinstance(arg, list) and arg):
            raise ValueError(f"{what}: mixture takes a list of {{weight, dist}}, got {arg!r}")
        for i, comp in enumerate(arg):
            if not (isinstance(comp, dict) and comp.get("weight", 0) > 0 and "dist" in comp):
                raise ValueError(f"{what}: mixture component {i} needs weight > 0 and dist")
            validate(comp["dist"], f"{what} (mixture component {i})")


def draw(spec: DistSpec, n: int, rng: np.random.Generator, integer: bool) -> np.ndarray:
    """``n`` draws: int64 when ``integer`` (lengths), else float64 (acceptance rates)."""
    dtype = np.int64 if integer else np.float64
    if isinstance(spec, (int, float)):
        return np.full(n, spec, dtype=dtype)
    kind, arg = next(iter(spec.items()))
    if kind == "uniform":
        lo, hi = arg
        if integer:
            return rng.integers(int(lo), int(hi) + 1, size=n)
        return rng.uniform(float(lo), float(hi), size=n) if hi > lo else np.full(n, float(lo))
    if kind == "choice":
        return rng.choice(np.asarray(arg, dtype=dtype), size=n)
    if kind == "dataset":
        return rng.choice(np.asarray(_dataset_prompt_lens(str(arg)), dtype=dtype), size=n)
    weights = np.array([float(c["weight"]) for c in arg])
    which = rng.choice(len(arg), size=n, p=weights / weights.sum())
    out = np.empty(n, dtype=dtype)
    for i, comp in enumerate(arg):
        mask = which == i
        out[mask] = draw(comp["dist"], int(mask.sum()), rng, integer)
    return out


@cache
def _dataset_prompt_lens(name: str) -> tuple[int, ...]:
    files = {"repetitive": ["repetitive"], "chat": ["chat"], "mix": ["repetitive", "chat"]}
    if name not in files:
        raise ValueError(f"dataset {name!r}: choose one of {sorted(files)}")
    counter = ApproxCounter()
    rows = [r for f in files[name] for r in load_jsonl(DATASET_DIR / f"{f}.jsonl")]
    return tuple(counter.count(r["prompt"]) for r in rows)
