"""Logits processors and sampling against hand-computed distributions."""

import math

import pytest
import torch

from decodekit.sampling import entropy_bits, probs_from_logits, sample_token, token_logprobs
from decodekit.types import SamplingParams

LOGITS = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))


def probs(**kw):
    return probs_from_logits(LOGITS, SamplingParams(**kw))


def test_temperature_and_greedy():
    assert torch.allclose(probs(temperature=1.0), LOGITS.exp(), atol=1e-6)
    hot = torch.softmax(LOGITS / 2.0, -1)
    assert torch.allclose(probs(temperature=2.0), hot, atol=1e-6)
    assert probs(temperature=0).tolist() == [1.0, 0, 0, 0, 0]


def test_top_k_top_p_min_p_keep_the_right_sets():
    assert torch.allclose(probs(top_k=2), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]), atol=1e-6)
    # nucleus 0.8: 0.5 + 0.2 < 0.8, so the third token (0.15) is needed too
    assert torch.allclose(probs(top_p=0.8), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=1e-6)
    assert torch.allclose(probs(top_p=0.7), torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7, atol=1e-6)
    # min_p 0.3: keep p >= 0.3 * 0.5 = 0.15
    assert torch.allclose(probs(min_p=0.3), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=1e-6)


def test_sampling_matches_distribution():
    params = SamplingParams(temperature=1.0, top_k=4)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([sample_token(LOGITS, params, gen) for _ in range(n)]), minlength=5)
    expected = probs(top_k=4) * n
    assert counts[4] == 0
    chi2 = float((((counts[:4] - expected[:4]) ** 2) / expected[:4]).sum())
    assert chi2 < 16.3  # chi-square, 3 dof, p = 0.001


def test_same_seed_same_tokens():
    params = SamplingParams(temperature=1.0)
    draws = [[sample_token(LOGITS, params, torch.Generator().manual_seed(7)) for _ in range(5)] for _ in range(2)]
    assert draws[0] == draws[1]


def test_logprobs_and_entropy():
    lp, top = token_logprobs(LOGITS, 2, 2)
    assert lp == pytest.approx(math.log(0.15), abs=1e-6)
    assert [t for t, _ in top] == [0, 1]
    assert float(entropy_bits(torch.zeros(8))) == pytest.approx(3.0, abs=1e-5)
    assert float(entropy_bits(torch.tensor([0.0, -1e9]))) == pytest.approx(0.0, abs=1e-5)
    h = -sum(p * math.log2(p) for p in [0.5, 0.2, 0.15, 0.1, 0.05])
    assert float(entropy_bits(LOGITS)) == pytest.approx(h, abs=1e-5)


@pytest.mark.parametrize(
    "kw, name",
    [(dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
     (dict(min_p=1.0), "min_p"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(n=0), "n"),
     (dict(top_k=-1), "top_k"), (dict(seed=-3), "seed"), (dict(stop=[""]), "stop"),
     (dict(logprobs=50), "logprobs"), (dict(temperature="hot"), "temperature")],
)
def test_bad_parameters_name_themselves(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)
