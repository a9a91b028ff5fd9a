"""Token samplers under a constraint, as pure functions: adaptive weighted rejection sampling
(AWRS) and the masked baseline. Each returns ``TokenDraw(token, logw, num_checks)``.

Target of one step: the constrained next-token distribution p(x) c(x) / Z with
Z = sum_x p(x) c(x), c the 0/1 constraint. ``logw`` is log Z exactly (masked) or the log of an
unbiased estimate of Z (AWRS), the incremental importance weight SMC needs.

AWRS (Lipkin et al., COLM 2025): walk the vocabulary in a random order that is a draw *without
replacement* from p (Gumbel-top-k: sort log p + Gumbel noise), check tokens one at a time, and
stop at the first accepted one. Rejected tokens never come back, so the first acceptance is an
exact draw from p c / Z, after few checks wherever p puts its mass on valid tokens.

Weight estimator: genlm-control's "recursive AWRS" (its current default for non-peaked
distributions), not the paper's two-round one. With R the rejected mass so far, the next token x
in the walk is a draw from p restricted to the rest, with probability q = p(x) / (1 - R). Write
z = Z_rest / (1 - R) (the accepted share of the rest). Then
    x rejected:  z = (1 - q) z'            (x contributes nothing: recurse on the rest),
    x accepted:  z = q + (1 - q) z'        (z' estimated by one more coin: is the next token in
                                           the walk, a fresh draw from the rest, accepted?)
so the estimate prod_rejected (1 - q_i) * (q + (1 - q) 1[next accepted]) is unbiased for
Z / (1 - 0) = Z, at the cost of one extra check after the first acceptance. The tests check
E[exp(logw)] = Z by Monte Carlo on toy distributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

NEG_INF = float("-inf")
_TOP = 64  # the walk almost always stops within the first few tokens: sort only these, lazily


class TokenDraw(NamedTuple):
    token: int  # the accepted token; on a dead end, the last token tried (-1 if none)
    logw: float  # log of the (estimated) local normaliser Z; -inf on a dead end
    num_checks: int


def gumbel_keys(logp: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """log p + Gumbel(0, 1) noise (V,), float64: sorting the keys descending draws without replacement."""
    if generator is None:  # greedy: the order is simply by probability
        return logp.double()
    u = torch.rand(logp.shape, generator=generator, dtype=torch.float64).clamp_(min=1e-300)
    return logp.double() - torch.log(-torch.log(u))


def _walk(keys: torch.Tensor):
    """Token ids with finite key in descending key order; sorts only the top _TOP unless walked past."""
    num_finite = int(torch.isfinite(keys).sum())
    top = torch.topk(keys, min(_TOP, num_finite)).indices.tolist()
    yield from top
    if num_finite > len(top):
        order = torch.sort(keys, descending=True).indices[len(top) : num_finite].tolist()
        yield from order


def recursive_awrs(*, logp: torch.Tensor, accept: Callable[[int], bool],
                   generator: torch.Generator | None, max_checks: int | None = None) -> TokenDraw:
    """One AWRS draw. ``logp`` (V,): log-probabilities (sum <= 1; -inf for tokens known invalid).

    ``generator=None`` walks greedily by probability (constrained greedy; the weight is then not
    an importance weight). ``max_checks`` gives up (weight -inf) after that many rejections: a
    bounded search where a dead end is likely (the weight is then no longer unbiased).
    """
    logp = logp.double().cpu()  # a token-by-token walk: on the CPU, like the per-request generators
    log_mass = float(torch.logsumexp(logp, 0))
    if log_mass == NEG_INF:
        return TokenDraw(-1, NEG_INF, 0)
    logp = logp - log_mass  # renormalise over the candidates; log_mass joins the weight
    keys = gumbel_keys(logp, generator)
    walk = _walk(keys)
    rejected, log_mult, checks, tok = 0.0, 0.0, 0, -1
    nxt = next(walk, None)
    while nxt is not None:
        tok, nxt = nxt, next(walk, None)
        log_q = 0.0 if nxt is None else min(0.0, float(logp[tok]) - math.log1p(-min(rejected, 1 - 1e-16)))
        checks += 1
        if accept(tok):
            if nxt is None:
                return TokenDraw(tok, log_mass + log_mult, checks)
            checks += 1
            tail = 0.0 if accept(nxt) else log_q  # log(q + (1 - q) * coin)
            return TokenDraw(tok, log_mass + log_mult + tail, checks)
        rejected += math.exp(float(logp[tok]))
        if nxt is None or rejected >= 1 - 1e-12 or log_q == 0.0 or (max_checks and checks >= max_checks):
            break
        log_mult += math.log1p(-math.exp(log_q))  # the rest keeps (1 - q) of the mass
    return TokenDraw(tok, NEG_INF, checks)


def masked_sample(*, logp: torch.Tensor, allowed: torch.Tensor, generator: torch.Generator | None,
                  num_checks: int = 0) -> TokenDraw:
    """Sample from p restricted to ``allowed`` (bool (V,)), renormalised; ``logw`` = log Z exactly."""
    masked = logp.double().cpu().masked_fill(~allowed.cpu(), NEG_INF)  # CPU, like the generators
    log_z = float(torch.logsumexp(masked, 0))
    if log_z == NEG_INF:
        return TokenDraw(-1, NEG_INF, num_checks)
    if generator is None:
        return TokenDraw(int(masked.argmax()), log_z, num_checks)
    probs = (masked - log_z).exp()
    return TokenDraw(int(torch.multinomial(probs, 1, generator=generator)), log_z, num_checks)


def check_all(*, logp: torch.Tensor, accept: Callable[[int], bool]) -> torch.Tensor:
    """The exact mask by checking every token with non-zero probability (the baseline's cost)."""
    allowed = torch.zeros(logp.shape, dtype=torch.bool)
    ok = [tok for tok in torch.nonzero(torch.isfinite(logp)).flatten().tolist() if accept(tok)]
    if ok:
        allowed[torch.tensor(ok, dtype=torch.long)] = True
    return allowed
