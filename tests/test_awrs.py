"""AWRS and the masked sampler on exact toy distributions: token law and weight unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

from decodekit.constraints.awrs import check_all, masked_sample, recursive_awrs

CASES = {
    # name: (probabilities, accepted token ids)
    "spread": ([0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05], {1, 3, 6}),
    "peaked_valid": ([0.9, 0.04, 0.03, 0.02, 0.01], {0, 4}),
    "peaked_invalid": ([0.9, 0.04, 0.03, 0.02, 0.01], {2, 4}),
    "tiny_z": ([0.5, 0.3, 0.15, 0.049, 0.001], {4}),
}


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor, n: int) -> bool:
    """Pearson chi-square against 99.9% quantile (Wilson-Hilferty approximation)."""
    keep = probs > 0
    expected = probs[keep] * n
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    k = int(keep.sum()) - 1
    if k == 0:
        return bool((counts[~keep] == 0).all())
    crit = k * (1 - 2 / (9 * k) + 3.09 * math.sqrt(2 / (9 * k))) ** 3
    return stat < crit and bool((counts[~keep] == 0).all())


@pytest.mark.parametrize("case", sorted(CASES))
def test_awrs_token_law_and_unbiased_weight(case):
    probs, good = CASES[case]
    p = torch.tensor(probs, dtype=torch.float64)
    logp = p.log()
    z = float(sum(p[i] for i in good))
    gen = torch.Generator().manual_seed(1)
    n = 5000
    counts = torch.zeros(len(p))
    weights, checks = [], 0
    for _ in range(n):
        draw = recursive_awrs(logp=logp, accept=lambda t: t in good, generator=gen)
        counts[draw.token] += 1
        weights.append(math.exp(draw.logw))
        checks += draw.num_checks
    target = torch.tensor([probs[i] / z if i in good else 0.0 for i in range(len(p))], dtype=torch.float64)
    assert _chi2_ok(counts, target, n), (counts / n, target)
    w = torch.tensor(weights, dtype=torch.float64)
    se = float(w.std()) / math.sqrt(n)
    assert abs(float(w.mean()) - z) < 4 * se + 1e-12, (float(w.mean()), z, se)
    assert checks / n < len(p)  # never worse than checking everything


def test_awrs_estimate_is_not_trivially_exact():
    """The estimator has variance (a test that could not fail would prove nothing)."""
    p = torch.tensor(CASES["spread"][0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    ws = {recursive_awrs(logp=p.log(), accept=lambda t: t in {1, 3, 6}, generator=gen).logw for _ in range(200)}
    assert len(ws) > 2


def test_awrs_dead_end_and_pruned_mass():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    draw = recursive_awrs(logp=p.log(), accept=lambda t: False, generator=torch.Generator().manual_seed(0))
    assert draw.logw == float("-inf") and draw.num_checks == 3
    # tokens known invalid up front (-inf) are never checked, and their mass stays out of Z
    logp = p.log().clone()
    logp[0] = float("-inf")
    gen = torch.Generator().manual_seed(0)
    seen = [recursive_awrs(logp=logp, accept=lambda t: True, generator=gen) for _ in range(50)]
    assert all(d.token != 0 for d in seen)
    assert all(abs(math.exp(d.logw) - 0.5) < 1e-9 for d in seen)  # every candidate valid: exact Z


def test_awrs_greedy_takes_most_likely_valid():
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    draw = recursive_awrs(logp=p.log(), accept=lambda t: t != 0, generator=None)
    assert draw.token == 1


def test_masked_matches_renormalised_distribution():
    probs, good = CASES["spread"]
    p = torch.tensor(probs, dtype=torch.float64)
    allowed = check_all(logp=p.log(), accept=lambda t: t in good)
    assert allowed.tolist() == [i in good for i in range(len(p))]
    gen = torch.Generator().manual_seed(3)
    n = 8000
    counts = torch.zeros(len(p))
    for _ in range(n):
        draw = masked_sample(logp=p.log(), allowed=allowed, generator=gen)
        counts[draw.token] += 1
        assert abs(math.exp(draw.logw) - sum(probs[i] for i in good)) < 1e-12  # log Z exactly
    z = sum(probs[i] for i in good)
    assert _chi2_ok(counts, torch.tensor([probs[i] / z if i in good else 0 for i in range(len(p))]), n)
    dead = masked_sample(logp=p.log(), allowed=torch.zeros(len(p), dtype=torch.bool), generator=gen)
    assert dead.logw == float("-inf")
