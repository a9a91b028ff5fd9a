"""The speculative acceptance rule (Leviathan et al. 2023, Chen et al. 2023), as pure functions.

A block is k drafted tokens d_1..d_k, drawn from draft distributions q_1..q_k, and the target's
k + 1 distributions p_1..p_{k+1} (p_i is the target's next-token distribution before d_i, p_{k+1}
the one after d_k). Both p and q are the *processed* distributions of the request (temperature,
top-k, top-p, min-p applied the same way), so the output follows the processed target exactly.
"""

from __future__ import annotations

import torch

from decodekit.sampling import draw


def verify_sampled(*, draft: list[int], p: torch.Tensor, q: torch.Tensor | None,
                   generator: torch.Generator) -> tuple[int, int]:
    """(number of drafts accepted, next token) for a sampled block; lossless.

    ``p`` is (k+1, V), ``q`` is (k, V) or ``None`` for one-hot drafts (n-gram lookup).

    Why it is exact, for one position with target p and draft q: d ~ q is kept with probability
    min(1, p(d)/q(d)), so P(emit x and keep) = q(x) min(1, p(x)/q(x)) = min(q(x), p(x)). The
    rejection probability is 1 - sum_x min(p, q) = sum_x max(0, p - q) =: Z, and on rejection we
    draw from max(0, p - q) / Z, so P(emit x) = min(p, q)(x) + max(0, p - q)(x) = p(x).
    Positions chain: after an accepted d_i the target's next distribution is p_{i+1}; when all k
    are kept the bonus token comes straight from p_{k+1}.
    """
    k = len(draft)
    device = generator.device if generator is not None else "cpu"
    p = p.to(device)  # token-level arithmetic beside the per-request (CPU) generator
    q = None if q is None else q.to(device)
    if p.shape[0] != k + 1:
        raise ValueError(f"p needs k + 1 = {k + 1} rows, got {p.shape[0]}")
    if k == 0:
        return 0, draw(p[0], generator)
    idx = torch.arange(k)
    tokens = torch.tensor(draft, dtype=torch.long)
    p_draft = p[idx, tokens]  # (k,) target probability of each drafted token
    q_draft = torch.ones(k) if q is None else q[idx, tokens]  # (k,) draft probability (> 0: d was drawn from q)
    ratio = p_draft / q_draft.clamp_min(1e-30)
    u = torch.rand(k, generator=generator)
    rejected = (u >= ratio).nonzero()
    if rejected.numel() == 0:
        return k, draw(p[k], generator)  # all kept: bonus token from p_{k+1}
    i = int(rejected[0])
    q_i = _one_hot(draft[i], p.shape[1]) if q is None else q[i]
    residual = (p[i] - q_i).clamp_min(0.0)  # max(0, p - q), normalized by sampling
    if float(residual.sum()) <= 0.0:
        residual = p[i]  # p == q up to rounding: rejection had probability ~0, any p-sample is exact
    return i, draw(residual, generator)


def verify_greedy(*, draft: list[int], target: list[int]) -> tuple[int, int]:
    """(number of drafts accepted, next token) for a greedy block.

    ``target`` holds the target's k + 1 argmax tokens. With p one-hot at the argmax the rule above
    keeps d_i iff d_i == argmax p_i and the residual is p itself, so no randomness is needed.
    """
    for i, token in enumerate(draft):
        if token != target[i]:
            return i, target[i]
    return len(draft), target[len(draft)]


def _one_hot(token: int, vocab: int) -> torch.Tensor:
    out = torch.zeros(vocab)
    out[token] = 1.0
    return out
