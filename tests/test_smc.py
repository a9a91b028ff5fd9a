"""SMC over constrained particles on the mock backend: resampling, cache hygiene, and exactness
against the global constrained distribution p(x | c) found by enumeration, on a toy problem
built so that locally constrained sampling (masking or AWRS without SMC) is measurably myopic."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from decodekit.api import LLM
from decodekit.backends.mock import MockBackend
from decodekit.constraints import OneOf, Regex
from decodekit.constraints.smc import ess, multinomial_resample, systematic_resample
from decodekit.strategies.constrained import Constrained

NEG = float("-inf")
# vocab: 0 EOS, 1 a, 2 b, 3 c, 4 d, 5 e.  Prompt "e".  Constraint: [ab][cd] then EOS.
FIRST = {1: 0.7, 2: 0.3}  # the model prefers "a" ...
AFTER = {1: {3: 0.05, 4: 0.05, 5: 0.9}, 2: {3: 0.5, 4: 0.5}}  # ... but "a" mostly leads to a dead end
P_EOS_END = 0.9


def _toy_logits(context: list[int]) -> torch.Tensor:
    out = len(context) - 1  # the prompt is one token
    probs = {0: FIRST, 1: AFTER.get(context[-1], {5: 1.0}), 2: {0: P_EOS_END, 5: 1 - P_EOS_END}}.get(out, {0: 1.0})
    logits = torch.full((6,), NEG)
    for t, pr in probs.items():
        logits[t] = math.log(pr)
    return logits


def _exact_global() -> tuple[dict[str, float], float]:
    joint = {}
    for a, pa in FIRST.items():
        for b, pb in AFTER[a].items():
            if b in (3, 4):
                joint["ab"[a - 1] + "cd"[b - 3]] = pa * pb * P_EOS_END
    z = sum(joint.values())
    return {k: v / z for k, v in joint.items()}, z


def _tv(counts: Counter, exact: dict[str, float]) -> float:
    n = sum(counts.values())
    keys = set(counts) | set(exact)
    return 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in keys)


@pytest.fixture
def toy():
    return LLM(backend=MockBackend(vocab_size=6, logits_fn=_toy_logits, cache_tokens=40000), max_batch_size=1000)


def test_resamplers_follow_weights():
    logw = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64).log()
    gen = torch.Generator().manual_seed(0)
    sys_counts, mul_counts = Counter(), Counter()
    for _ in range(2000):
        sys_counts.update(systematic_resample(logw=logw, generator=gen))
        mul_counts.update(multinomial_resample(logw=logw, generator=gen))
    for counts in (sys_counts, mul_counts):
        total = sum(counts.values())
        assert counts[3] == 0
        for i, w in enumerate([0.5, 0.3, 0.2]):
            assert abs(counts[i] / total - w) < 0.01
    # systematic: each index appears floor(N w) or ceil(N w) times
    for _ in range(50):
        c = Counter(systematic_resample(logw=logw, generator=gen))
        assert all(abs(c[i] - 4 * w) < 1 for i, w in enumerate([0.5, 0.3, 0.2]))
    assert ess(torch.zeros(5)) == pytest.approx(5.0)
    assert ess(torch.tensor([0.0, NEG, NEG])) == pytest.approx(1.0)


def test_smc_recovers_global_distribution_where_local_sampling_is_myopic(toy):
    exact, z = _exact_global()
    n = 200
    results = {}
    for name, strategy in {"masked": Constrained(Regex("[ab][cd]"), sampler="masked"),
                           "awrs": Constrained(Regex("[ab][cd]")),
                           "smc": Constrained(Regex("[ab][cd]", automaton=False), num_particles=20)}.items():
        c = toy.generate("e", strategy=strategy, n=n, seed=7, max_new_tokens=4)
        assert all(ch.finish_reason == "stop" for ch in c.choices)
        results[name] = (Counter(ch.text for ch in c.choices), c.stats.extra)
    # local sampling picks the first letter by the model's 0.7 / 0.3: far from p(x | c)
    for name in ("masked", "awrs"):
        counts, _ = results[name]
        assert abs(sum(v for k, v in counts.items() if k[0] == "a") / n - FIRST[1]) < 0.1
        assert _tv(counts, exact) > 0.35
    counts, extra = results["smc"]
    assert _tv(counts, exact) < 0.09, (counts, exact)
    # the marginal-likelihood estimate is unbiased: mean of exp(log_ml) over runs is Z
    ml = torch.tensor([math.exp(x) for x in extra["log_ml_per_choice"]], dtype=torch.float64)
    assert abs(float(ml.mean()) - z) < 4 * float(ml.std()) / math.sqrt(n) + 1e-3
    assert extra["resampling_events"] > 0
    assert toy.backend.cache.num_open_handles == 0
    toy.backend.cache.check_integrity()


def test_smc_reports_particles_and_fails_cleanly(toy):
    c = toy.generate("e", strategy=Constrained(Regex("[ab][cd]"), num_particles=6), seed=1, max_new_tokens=4)
    extra = c.stats.extra
    assert c.text in {"ac", "ad", "bc", "bd"} and c.finish_reason == "stop"
    assert len(extra["particles"]) == 6 and abs(sum(p["weight"] for p in extra["particles"]) - 1) < 1e-9
    assert len(extra["ess_trace"]) == len(extra["particles_alive"]) > 0
    # two tokens + EOS cannot fit in max_new_tokens=2: every particle dies at the forced EOS
    c = toy.generate("e", strategy=Constrained(Regex("[ab][cd]"), num_particles=4), seed=1, max_new_tokens=2)
    assert c.finish_reason == "constraint_failed" and "particle" in c.stats.extra["constraint_error"]
    # one particle: the last allowed token must complete the text; then the engine ends it by length
    c = toy.generate("e", strategy=Constrained(Regex("[ab][cd]")), seed=1, max_new_tokens=2)
    assert c.finish_reason == "length" and c.text in {"ac", "ad", "bc", "bd"}
    c = toy.generate("e", strategy=Constrained(Regex("[ab][cd]")), seed=1, max_new_tokens=1)
    assert c.finish_reason == "constraint_failed" and "max_new_tokens" in c.stats.extra["constraint_error"]
    # a constraint the model can never satisfy: a dead end, not an endless loop
    c = toy.generate("e", strategy=Constrained(OneOf(["zz"])), seed=0, max_new_tokens=4)
    assert c.finish_reason == "constraint_failed" and c.text == ""
    assert toy.backend.cache.num_open_handles == 0
    toy.backend.cache.check_integrity()


def test_smc_critic_reweights(toy):
    """A critic that forbids a first letter "b" leaves only "a..." outputs (a twist in the weights)."""
    critic = lambda text: float("-inf") if text.startswith("b") else 0.0  # noqa: E731
    c = toy.generate("e", strategy=Constrained(Regex("[ab][cd]"), num_particles=8, critic=critic), n=20,
                     seed=2, max_new_tokens=4)
    assert all(ch.text in {"ac", "ad"} for ch in c.choices)


def test_bad_options():
    with pytest.raises(ValueError, match="sampler"):
        Constrained(Regex("a"), sampler="beam")
    with pytest.raises(ValueError, match="num_particles"):
        Constrained(Regex("a"), num_particles=0)
    with pytest.raises(ValueError, match="ess_threshold"):
        Constrained(Regex("a"), ess_threshold=2)
    with pytest.raises(ValueError, match="constraint"):
        Constrained("a+")
