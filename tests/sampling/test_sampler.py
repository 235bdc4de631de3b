"""Sampler against plain-torch / Python references."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.model.sampler import (
    apply_penalties_and_bias,
    compute_logprobs,
    draw,
    processed_logits,
    processed_probs,
    sample,
)

_counter = 0


def make_request(
    prompt: list[int] | None = None, output: list[int] | None = None, **params: object
) -> Request:
    global _counter
    _counter += 1
    r = Request(
        request_id=f"r{_counter}",
        prompt_token_ids=prompt or [0],
        sampling_params=SamplingParams(**params),  # type: ignore[arg-type]
        eos_token_ids=frozenset(),
        max_total_tokens=10_000,
    )
    for t in output or []:
        r.append_output_token(t)
    return r


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- references -------------------------------------------------------------------------


def ref_keep_mask(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """[V] bool: which tokens survive min-p, then top-k, then top-p (plain per-token logic)."""
    probs = logits.softmax(0).tolist()
    vocab = len(probs)
    keep = [p >= min_p * max(probs) for p in probs]
    order = sorted(range(vocab), key=lambda v: -probs[v])
    if top_k > 0:
        for rank, v in enumerate(order):
            if rank >= top_k:
                keep[v] = False
    total = sum(probs[v] for v in range(vocab) if keep[v])
    mass = 0.0
    for v in order:
        if not keep[v]:
            continue
        if mass >= top_p and mass > 0:
            keep[v] = False
        mass += probs[v] / total
    return torch.tensor(keep)


def ref_penalties(logits: list[float], r: Request) -> list[float]:
    sp = r.sampling_params
    out = list(logits)
    for v, bias in sp.logit_bias.items():
        out[v] += bias
    seen = set(r.prompt_token_ids) | set(r.output_token_ids)
    for v in range(len(out)):
        if v in seen:
            rp = sp.repetition_penalty
            out[v] = out[v] / rp if out[v] > 0 else out[v] * rp
        count = r.output_token_ids.count(v)
        out[v] -= sp.frequency_penalty * count + sp.presence_penalty * (count > 0)
    return out


def total_variation(samples: torch.Tensor, probs: torch.Tensor) -> float:
    empirical = torch.bincount(samples, minlength=probs.numel()).double() / samples.numel()
    return 0.5 * (empirical - probs.double()).abs().sum().item()


# ---- greedy, masks ------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    requests = [make_request(temperature=0.0) for _ in range(5)]
    result = sample(logits, requests, [None] * 5)
    assert result.token_ids == logits.argmax(1).tolist()
    assert result.logprobs == [None] * 5


def test_greedy_ignores_truncation_params_and_seed() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 100)
    requests = [
        make_request(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2, seed=3) for _ in range(3)
    ]
    result = sample(logits, requests, [gen(3), None, gen(4)])
    assert result.token_ids == logits.argmax(1).tolist()


def test_top_k_hand_made() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0]])
    out = processed_logits(logits, [make_request(top_k=2)])
    assert torch.isfinite(out).tolist() == [[False, True, False, False, True]]
    assert out[0, 1] == 5.0 and out[0, 4] == 4.0


def test_top_p_hand_made() -> None:
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log().unsqueeze(0)
    for top_p, kept in [(0.6, 2), (0.75, 3), (0.5, 1), (0.3, 1), (1.0, 5), (0.99, 5)]:
        out = processed_logits(logits, [make_request(top_p=top_p)])
        assert torch.isfinite(out).sum().item() == kept, top_p
        assert torch.isfinite(out[0, :kept]).all()


def test_min_p_hand_made() -> None:
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    out = processed_logits(probs.log().unsqueeze(0), [make_request(min_p=0.3)])
    # Keep p >= 0.3 * 0.5 = 0.15.
    assert torch.isfinite(out).tolist() == [[True, True, True, False, False]]


def test_masks_match_reference_mixed_batch() -> None:
    torch.manual_seed(2)
    vocab = 64
    settings = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.05), (10, 0.9, 0.02)]
    settings += [(3, 0.5, 0.1), (-1, 0.3, 0.0), (64, 0.95, 0.0), (1, 1.0, 0.0)]
    requests = [make_request(top_k=k, top_p=p, min_p=m) for k, p, m in settings]
    logits = torch.randn(len(requests), vocab) * 2
    out = processed_logits(logits, requests)
    for i, (k, p, m) in enumerate(settings):
        expected = ref_keep_mask(logits[i], k, p, m)
        assert torch.equal(torch.isfinite(out[i]), expected), settings[i]
        assert torch.equal(out[i][expected], logits[i][expected])


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([[1.0, 2.0, -3.0]])
    out = processed_logits(logits, [make_request(temperature=0.5)])
    assert torch.allclose(out, logits / 0.5)


def test_processed_probs_rows_sum_to_one_and_greedy_one_hot() -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, 40)
    requests = [make_request(temperature=0.0), make_request(top_k=4), make_request(top_p=0.5)]
    probs = processed_probs(logits, requests)
    assert torch.allclose(probs.sum(1), torch.ones(3))
    assert probs[0].tolist() == torch.nn.functional.one_hot(logits[0].argmax(), 40).float().tolist()
    assert (probs[1] > 0).sum() == 4
    assert draw(probs[:1], [None]).item() == logits[0].argmax().item()


# ---- penalties and bias -------------------------------------------------------------------


def test_penalties_match_formulas() -> None:
    torch.manual_seed(4)
    vocab = 20
    requests = [
        make_request([1, 2, 3, 3], [3, 4, 4, 5], repetition_penalty=1.3),
        make_request([1, 2], [2, 2, 7, 9, 9, 9], frequency_penalty=0.7),
        make_request([1, 2], [2, 2, 7, 9, 9, 9], presence_penalty=-0.4),
        make_request(
            [6, 0],
            [0, 11, 11, 12],
            repetition_penalty=0.8,
            frequency_penalty=-1.0,
            presence_penalty=1.5,
            logit_bias={0: 3.0, 19: -100.0},
        ),
        make_request([4], [4, 4], logit_bias={5: 2.5}),
        make_request([1, 2, 3], [3, 3]),  # no penalties: unchanged
    ]
    logits = torch.randn(len(requests), vocab) * 3
    out = apply_penalties_and_bias(logits, requests)
    for i, r in enumerate(requests):
        expected = torch.tensor(ref_penalties(logits[i].tolist(), r))
        assert torch.allclose(out[i], expected, atol=1e-5), i
    assert torch.equal(out[5], logits[5])
    # Presence penalty is per distinct token; frequency per occurrence.
    assert math.isclose(out[1, 9].item(), logits[1, 9].item() - 2.1, abs_tol=1e-5)
    assert math.isclose(out[2, 9].item(), logits[2, 9].item() + 0.4, abs_tol=1e-5)


def test_penalties_do_not_mutate_input() -> None:
    logits = torch.ones(1, 5)
    apply_penalties_and_bias(logits, [make_request([1], [1], repetition_penalty=2.0)])
    assert torch.equal(logits, torch.ones(1, 5))


def test_repetition_penalty_discourages_repeat_in_greedy() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.5]])
    plain = sample(logits, [make_request([0], [1], temperature=0.0)], [None])
    penalised = sample(
        logits, [make_request([0], [1], temperature=0.0, repetition_penalty=2.0)], [None]
    )
    assert plain.token_ids == [1] and penalised.token_ids == [2]


def test_logit_bias_forces_token() -> None:
    torch.manual_seed(5)
    logits = torch.randn(2, 50)
    requests = [make_request(logit_bias={17: 100.0}), make_request(logit_bias={17: 100.0}, seed=1)]
    for _ in range(5):
        assert sample(logits, requests, [None, gen(1)]).token_ids == [17, 17]
    banned = make_request(temperature=0.0, logit_bias={int(logits[0].argmax()): -100.0})
    token = sample(logits[:1], [banned], [None]).token_ids[0]
    assert token == logits[0].topk(2).indices[1].item()


# ---- seeds and batch independence -------------------------------------------------------


def run_steps(
    logits_seq: list[torch.Tensor],
    index: int,
    requests: list[Request],
    gens: list[torch.Generator | None],
) -> list[int]:
    return [sample(lg, requests, gens).token_ids[index] for lg in logits_seq]


def test_seeded_request_independent_of_batch() -> None:
    torch.manual_seed(6)
    vocab = 1000
    steps = [torch.randn(4, vocab) for _ in range(8)]
    target = make_request(temperature=1.0, top_p=0.95, seed=42)
    alone = run_steps([s[2:3] for s in steps], 0, [target], [gen(42)])
    others = [make_request(temperature=0.7), make_request(temperature=0.0), make_request(seed=7)]
    batch = [others[0], others[1], target, others[2]]
    together = run_steps(steps, 2, batch, [None, None, gen(42), gen(7)])
    assert alone == together
    # Reordered batch, different companions.
    batch2 = [target, make_request(top_k=3)]
    reordered = run_steps([torch.stack([s[2], s[0]]) for s in steps], 0, batch2, [gen(42), None])
    assert alone == reordered
    # The seed matters.
    other_seed = run_steps([s[2:3] for s in steps], 0, [target], [gen(43)])
    assert other_seed != alone


def test_same_seed_same_tokens_across_calls() -> None:
    torch.manual_seed(7)
    logits = torch.randn(1, 5000)
    r = make_request(seed=5)

    def ten_steps() -> list[int]:
        g = gen(5)
        return [sample(logits, [r], [g]).token_ids[0] for _ in range(10)]

    first = ten_steps()
    assert ten_steps() == first
    assert len(set(first)) > 1


# ---- distributions --------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_sampling_matches_softmax(temperature: float) -> None:
    torch.manual_seed(8)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    n = 6000
    requests = [make_request(temperature=temperature) for _ in range(n)]
    result = sample(logits.expand(n, -1).contiguous(), requests, [None] * n)
    expected = (logits / temperature).softmax(0)
    assert total_variation(torch.tensor(result.token_ids), expected) < 0.03


def test_seeded_draws_match_distribution() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5, 0.1]])
    g = gen(123)
    r = make_request(temperature=0.8, seed=123)
    tokens = torch.tensor([sample(logits, [r], [g]).token_ids[0] for _ in range(4000)])
    assert total_variation(tokens, (logits[0] / 0.8).softmax(0)) < 0.03


def test_truncated_sampling_matches_processed_probs() -> None:
    torch.manual_seed(9)
    logits = torch.randn(12) * 1.5
    n = 5000
    requests = [make_request(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05) for _ in range(n)]
    expected = processed_probs(logits.unsqueeze(0), requests[:1])[0]
    mask = ref_keep_mask(logits / 0.9, 6, 0.9, 0.05)
    assert torch.equal(expected > 0, mask)
    result = sample(logits.expand(n, -1).contiguous(), requests, [None] * n)
    tokens = torch.tensor(result.token_ids)
    assert mask[tokens].all()
    assert total_variation(tokens, expected) < 0.03


# ---- logprobs -----------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax() -> None:
    torch.manual_seed(10)
    logits = torch.randn(4, 200)
    requests = [
        make_request([1], [3, 3], temperature=0.0, logprobs=5, repetition_penalty=1.5),
        make_request(temperature=1.3, top_k=2, logprobs=0),
        make_request(temperature=0.5),
        make_request(temperature=0.7, logprobs=20, logit_bias={7: 5.0}),
    ]
    result = sample(logits, requests, [None, gen(1), None, None])
    ref = torch.log_softmax(logits, 1)
    assert result.logprobs[2] is None
    for i, n in [(0, 5), (1, 0), (3, 20)]:
        lp = result.logprobs[i]
        assert lp is not None
        token = result.token_ids[i]
        assert lp.token_id == token
        assert math.isclose(lp.logprob, ref[i, token].item(), abs_tol=1e-5)
        assert len(lp.top) == n
        top_vals, top_ids = ref[i].topk(n) if n else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in lp.top] == top_ids.tolist()
        for (_, got), want in zip(lp.top, top_vals.tolist(), strict=True):
            assert math.isclose(got, want, abs_tol=1e-5)


def test_compute_logprobs_for_prompt() -> None:
    torch.manual_seed(11)
    logits = torch.randn(6, 30)
    ids = [3, 0, 29, 3, 5, 8]
    out = compute_logprobs(logits, ids, 3)
    ref = torch.log_softmax(logits, 1)
    assert [lp.token_id for lp in out] == ids
    for j, lp in enumerate(out):
        assert math.isclose(lp.logprob, ref[j, ids[j]].item(), abs_tol=1e-5)
        assert [t for t, _ in lp.top] == ref[j].topk(3).indices.tolist()
    assert compute_logprobs(torch.empty(0, 30), [], 2) == []
