"""The verified mode's deferral rule (speculative cascades), as pure functions.

"Faster Cascades via Speculative Decoding" (Narasimhan et al., ICLR 2025): the small model drafts a
segment, the large one scores it in one forward and keeps the longest prefix that passes a deferral
rule. ``tolerance`` is the knob from lossless to lossy:

- ``tolerance == 0``: the exact speculative-sampling rule (``acceptance.verify_sampled`` /
  ``verify_greedy``): keep d with probability min(1, p(d) / q(d)), on rejection draw from
  max(0, p - q) normalized; the output follows the large model's distribution exactly (greedy: the
  large model's argmax, token for token).
- ``tolerance = t > 0``: a draft token is also kept outright when the large model gives it at least
  ``(1 - t)`` of its top probability (p(d) >= (1 - t) max p), in the spirit of the paper's
  token-level deferral (defer to the large model only where the small one's token is clearly worse
  than the large one's best). Other tokens still face the exact test and the same residual, so each
  position follows a known mixture that tends to p as t -> 0 and t = 1 keeps every draft.

Greedy requests test the tolerance on the large model's raw softmax (its processed distribution is
one-hot); sampled requests on their processed distribution p (temperature, top-k/p, min-p).
"""

from __future__ import annotations

import torch

from decodekit.drafting.acceptance import _one_hot, verify_greedy, verify_sampled
from decodekit.sampling import draw, probs_from_logits


def check_tolerance(tolerance) -> float | None:
    """``None`` (unverified switching) or a tolerance in [0, 1]; ``ValueError`` otherwise."""
    if tolerance is None:
        return None
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"verify must be None or a tolerance in [0, 1] (0: exact), got {tolerance!r}")
    return float(tolerance)


def close_to_top(probs: torch.Tensor, tokens: list[int], tolerance: float) -> torch.Tensor:
    """(k,) bool: whether token i has at least ``1 - tolerance`` of row i's top probability; ``probs`` (>= k, V)."""
    k = len(tokens)
    idx = torch.arange(k)
    picked = probs[idx, torch.tensor(tokens, dtype=torch.long)]
    return picked >= (1.0 - tolerance) * probs[:k].max(-1).values


def verify_tolerant(*, draft: list[int], p: torch.Tensor, q: torch.Tensor | None, tolerance: float,
                    generator: torch.Generator) -> tuple[int, int]:
    """(drafts kept, next token) for a sampled block; ``p`` (k+1, V), ``q`` (k, V) or None (one-hot drafts).

    At tolerance 0 this is ``verify_sampled`` itself (same draws, lossless)."""
    if tolerance == 0.0:
        return verify_sampled(draft=draft, p=p, q=q, generator=generator)
    k = len(draft)
    p = p.cpu()  # token-level arithmetic beside the per-request (CPU) generator
    q = None if q is None else q.cpu()
    if k == 0:
        return 0, draw(p[0], generator)
    idx = torch.arange(k)
    tokens = torch.tensor(draft, dtype=torch.long)
    q_draft = torch.ones(k) if q is None else q[idx, tokens]
    ratio = p[idx, tokens] / q_draft.clamp_min(1e-30)
    u = torch.rand(k, generator=generator)
    kept = close_to_top(p, draft, tolerance) | (u < ratio)  # lenient first, else the exact test
    rejected = (~kept).nonzero()
    if rejected.numel() == 0:
        return k, draw(p[k], generator)
    i = int(rejected[0])
    residual = (p[i] - (_one_hot(draft[i], p.shape[1]) if q is None else q[i])).clamp_min(0.0)
    return i, draw(residual if float(residual.sum()) > 0.0 else p[i], generator)


def verify_greedy_tolerant(*, draft: list[int], logits: torch.Tensor, tolerance: float) -> tuple[int, int]:
    """(drafts kept, next token) for a greedy block; ``logits`` (k+1, V) the large model's raw logits."""
    target = logits.argmax(-1).tolist()
    if tolerance == 0.0 or not draft:
        return verify_greedy(draft=draft, target=target)
    close = close_to_top(torch.softmax(logits.float().cpu(), -1), draft, tolerance).tolist()
    for i, token in enumerate(draft):
        if token != target[i] and not close[i]:
            return i, target[i]
    return len(draft), target[len(draft)]


def accept_block(*, draft: list[int], q: torch.Tensor | None, logits: torch.Tensor, params, tolerance: float,
                 generator: torch.Generator) -> tuple[int, int]:
    """Verify a drafted segment against the large model's logits (k+1, V) under the request's sampling."""
    if params.greedy:
        return verify_greedy_tolerant(draft=draft, logits=logits, tolerance=tolerance)
    p = probs_from_logits(logits, params)
    return verify_tolerant(draft=draft, p=p, q=q, tolerance=tolerance, generator=generator)
