"""bench_spec's bookkeeping: which configurations run, the warm-up set, the drafter bars."""

from __future__ import annotations

from loadtest.bench_spec import (
    DATASET_FILES,
    Row,
    configurations,
    drafter_bars,
    drafter_summary,
    identical_share,
    load_prompts,
    matching_prefix,
    warmup_prompts,
)


def row(dataset: str, batch: int, config: str, tok_s: float, length: float = 1.0) -> Row:
    policy, method, budget = "none", "-", 0
    if config != "none":
        method, policy, *rest = config.split()
        budget = int(rest[0].split("=")[1]) if rest else 8
    return Row(dataset, batch, config, policy, method, budget, tok_s, [tok_s], 64, 0.2,
               length, float(budget), True)  # fmt: skip


def test_policies_pick_the_configurations() -> None:
    labels = [c.label for c in configurations(["recycle"], [2, 8], 8, ["fixed", "goodput"])]
    assert labels == ["none", "recycle fixed k=2", "recycle fixed k=8", "recycle goodput"]
    (_, own) = configurations(["recycle/request"], [2], 8, ["fixed"])
    assert own.spec.method == "recycle" and own.spec.recycle_scope == "request"


def test_the_warmup_set_is_never_measured() -> None:
    warm = set(warmup_prompts())
    assert warm
    for files in DATASET_FILES.values():
        assert not warm & set(load_prompts(files, 32))


def test_drafter_bars() -> None:
    rows = [
        row("free-form", 1, "none", 10.0),
        row("free-form", 1, "recycle fixed k=8", 12.0, length=1.9),
        row("free-form", 1, "recycle goodput", 16.0),
        row("repetitive", 1, "none", 10.0),
        row("repetitive", 1, "ngram goodput", 20.0),
        row("repetitive", 1, "auto goodput", 19.0),
    ]
    summary = drafter_summary(rows, max_budget=8)
    recycle = next(s for s in summary if s["method"] == "recycle")
    assert recycle["best"] == "recycle goodput" and recycle["best_speedup"] == 1.6
    assert recycle["accepted_length_at_max"] == 1.9
    bars = {b: ok for b, _, ok in drafter_bars(summary)}
    assert bars == {
        "recycle or auto on free-form, batch 1: >= 1.5x none": True,
        "mean accepted length >= 1.8 at the max budget": True,
        "repetitive, batch 1: auto no worse than ngram (best configurations)": False,
    }


def test_drafter_bars_take_methods_with_a_table_scope() -> None:
    """recycle/request, auto/layered ...: the drafter is the part before the scope, and auto's
    best scope is set against ngram."""
    rows = [
        row("free-form", 1, "none", 10.0),
        row("free-form", 1, "recycle/layered goodput", 15.5),
        row("repetitive", 1, "none", 10.0),
        row("repetitive", 1, "ngram goodput", 20.0),
        row("repetitive", 1, "auto/request goodput", 19.0),
        row("repetitive", 1, "auto/layered goodput", 21.0),
    ]
    bars = {b: (measured, ok) for b, measured, ok in drafter_bars(drafter_summary(rows, 8))}
    assert bars["recycle or auto on free-form, batch 1: >= 1.5x none"][1] is True
    measured, ok = bars["repetitive, batch 1: auto no worse than ngram (best configurations)"]
    assert ok is True and "auto/layered goodput" in measured


def test_identity_shares() -> None:
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert identical_share(ref, ref) == 1.0 and matching_prefix(ref, ref) == 1.0
    out = [[1, 2, 9, 9], [5, 6, 7, 8]]
    assert identical_share(out, ref) == 0.5
    assert matching_prefix(out, ref) == 6 / 8
