"""Entropy switching judged as a method: schedules at the same large-model share, and paired statistics.

A baseline hands each window of ``window`` output tokens to one model by a schedule instead of the
entropy rule: *random* (the large model with probability s, seeded per prompt and window) or
*interleaved* (an evenly spaced fixed pattern with share s: for s = 1/k the large model writes every
k-th window). Both run through ``EntropySwitch`` itself, so prompts, catch-up prefill and cost
accounting are the same as the entropy rule's.
"""

from __future__ import annotations

import math
import random

import torch

from decodekit.strategies.entropy import LARGE, SMALL, EntropySwitch


class ScheduledSwitch(EntropySwitch):
    """Switching by a schedule at large-model share ``share`` (``kind``: "random" or "interleaved")."""

    def __init__(self, small, *, share: float, kind: str, seed: int = 0, window: int = 5):
        if kind not in ("random", "interleaved"):
            raise ValueError(f"kind must be 'random' or 'interleaved', got {kind!r}")
        super().__init__(small=small, threshold=math.inf, window=window, min_dwell=1)
        self.share, self.kind, self.seed = share, kind, seed

    def choose(self, seq, st) -> str:
        block = len(seq.output_ids) // self.window
        return LARGE if self.large_writes(seq.ids[: seq.num_prompt], block) else SMALL

    def large_writes(self, prompt_ids: list[int], block: int) -> bool:
        if self.kind == "random":  # seeded per (seed, prompt, window): reruns and other configs see the same draws
            return random.Random(f"{self.seed}:{len(prompt_ids)}:{prompt_ids[-6:]}:{block}").random() < self.share
        return math.floor((block + 1) * self.share) > math.floor(block * self.share)


def pooled_ratio(rows: list[tuple[float, int]], base: list[tuple[float, int]], idx) -> float:
    """exp(mean log-lik per token of ``rows`` - that of ``base``) over the prompts ``idx`` (token-weighted)."""
    def mean(r):
        return sum(r[i][0] for i in idx) / max(1, sum(r[i][1] for i in idx))

    return math.exp(mean(rows) - mean(base))


def paired_bootstrap(a: list[tuple[float, int]], b: list[tuple[float, int]], base: list[tuple[float, int]],
                     iters: int = 4000, seed: int = 0) -> tuple[float, list[float]]:
    """Quality-ratio gain of ``a`` over ``b`` (per-prompt (log-lik sum, tokens) lists against ``base``) and a
    95% percentile interval from resampling prompts with replacement (paired: the same prompts for both)."""
    n = len(a)
    everyone = range(n)
    gain = pooled_ratio(a, base, everyone) - pooled_ratio(b, base, everyone)
    rng = random.Random(seed)
    draws = []
    for _ in range(iters):
        idx = [rng.randrange(n) for _ in everyone]
        draws.append(pooled_ratio(a, base, idx) - pooled_ratio(b, base, idx))
    lo, hi = torch.tensor(draws).quantile(torch.tensor([0.025, 0.975], dtype=torch.float32)).tolist()
    return gain, [lo, hi]


def pool_seeds(per_seed: list[list[tuple[float, int]]]) -> list[tuple[float, int]]:
    """Per-prompt (log-lik sum, tokens) summed over seeds: the seeds' average, token-weighted."""
    return [(sum(r[i][0] for r in per_seed), sum(r[i][1] for r in per_seed)) for i in range(len(per_seed[0]))]
