"""Sequential Monte Carlo over constrained particles: ESS, resampling, the particle population.

Each particle is one partial output with its own KV handle; particles share the prompt and
every common prefix through the cache manager (``fork``: no copy). Weights are in log space;
after a resampling every survivor carries the mean weight, so ``log_ml`` (the log of the mean
final weight) estimates the log marginal likelihood log sum_x p(x) c(x) (Del Moral's estimator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")


def normalized_weights(logw: torch.Tensor) -> torch.Tensor:
    """Weights summing to 1 (N,); all zero when every particle is dead."""
    logw = logw.double()
    total = torch.logsumexp(logw, 0)
    if not torch.isfinite(total):
        return torch.zeros_like(logw)
    return (logw - total).exp()


def ess(logw: torch.Tensor) -> float:
    """Effective sample size (sum w)^2 / sum w^2, in [1, N]; 0 when every weight is zero."""
    w = normalized_weights(logw)
    s2 = float((w * w).sum())
    return 1.0 / s2 if s2 > 0 else 0.0


def log_mean_weight(logw: torch.Tensor) -> float:
    return float(torch.logsumexp(logw.double(), 0)) - math.log(len(logw))


def systematic_resample(*, logw: torch.Tensor, generator: torch.Generator) -> list[int]:
    """Ancestor indices (N,): one uniform offset, N evenly spaced points on the weights' CDF."""
    n = len(logw)
    w = normalized_weights(logw)
    u = (torch.rand((), generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0  # guard rounding: every point falls inside
    return torch.searchsorted(cdf, u, right=True).clamp_(max=n - 1).tolist()


def multinomial_resample(*, logw: torch.Tensor, generator: torch.Generator) -> list[int]:
    """Ancestor indices (N,) drawn i.i.d. from the normalised weights."""
    w = normalized_weights(logw)
    return torch.multinomial(w, len(logw), replacement=True, generator=generator).tolist()


def json_weight(logw: float) -> float | None:
    """A log weight for JSON output: None for a dead particle's -inf."""
    return round(logw, 4) if logw > NEG_INF else None


RESAMPLERS = {"systematic": systematic_resample, "multinomial": multinomial_resample}


@dataclass
class Particle:
    """One partial output. Its KV ``lane`` (``decodekit.context.Lane``) holds ``ids[:len(lane)]``."""

    lane: object | None
    out: list[int]  # output token ids so far (no EOS)
    text: bytes
    logw: float = 0.0
    done: bool = False  # ended with EOS (or dead: logw == -inf)
    eos: int | None = None
    fsa_state: int | None = None
    critic: float = 0.0  # last critic score (twist), removed at the next step
    logits: list = field(default_factory=list)  # per-token raw logits, kept only when logprobs are asked
    next_logits: torch.Tensor | None = None  # (V,) logits for the next token, once computed
    block: tuple | None = None  # with drafts: (logits (k + 1, V), the k drafted tokens) of this step
    weight_trace: list = field(default_factory=list)  # log weight after each step (None once dead), by lineage

    @property
    def alive(self) -> bool:
        return not self.done and self.logw > NEG_INF


def resample(particles: list[Particle], ancestors: list[int], *, fork, close) -> list[Particle]:
    """New population from ancestor indices: reuse each chosen lane once, ``fork(lane)`` it for copies,
    ``close(lane)`` the lanes of particles nobody chose. Weights become the mean weight."""
    logw = torch.tensor([p.logw for p in particles], dtype=torch.float64)
    mean = log_mean_weight(logw)
    used: set[int] = set()
    out = []
    for a in ancestors:
        src = particles[a]
        lane = src.lane
        if a in used and lane is not None and not lane.closed:
            lane = fork(lane)
        used.add(a)
        out.append(Particle(lane, list(src.out), src.text, mean, src.done, src.eos, src.fsa_state,
                            src.critic, list(src.logits), weight_trace=list(src.weight_trace)))
    for i, p in enumerate(particles):
        if i not in used and p.lane is not None:
            close(p.lane)
    return out
