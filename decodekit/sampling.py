"""Pure sampling functions on logits: processors, sampling and log-probabilities.

Every random function takes an explicit ``torch.Generator``.
"""

from __future__ import annotations

import torch

from decodekit.types import SamplingParams


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k, top-p and min-p to one row of logits (V,). Greedy is unchanged."""
    if params.greedy:
        return logits
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p > 0.0:
        logits = min_p_filter(logits, params.min_p)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``p`` (nucleus)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = logits.softmax(-1)
    threshold = probs.max(-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a request samples from; one-hot at the argmax when greedy."""
    if params.greedy:
        out = torch.zeros_like(logits, dtype=torch.float32)
        out[..., int(logits.argmax(-1))] = 1.0
        return out
    return process_logits(logits, params).softmax(-1)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Sample one token id from one row of logits (V,)."""
    if params.greedy:
        return int(logits.argmax(-1))
    return draw(process_logits(logits, params).softmax(-1), generator)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index with probability proportional to ``weights`` (V,), drawn with ``generator``.

    Per-request generators live on the CPU (a seed then draws the same stream whatever the model's
    device), so weights on another device are drawn from on the generator's device."""
    if generator is not None and weights.device != generator.device:
        weights = weights.to(generator.device)
    return int(torch.multinomial(weights.float(), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token_id: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of ``token_id`` under the raw model distribution and the ``top_n`` best."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if top_n:
        values, ids = torch.topk(logp, top_n)
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return float(logp[token_id]), top


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of softmax(logits) along the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1) / torch.log(torch.tensor(2.0))
