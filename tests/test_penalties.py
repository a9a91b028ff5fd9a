"""Penalties and biases: the math against a reference on enumerated toy distributions, the batched
sampler, speculative verification (exact under penalties, greedy identical), constrained draws, rejections."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_speculative import chi2_pvalue

from decodekit import LLM, SamplingParams, Speculative
from decodekit.backends.mock import MockBackend
from decodekit.sampling import apply_penalties, penalize_rows, positions_penalized, probs_from_logits, sample_batch
from decodekit.strategies.constrained import Constrained

V = 6


def reference(logits: list[float], params: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    """The penalty rules written out token by token."""
    out = list(logits)
    bias = dict(params.logit_bias)
    for t in range(len(out)):
        out[t] += bias.get(t, 0.0)
        if t in prompt or t in output:
            r = params.repetition_penalty
            out[t] = out[t] / r if out[t] > 0 else out[t] * r
        count = output.count(t)
        out[t] -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
    return out


PARAMS = [SamplingParams(presence_penalty=0.7), SamplingParams(frequency_penalty=-0.4),
          SamplingParams(repetition_penalty=1.3), SamplingParams(logit_bias={2: 5.0, "4": -300}),
          SamplingParams(presence_penalty=-1.2, frequency_penalty=0.5, repetition_penalty=0.8,
                         logit_bias={0: 1.5}, temperature=0.7)]


@pytest.mark.parametrize("params", PARAMS)
def test_penalties_equal_the_reference_on_every_short_history(params):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=g) * 2
    for prompt in ([], [1], [3, 3, 5]):
        for n in range(3):
            for output in itertools.product(range(V), repeat=n):
                got = apply_penalties(logits, params, prompt, list(output))
                want = torch.tensor(reference(logits.tolist(), params, prompt, list(output)))
                assert torch.allclose(got, want, atol=1e-5)
                # the distribution a request samples from, exactly
                p = probs_from_logits(got, params)
                q = probs_from_logits(want, params)
                assert torch.allclose(p, q, atol=1e-6) and math.isclose(float(p.sum()), 1.0, rel_tol=1e-5)


def test_bias_is_clipped_and_params_validate():
    assert SamplingParams(logit_bias={"4": -300, 1: 1000}).logit_bias == ((1, 100.0), (4, -100.0))
    for bad in (dict(presence_penalty=3), dict(frequency_penalty=-2.5), dict(repetition_penalty=0),
                dict(logit_bias={"x": 1}), dict(logit_bias={1: "a"})):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert not SamplingParams().has_penalties and SamplingParams(logit_bias={1: 0.5}).has_penalties
    x = torch.randn(2, V)
    assert penalize_rows(x, [SamplingParams()] * 2, [None, None]) is x  # no penalties: no copy


def test_batched_sampler_rows_keep_their_own_history():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, presence_penalty=2.0, logit_bias={0: 3}),
              SamplingParams(temperature=0, frequency_penalty=2.0)]
    histories = [([], [int(logits[0].argmax())]), ([], [int(logits[1].argmax())]), ([], [2, 2, 2])]
    out = penalize_rows(logits, params, histories)
    assert torch.equal(out[0], logits[0])
    for i in (1, 2):
        assert torch.allclose(out[i], apply_penalties(logits[i], params[i], *histories[i]))
    tokens = sample_batch(out, params, [None] * 3)
    assert tokens == [int(r.argmax()) for r in out]


def test_verify_rows_get_each_positions_history():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(frequency_penalty=1.0)
    rows = positions_penalized(logits, params, [0], [1], [2, 3])
    for j, history in enumerate(([1], [1, 2], [1, 2, 3])):
        assert torch.allclose(rows[j], apply_penalties(logits[j], params, [0], history))


def _exact_pair(backend, prompt, params) -> torch.Tensor:
    """Exact joint distribution of the first two tokens under the penalized, processed target."""
    first = probs_from_logits(apply_penalties(backend.exact_logits(prompt), params, prompt, []), params)
    second = torch.stack([probs_from_logits(apply_penalties(backend.exact_logits(prompt + [a]), params, prompt, [a]),
                                            params) for a in range(V)])
    return first.unsqueeze(1) * second


@pytest.mark.parametrize("strategy", ["plain", "speculative"])
def test_sampled_tokens_follow_the_penalized_distribution(strategy, one_thread):
    n = 1500
    target = MockBackend(vocab_size=V, seed=0, cache_tokens=n * 30 + 64)
    params = dict(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.4,
                  logit_bias={3: 1.0})
    llm = LLM(backend=target, max_batch_size=n)
    spec = None
    if strategy == "speculative":
        draft = MockBackend(vocab_size=V, seed=7, name="draft", cache_tokens=n * 30 + 64)
        spec = Speculative(draft=draft, num_draft_tokens=3, verify_cost=(1.0,) * 17, width_cost=0.0)
    prompt = "abcab"
    out = llm.generate(prompt, strategy=spec, max_new_tokens=3, n=n, seed=5, ignore_eos=True, **params)
    counts = torch.zeros(V * V)
    for choice in out.choices:
        counts[choice.token_ids[0] * V + choice.token_ids[1]] += 1
    ids = target.tokenizer.encode(prompt)
    exact = _exact_pair(target, ids, SamplingParams(**params)).flatten()
    assert chi2_pvalue(counts, exact) > 1e-3
    plain = _exact_pair(target, ids, SamplingParams(temperature=1.0)).flatten()
    assert chi2_pvalue(counts, plain) < 1e-6, "the test must tell penalties from none"
    if spec is not None:
        assert out.stats.extra["tokens_accepted"] > 0
    assert target.cache.num_open_handles == 0


@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_speculative_greedy_with_penalties_equals_plain_greedy(draft):
    target = MockBackend(vocab_size=16, seed=0)
    spec = Speculative(draft=MockBackend(vocab_size=16, seed=0, name="d") if draft == "model" else "ngram")
    llm = LLM(backend=target)
    prompts = ["abcabcab", "hello", "bagbaghidebagba"]
    params = dict(temperature=0, max_new_tokens=30, ignore_eos=True, presence_penalty=0.6, frequency_penalty=0.3,
                  repetition_penalty=1.2, logit_bias={5: 2.0})
    plain = llm.generate(prompts, **params)
    fast = llm.generate(prompts, strategy=spec, **params)
    unpenalized = llm.generate(prompts, temperature=0, max_new_tokens=30, ignore_eos=True)
    assert [a.token_ids for a in plain] == [b.token_ids for b in fast]
    assert [a.token_ids for a in plain] != [c.token_ids for c in unpenalized]
    seeded = dict(params, temperature=0.9, seed=3)
    assert llm.generate(prompts, **seeded)[0].token_ids == llm.generate(prompts, **seeded)[0].token_ids
    assert target.cache.num_open_handles == 0


def test_constrained_draws_honour_a_bias_and_other_strategies_refuse():
    from decodekit.constraints import Regex

    llm = LLM(backend=MockBackend(vocab_size=16, seed=0))
    pattern = Regex("[ab]{6}")
    out = llm.generate("c", strategy=Constrained(pattern), max_new_tokens=8, temperature=0, logit_bias={1: 100})
    assert out.text == "aaaaaa"
    out = llm.generate("c", strategy=Constrained(pattern), max_new_tokens=8, temperature=0, logit_bias={2: 100})
    assert out.text == "bbbbbb"
    from decodekit.rollout.tree import TreeRollout

    with pytest.raises(ValueError, match="not applied by strategy 'tree'"):
        llm.rollout("c", TreeRollout(), max_new_tokens=4, presence_penalty=1.0)
