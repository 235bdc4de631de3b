"""Token sampling: one call per step over the batch's last-position logits.

Pipeline per row (vLLM v1 order), all batched over the rows that need it:

1. ``logit_bias`` added to the raw logits.
2. Penalties: repetition (HF/vLLM: over prompt + output tokens, divide positive logits, multiply
   negative ones), then frequency and presence (OpenAI: over output tokens only,
   ``logit -= frequency * count + presence * (count > 0)``).
3. Temperature (greedy rows, ``temperature < GREEDY_EPSILON``, are left unscaled and argmax'd).
4. min-p, then top-k, then top-p, as masks to ``-inf``.
5. Draw with the exponential trick: ``argmax(probs / E)`` with ``E ~ Exp(1)`` i.i.d., which is an
   exact sample from ``probs`` and needs no host sync. Row i's noise comes only from row i's own
   ``torch.Generator`` when it has one (a seeded request), so a seeded request draws the same
   tokens whatever else is in the batch. Rows without one share the device's default generator.

Logprobs are the *raw* model distribution ``log_softmax(logits)`` taken before bias, penalties,
temperature and truncation (vLLM's default ``logprobs_mode="raw_logprobs"``).

Speculative decoding reuses the pieces: ``processed_probs`` is the target distribution that
rejection sampling must reproduce, ``draw`` the noise-consistent draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.request import Logprob, Request

# Exp(1) draws of exactly 0 would give probs / 0 = inf (or nan for a masked token); torch's
# exponential_ can return 0 on some devices, so noise is clamped to the smallest normal float.
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class SamplerResult:
    # One sampled token per request, in batch order.
    token_ids: list[int]
    # One entry per request: the chosen token's raw logprob + top-N, or None when the request's
    # sampling_params.logprobs is None.
    logprobs: list[Logprob | None]


# ---------------------------------------------------------------------------------------------
# Bias and penalties
# ---------------------------------------------------------------------------------------------


def apply_logit_bias(logits: Tensor, requests: Sequence[Request]) -> Tensor:
    """Add each request's ``logit_bias``; token ids outside ``[0, V)`` are ignored.

    logits: [B, V] float32 (modified in place and returned).
    """
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    vocab = logits.shape[1]
    for i, r in enumerate(requests):
        for token_id, bias in r.sampling_params.logit_bias.items():
            if 0 <= token_id < vocab:
                rows.append(i)
                cols.append(token_id)
                vals.append(bias)
    if rows:
        device = logits.device
        logits.index_put_(
            (torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
            torch.tensor(vals, device=device, dtype=logits.dtype),
            accumulate=True,
        )
    return logits


def _token_counts(token_lists: Sequence[Sequence[int]], vocab: int, device: torch.device) -> Tensor:
    """Per-row occurrence counts of each token id: [B, V] float32, via one scatter_add.

    Rows are right-padded with the id ``vocab`` (a scratch column dropped afterwards); ids
    outside ``[0, V)`` land in the scratch column too. float32 so the counts multiply logits
    without another [B, V] conversion (exact up to 2^24 occurrences).
    """
    width = max((len(t) for t in token_lists), default=0)
    padded = torch.full((len(token_lists), max(width, 1)), vocab, dtype=torch.int64)
    for i, tokens in enumerate(token_lists):
        if tokens:
            padded[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.int64)
    padded = padded.masked_fill((padded < 0) | (padded > vocab), vocab).to(device)
    counts = torch.zeros((len(token_lists), vocab + 1), dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def _column(values: list[float], like: Tensor) -> Tensor:
    return torch.tensor(values, device=like.device, dtype=like.dtype).unsqueeze(1)  # [b, 1]


def _repetition(x: Tensor, reqs: Sequence[Request]) -> None:
    """HF repetition penalty in place on x [b, V] (rows = reqs), seen = prompt or output."""
    rep_rows = [r.sampling_params.repetition_penalty != 1.0 for r in reqs]
    if not any(rep_rows):
        return
    # Prompts can be long: only rows with a repetition penalty pay for scanning them.
    seen_ids = [
        [*r.prompt_token_ids, *r.output_token_ids] if use else []
        for r, use in zip(reqs, rep_rows, strict=True)
    ]
    seen = _token_counts(seen_ids, x.shape[1], x.device) > 0  # [b, V]
    rep = _column([r.sampling_params.repetition_penalty for r in reqs], x)  # [b, 1]
    # Multiply by 1/r where the logit is positive, by r elsewhere; 1 where unseen.
    scale = torch.where(x > 0, rep.reciprocal(), rep)
    x.mul_(scale.masked_fill_(~seen, 1.0))


def apply_penalties(logits: Tensor, requests: Sequence[Request]) -> Tensor:
    """Repetition, frequency and presence penalties for the rows that use any of them.

    logits: [B, V] float32 (modified in place and returned).
    Repetition (HF): for tokens seen in prompt or output, ``l / r`` if ``l > 0`` else ``l * r``.
    Frequency/presence (OpenAI): ``l -= f * count_out + p * (count_out > 0)``.
    """
    rows = [i for i, r in enumerate(requests) if r.sampling_params.has_penalties]
    if not rows:
        return logits
    all_rows = len(rows) == len(requests)
    reqs = [requests[i] for i in rows]
    idx = torch.tensor(rows, device=logits.device)
    x = logits if all_rows else logits[idx]  # [b, V]
    out_counts = _token_counts([r.output_token_ids for r in reqs], x.shape[1], x.device)

    _repetition(x, reqs)
    if any(r.sampling_params.frequency_penalty != 0 for r in reqs):
        freq = _column([r.sampling_params.frequency_penalty for r in reqs], x)
        x.addcmul_(out_counts, freq, value=-1.0)
    if any(r.sampling_params.presence_penalty != 0 for r in reqs):
        pres = _column([r.sampling_params.presence_penalty for r in reqs], x)
        x.addcmul_(out_counts.clamp_(max=1.0), pres, value=-1.0)  # counts no longer needed
    if not all_rows:
        logits[idx] = x
    return logits


def apply_penalties_and_bias(logits: Tensor, requests: Sequence[Request]) -> Tensor:
    """Logit bias then penalties (vLLM v1 order) on a copy. [B, V] float32 -> [B, V] float32."""
    out = logits.clone()
    apply_logit_bias(out, requests)
    return apply_penalties(out, requests)


# ---------------------------------------------------------------------------------------------
# Temperature and truncation
# ---------------------------------------------------------------------------------------------


def _row_param(requests: Sequence[Request], name: str, device: torch.device) -> Tensor:
    return torch.tensor(
        [float(getattr(r.sampling_params, name)) for r in requests],
        device=device,
        dtype=torch.float32,
    ).unsqueeze(1)  # [B, 1]


def apply_temperature(logits: Tensor, requests: Sequence[Request]) -> Tensor:
    """Divide each sampled row by its temperature; greedy rows stay as they are. In place."""
    temps = [1.0 if r.sampling_params.greedy else r.sampling_params.temperature for r in requests]
    if any(t != 1.0 for t in temps):
        logits.div_(torch.tensor(temps, device=logits.device, dtype=logits.dtype).unsqueeze(1))
    return logits


def apply_min_p(logits: Tensor, requests: Sequence[Request]) -> Tensor:
    """Mask tokens with ``p < min_p * p_max``, i.e. ``logit < max_logit + log(min_p)``. In place."""
    if not any(r.sampling_params.min_p > 0 for r in requests):
        return logits
    min_p = _row_param(requests, "min_p", logits.device)  # [B, 1]
    # log(0) = -inf: rows with min_p = 0 keep everything.
    threshold = logits.amax(dim=1, keepdim=True) + torch.log(min_p)
    return logits.masked_fill_(logits < threshold, -math.inf)


def apply_top_k_top_p(logits: Tensor, requests: Sequence[Request]) -> Tensor:
    """Top-k then top-p, both as per-row logit thresholds (ties at the cutoff are kept). In place.

    logits: [B, V]. top-k keeps logits >= the k-th largest; top-p keeps the smallest prefix of
    the descending order whose mass reaches p (always at least one token), computed on the
    distribution after top-k. Greedy rows are skipped (truncation never changes the argmax).
    Only rows that truncate are touched, and when all of them have a top-k, only the top
    max(k) logits are sorted (torch.topk): a full sort of a 49k vocab costs ~7 ms per row on
    one CPU core, topk ~0.2 ms.
    """
    vocab = logits.shape[1]
    rows = [
        i
        for i, r in enumerate(requests)
        if not r.sampling_params.greedy
        and (r.sampling_params.top_k > 0 or r.sampling_params.top_p < 1.0)
    ]
    if not rows:
        return logits
    device = logits.device
    sub = [requests[i].sampling_params for i in rows]
    idx = torch.tensor(rows, device=device)
    x = logits[idx]  # [b, V]
    k_list = [min(sp.top_k, vocab) if sp.top_k > 0 else vocab for sp in sub]
    width = max(k_list)
    top = x.topk(width, dim=1).values  # [b, K] descending; K = V when some row has no top-k
    k = torch.tensor(k_list, device=device).unsqueeze(1)  # [b, 1]
    kth = top.gather(1, k - 1)  # [b, 1]
    top.masked_fill_(top < kth, -math.inf)
    cutoff = kth
    if any(sp.top_p < 1.0 for sp in sub):
        top_p = torch.tensor([sp.top_p for sp in sub], device=device).unsqueeze(1)  # [b, 1]
        probs = top.softmax(dim=1)
        mass_before = probs.cumsum(dim=1) - probs  # [b, K]
        keep = mass_before < top_p
        keep[:, 0] = True
        # Number kept n >= 1; the cutoff is the n-th largest logit.
        n_keep = keep.sum(dim=1, keepdim=True)
        cutoff = torch.maximum(cutoff, top.gather(1, n_keep - 1))
    logits[idx] = x.masked_fill_(x < cutoff, -math.inf)
    return logits


def processed_logits(logits: Tensor, requests: Sequence[Request]) -> Tensor:
    """Bias, penalties, temperature, min-p, top-k, top-p. [B, V] float32 -> new [B, V] float32.

    Masked tokens are ``-inf``. Greedy rows get bias and penalties only (no temperature, no
    top-k/top-p): their argmax is the greedy token, which is all that counts for them.
    """
    out = apply_penalties_and_bias(logits.float(), requests)
    apply_temperature(out, requests)
    apply_min_p(out, requests)
    return apply_top_k_top_p(out, requests)


def processed_probs(logits: Tensor, requests: Sequence[Request]) -> Tensor:
    """The distribution each request actually samples from: [B, V] float32, rows sum to 1.

    Greedy rows are one-hot at the argmax of the processed logits, so ``draw`` and rejection
    sampling treat them exactly like plain greedy decoding.
    """
    out = processed_logits(logits, requests)
    probs = out.softmax(dim=1)
    greedy = [i for i, r in enumerate(requests) if r.sampling_params.greedy]
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        one_hot = torch.zeros_like(probs[idx])
        one_hot.scatter_(1, out[idx].argmax(dim=1, keepdim=True), 1.0)
        probs[idx] = one_hot
    return probs


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def exponential_noise(
    batch: int, vocab: int, generators: Sequence[torch.Generator | None], device: torch.device
) -> Tensor:
    """Exp(1) noise [B, V] float32; row i from ``generators[i]`` alone when it is not None.

    Rows without a generator are filled in one call from the device's default generator.
    A generator must live on ``device``. The same generator may serve several rows (e.g. the
    k + 1 verify positions of one speculating request): rows draw from it in row order.
    """
    assert len(generators) == batch, (len(generators), batch)
    noise = torch.empty((batch, vocab), device=device, dtype=torch.float32)
    shared = [i for i, g in enumerate(generators) if g is None]
    if len(shared) == batch:
        _fill_exponential(noise, None)
    else:
        if shared:
            idx = torch.tensor(shared, device=device)
            noise[idx] = _fill_exponential(torch.empty((len(shared), vocab), device=device), None)
        for i, g in enumerate(generators):
            if g is not None:
                _fill_exponential(noise[i], g)
    return noise.clamp_min_(_TINY)


def _fill_exponential(out: Tensor, generator: torch.Generator | None) -> Tensor:
    """Fill ``out`` with Exp(1) draws in place.

    On CPU ``-log(1 - U)`` is used: torch's CPU ``exponential_`` is ~5x slower (136 vs 28 ms for
    64 x 49152 on one core). Either way the draw depends only on ``generator``'s state.
    """
    if out.device.type == "cpu":
        return out.uniform_(generator=generator).neg_().log1p_().neg_()
    return out.exponential_(generator=generator)


def draw(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """One token per row from ``probs`` [B, V] with the exponential trick -> [B] int64.

    ``argmax(p_v / E_v)`` with ``E_v ~ Exp(1)`` equals v with probability p_v. Zero-probability
    tokens are never chosen (0 / E = 0 < any positive entry).
    """
    noise = exponential_noise(probs.shape[0], probs.shape[1], generators, probs.device)
    return (probs / noise).argmax(dim=1)


# ---------------------------------------------------------------------------------------------
# Logprobs
# ---------------------------------------------------------------------------------------------


def compute_logprobs(
    logits: Tensor, token_ids: Tensor | Sequence[int], num_top: int
) -> list[Logprob]:
    """Raw logprobs of ``token_ids`` under ``log_softmax(logits)`` plus the top ``num_top``.

    logits: [N, V]; token_ids: [N]. Returns N Logprob, each ``top`` best first with
    ``len(top) == num_top``. Used for sampled tokens and for prompt logprobs alike.
    """
    n = logits.shape[0]
    if n == 0:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=1)  # [N, V]
    ids = torch.as_tensor(token_ids, device=logits.device, dtype=torch.int64).view(n, 1)
    chosen = logprobs.gather(1, ids).squeeze(1).tolist()
    ids_list = ids.squeeze(1).tolist()
    if num_top > 0:
        top_vals, top_ids = logprobs.topk(min(num_top, logprobs.shape[1]), dim=1)
        top_v, top_i = top_vals.tolist(), top_ids.tolist()
    else:
        top_v, top_i = [[] for _ in range(n)], [[] for _ in range(n)]
    return [
        Logprob(ids_list[j], chosen[j], list(zip(top_i[j], top_v[j], strict=True)))
        for j in range(n)
    ]


def _sample_logprobs(
    logits: Tensor, requests: Sequence[Request], token_ids: Tensor
) -> list[Logprob | None]:
    """Raw logprobs for the rows whose request asked for them; None elsewhere."""
    result: list[Logprob | None] = [None] * len(requests)
    rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
    if not rows:
        return result
    max_top = max(requests[i].sampling_params.logprobs or 0 for i in rows)
    idx = torch.tensor(rows, device=logits.device)
    computed = compute_logprobs(logits[idx], token_ids[idx], max_top)
    for i, lp in zip(rows, computed, strict=True):
        n = requests[i].sampling_params.logprobs or 0
        lp.top = lp.top[:n]
        result[i] = lp
    return result


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def sample(
    logits: Tensor, requests: list[Request], generators: list[torch.Generator | None]
) -> SamplerResult:
    """Sample one token per request.

    logits: [B, V] float32, row i = the last position of requests[i].
    generators: per request, its seeded generator (on logits' device) or None (shared default).
    Greedy rows take the argmax of the processed logits and consume no noise.
    """
    batch = logits.shape[0]
    assert len(requests) == batch == len(generators), (batch, len(requests), len(generators))
    out = processed_logits(logits, requests)  # [B, V]
    token_ids = out.argmax(dim=1)  # [B]: right for greedy rows
    random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        probs = out[idx].softmax(dim=1)
        token_ids[idx] = draw(probs, [generators[i] for i in random_rows])
    return SamplerResult(
        token_ids=token_ids.tolist(),
        logprobs=_sample_logprobs(logits, requests, token_ids),
    )
