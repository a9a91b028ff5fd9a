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
    """Sample one token id from one row of logits (V,) (``sample_batch`` of one row)."""
    return sample_batch(logits[None], [params], [generator])[0]


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index with probability proportional to ``weights`` (V,), drawn with ``generator``.

    One uniform from the generator per draw (inverse CDF), the same rule ``sample_batch`` applies
    to a whole batch: a seeded request draws the same tokens alone or beside others."""
    return int(inverse_cdf(weights[None], uniforms([generator], weights.device))[0])


def uniforms(generators: list[torch.Generator | None], device) -> torch.Tensor:
    """(B,) float64 uniforms in [0, 1), one from each row's generator (None: the global one).

    Per-request generators live on the CPU, so a seed draws the same stream whatever the model's
    device; only B numbers cross to the device, never a vocabulary row."""
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    return u.to(device)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) indices: row i's first index where the cumulative weight exceeds u_i times the row total.

    ``searchsorted(right=True)`` never lands on a zero-weight index (the CDF only rises at positive
    weights); rounding past the total falls back to the row's last positive index."""
    cdf = weights.double().cumsum(-1)  # (B, V)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    last = (weights > 0).cumsum(-1).argmax(-1)  # (B,) last positive index
    return torch.minimum(idx, last)


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` (B, V), each under its own request's parameters and generator.

    Runs on the logits' device: greedy rows take the argmax, the others are processed in one batch
    (per-row temperature, top-k, top-p, min-p) and drawn by inverse CDF with one uniform per row.
    Row i's token equals ``sample_token(logits[i], params[i], generators[i])``."""
    out = logits.argmax(-1)  # (B,)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        probs = process_batch(logits.index_select(0, index), [params[i] for i in sampled]).softmax(-1)
        u = uniforms([generators[i] for i in sampled], logits.device)
        out[index] = inverse_cdf(probs, u)
    return out.tolist()


def process_batch(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``process_logits`` for a batch (B, V) of sampled rows, each with its own parameters."""
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], device=device, dtype=torch.float32)
    logits = logits.float() / temps[:, None]
    vocab = logits.shape[-1]
    if any(0 < p.top_k < vocab for p in params):
        ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
        kth = torch.sort(logits, descending=True, dim=-1).values.gather(-1, (ks - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        tops = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device=device)  # 2: keep all
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= tops[:, None]
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    if any(p.min_p > 0.0 for p in params):
        mins = torch.tensor([p.min_p for p in params], device=device, dtype=torch.float32)
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < probs.max(-1, keepdim=True).values * mins[:, None], float("-inf"))
    return logits


# ---- penalties and biases: functions of the history before each position ------------------------
def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids, output_ids) -> torch.Tensor:
    """Logits (V,) of one position with ``params``' bias and penalties, given the tokens before it.

    In order: ``logit_bias`` added; ``repetition_penalty`` r on every token of the prompt and the
    output (a positive logit divided by r, a negative one multiplied, as vLLM and transformers do);
    then, over the output only (OpenAI), minus ``frequency_penalty`` times the token's count and minus
    ``presence_penalty`` once it occurs. Unchanged (the same tensor) without any of them."""
    if not params.has_penalties:
        return logits
    out = logits.float().clone()
    vocab = out.shape[-1]
    if params.logit_bias:
        ids = [t for t, _ in params.logit_bias if t < vocab]
        if ids:
            bias = torch.tensor([b for t, b in params.logit_bias if t < vocab], device=out.device)
            out[torch.tensor(ids, device=out.device)] += bias
    if params.repetition_penalty != 1.0:
        seen = sorted({t for t in (*prompt_ids, *output_ids) if t < vocab})
        if seen:
            index = torch.tensor(seen, device=out.device)
            values = out[index]
            out[index] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and len(output_ids):
        generated = torch.tensor([t for t in output_ids if t < vocab], dtype=torch.long, device=out.device)
        counts = torch.bincount(generated, minlength=vocab).to(out.dtype)  # (V,)
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(out.dtype)
    return out


def penalize_rows(logits: torch.Tensor, params: list[SamplingParams], histories: list) -> torch.Tensor:
    """``apply_penalties`` on each row of ``logits`` (B, V) with its ``(prompt_ids, output_ids)``; the
    same tensor when no row has penalties, else a copy with only those rows changed."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    out = logits.float().clone()
    for i in rows:
        out[i] = apply_penalties(logits[i], params[i], *histories[i])
    return out


def positions_penalized(logits: torch.Tensor, params: SamplingParams, prompt_ids, output_ids,
                        drafted) -> torch.Tensor:
    """(k + 1, V) logits of a verify row: position j continues ``output_ids + drafted[:j]``, so each
    row gets the penalties of its own history (unchanged without penalties)."""
    if not params.has_penalties:
        return logits
    return torch.stack([apply_penalties(logits[j], params, prompt_ids, [*output_ids, *drafted[:j]])
                        for j in range(logits.shape[0])])


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
