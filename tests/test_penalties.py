"""Penalties and biases: the math against a reference on enumerated toy distributions, the batched
sampler, speculative verification (exact under penalties, greedy identical), constrained draws, tree
leaves, entropy switching (plain and verified), constrained speculative, rejections."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_entropy import mock_pair
from test_speculative import chi2_pvalue

from decodekit import LLM, SamplingParams, Speculative
from decodekit.backends.mock import MockBackend
from decodekit.constraints import Regex
from decodekit.rollout.tree import TreeRollout
from decodekit.sampling import apply_penalties, penalize_rows, positions_penalized, probs_from_logits, sample_batch
from decodekit.strategies import BestOfN, EntropySwitch
from decodekit.strategies.constrained import Constrained
from decodekit.strategies.registry import REGISTRY

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


def test_constrained_draws_honour_a_bias_and_a_strategy_that_cannot_refuses():
    llm = LLM(backend=MockBackend(vocab_size=16, seed=0))
    pattern = Regex("[ab]{6}")
    out = llm.generate("c", strategy=Constrained(pattern), max_new_tokens=8, temperature=0, logit_bias={1: 100})
    assert out.text == "aaaaaa"
    out = llm.generate("c", strategy=Constrained(pattern), max_new_tokens=8, temperature=0, logit_bias={2: 100})
    assert out.text == "bbbbbb"
    with pytest.raises(ValueError, match="not applied by strategy 'best_of'"):
        llm.generate("c", strategy=BestOfN(2), max_new_tokens=4, presence_penalty=1.0)


# ---- tree leaves, entropy switching, constrained speculative: the same penalized target ------------
PENALTIES = dict(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.4, logit_bias={3: 1.0})
GREEDY = dict(temperature=0, max_new_tokens=24, ignore_eos=True, presence_penalty=0.6, frequency_penalty=0.3,
              repetition_penalty=1.2, logit_bias={5: 2.0})
PROMPTS = ["abcabcab", "hello", "bagbaghidebagba"]


def _pair_counts(choices, vocab: int) -> torch.Tensor:
    counts = torch.zeros(vocab * vocab)
    for choice in choices:
        counts[choice.token_ids[0] * vocab + choice.token_ids[1]] += 1
    return counts


def test_tree_leaves_follow_the_penalized_distribution(one_thread):
    n = 1500
    target = MockBackend(vocab_size=V, seed=0, cache_tokens=n * 8 + 64)
    tree = TreeRollout(segment_len=4, branch_factor=1, max_width=n, first_split=n, early_stop=None, fallback=False)
    result = LLM(backend=target).rollout("abcab", tree, max_new_tokens=3, seed=5, ignore_eos=True, temperature=1.0,
                                         **PENALTIES)
    assert len(result.trajectories) == n
    counts = _pair_counts(result.trajectories, V)
    ids = target.tokenizer.encode("abcab")
    assert chi2_pvalue(counts, _exact_pair(target, ids, SamplingParams(temperature=1.0, **PENALTIES)).flatten()) > 1e-3
    assert chi2_pvalue(counts, _exact_pair(target, ids, SamplingParams(temperature=1.0)).flatten()) < 1e-6
    # log-probabilities stay the raw model's, as on every other path
    traj = result.trajectories[0]
    raw = torch.log_softmax(target.exact_logits(ids), -1)[traj.token_ids[0]]
    assert traj.logprobs[0] == pytest.approx(float(raw), abs=1e-5)
    assert target.cache.num_open_handles == 0


def test_greedy_tree_branches_carry_their_whole_path_as_history():
    """Every branch of a greedy tree is plain greedy decoding with the same penalties: after a split a child's
    history is its parent's tokens plus its own (a child that saw only its own segment would diverge)."""
    llm = LLM(backend=MockBackend(vocab_size=16, seed=0, cache_tokens=4096))
    tree = TreeRollout(segment_len=3, branch_factor=2, max_width=8, first_split=2, early_stop=None)
    for prompt in PROMPTS:
        want = llm.generate(prompt, **GREEDY).token_ids
        assert want != llm.generate(prompt, temperature=0, max_new_tokens=24, ignore_eos=True).token_ids
        result = llm.rollout(prompt, tree, **GREEDY)
        assert len(result.trajectories) == 8 and max(n.depth for n in result.nodes) == 8
        assert all(t.token_ids == want for t in result.trajectories)
    # a constrained tree draws from the penalized constrained distribution
    tree = TreeRollout(segment_len=3, max_width=4, first_split=2, constraint=Regex("[ab]{6}"))
    for bias, text in (({1: 100}, "aaaaaa"), ({2: 100}, "bbbbbb")):
        result = llm.rollout("c", tree, max_new_tokens=8, temperature=0, logit_bias=bias)
        assert result.texts == [text] * 4


def test_the_registry_says_which_strategies_honour_penalties():
    assert {name for name, e in REGISTRY.items() if e.penalties} == {
        "sample", "speculative", "constrained", "constrained_speculative", "entropy", "tree"}


@pytest.mark.parametrize("tau,verify", [(0.0, None), (math.inf, None), (math.inf, 0.0), (1.0, 0.0)])
def test_entropy_greedy_with_penalties_equals_its_writer_alone(tau, verify):
    """Plain switching at threshold 0 / inf is exactly the large / small model, verified mode at tolerance 0
    exactly the large one: with penalties too (draft, verify and write positions each get their history)."""
    small, large = mock_pair()
    st = EntropySwitch(small=small, threshold=tau, window=2, min_dwell=1, verify=verify)
    got = LLM(backend=large).generate(PROMPTS, strategy=st, **GREEDY)
    writer = large if verify is not None or tau == 0.0 else small
    want = LLM(backend=writer).generate(PROMPTS, **GREEDY)
    unpenalized = LLM(backend=writer).generate(PROMPTS, temperature=0, max_new_tokens=24, ignore_eos=True)
    assert [a.token_ids for a in got] == [b.token_ids for b in want]
    assert [a.token_ids for a in got] != [c.token_ids for c in unpenalized]
    if verify is not None and tau == math.inf:  # the small model drafts every segment
        assert sum(o.stats.extra["tokens_drafted"] for o in got) > 0
    assert small.cache.num_open_handles == 0 and large.cache.num_open_handles == 0


@pytest.mark.parametrize("verify", [None, 0.0])
def test_entropy_sampled_tokens_follow_the_penalized_distribution(verify, one_thread):
    """Sampled: unverified at threshold inf follows the penalized small model, verified at tolerance 0 the
    penalized large one (drafts from the penalized small model, accepted by the exact rule)."""
    n = 1500
    small = MockBackend(V, seed=7, name="s", cache_tokens=n * 30)
    large = MockBackend(V, seed=0, name="l", cache_tokens=n * 30)
    st = EntropySwitch(small=small, threshold=math.inf, window=1, min_dwell=1, verify=verify, max_segment=3)
    sampling = dict(temperature=1.0, **PENALTIES)
    out = LLM(backend=large, max_batch_size=n).generate("abcab", strategy=st, n=n, seed=3, max_new_tokens=4,
                                                       ignore_eos=True, **sampling)
    counts = _pair_counts(out.choices, V)
    prompt = large.tokenizer.encode("abcab")
    writer = large if verify is not None else small
    assert chi2_pvalue(counts, _exact_pair(writer, prompt, SamplingParams(**sampling)).flatten()) > 1e-3
    assert chi2_pvalue(counts, _exact_pair(writer, prompt, SamplingParams(temperature=1.0)).flatten()) < 1e-6
    if verify is not None:
        assert out.stats.extra["tokens_kept"] > 0
    assert large.cache.num_open_handles == 0 and small.cache.num_open_handles == 0


def test_entropy_with_a_constraint_honours_a_bias():
    small, large = mock_pair()
    llm = LLM(backend=large)
    for bias, text in (({1: 100}, "aaaaaa"), ({2: 100}, "bbbbbb")):
        st = EntropySwitch(small=small, threshold=1.0, window=2, min_dwell=1, constraint=Regex("[ab]{6}"))
        assert llm.generate("c", strategy=st, max_new_tokens=8, temperature=0, logit_bias=bias).text == text


PATTERN = "(ab|ac)(defg|hij)+k"


@pytest.mark.parametrize("sampler", ["awrs", "masked"])
@pytest.mark.parametrize("draft", ["forced", "ngram", "model"])
def test_constrained_speculative_with_penalties_equals_constrained(draft, sampler):
    """Greedy and seeded: the same tokens as ``Constrained`` with the same penalties."""
    target = MockBackend(vocab_size=16, seed=3, cache_tokens=30000)
    llm = LLM(backend=target, max_batch_size=64)
    source = MockBackend(vocab_size=16, seed=3, name="d") if draft == "model" else draft
    prompts = ["abcab", "a", "acac", "bad"]
    params = dict(GREEDY, max_new_tokens=40)
    plain = llm.generate(prompts, constraint=Regex(PATTERN), sampler=sampler, **params)
    fast = llm.generate(prompts, strategy=Speculative(draft=source), constraint=Regex(PATTERN), sampler=sampler,
                        **params)
    unpenalized = llm.generate(prompts, constraint=Regex(PATTERN), sampler=sampler, temperature=0, max_new_tokens=40)
    assert [a.token_ids for a in plain] == [b.token_ids for b in fast]
    assert [a.token_ids for a in plain] != [c.token_ids for c in unpenalized]
    assert sum(c.stats.extra["tokens_accepted"] for c in fast) > 0
    if draft != "model":  # drafts that use no randomness: the same random stream, the same text
        seeded = dict(temperature=1.0, max_new_tokens=30, seed=5, n=16, **PENALTIES)
        spec = Speculative(draft=source, width_cost=0.0)
        a = llm.generate("abca", constraint=Regex("(ab|ac)(defg|hij){1,4}"), sampler=sampler, **seeded)
        b = llm.generate("abca", strategy=spec, constraint=Regex("(ab|ac)(defg|hij){1,4}"), sampler=sampler, **seeded)
        assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    target.cache.check_integrity()
    assert target.cache.num_open_handles == 0


def _penalized_masked_pair(backend, prompt, params, allowed: set[int], vocab: int) -> torch.Tensor:
    """Exact joint law (vocab, vocab) of the first two tokens: penalties with each position's history, then
    the processed distribution, masked to ``allowed`` and renormalised."""
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[list(allowed)] = True

    def masked(output):
        logits = apply_penalties(backend.exact_logits(prompt + output), params, prompt, output)
        p = probs_from_logits(logits, params).double().masked_fill(~keep, 0.0)
        return p / p.sum()

    second = torch.stack([masked([a]) for a in range(vocab)])
    return (masked([]).unsqueeze(1) * second).float()


@pytest.mark.parametrize("sampler", ["masked", "awrs"])
def test_constrained_speculative_sampled_drafts_follow_the_penalized_target(sampler, one_thread):
    """A model's sampled drafts (unlike the target) verified by the q rule (masked) or draw-and-compare (awrs):
    the first two tokens follow the penalized, masked target exactly."""
    n, vocab = 2000, 16
    target = MockBackend(vocab_size=vocab, seed=0, cache_tokens=n * 30 + 64)
    drafter = MockBackend(vocab_size=vocab, seed=7, name="draft", cache_tokens=n * 30 + 64)
    spec = Speculative(draft=drafter, num_draft_tokens=3, verify_cost=(1.0,) * 17, width_cost=0.0)
    letters = "abcdefgh"
    sampling = dict(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.4,
                    logit_bias={4: 1.0})
    out = LLM(backend=target, max_batch_size=n).generate(
        "abcab", strategy=spec, constraint=Regex(f"[{letters}]{{4}}"), sampler=sampler, max_new_tokens=6, n=n,
        seed=11, **sampling)
    counts = _pair_counts(out.choices, vocab)
    allowed = {target.tokenizer.encode(c)[0] for c in letters}
    prompt = target.tokenizer.encode("abcab")
    exact = _penalized_masked_pair(target, prompt, SamplingParams(**sampling), allowed, vocab).flatten()
    assert chi2_pvalue(counts, exact) > 1e-3
    plain = _penalized_masked_pair(target, prompt, SamplingParams(temperature=1.0), allowed, vocab).flatten()
    assert chi2_pvalue(counts, plain) < 1e-6, "the test must tell penalties from none"
    assert out.stats.extra["tokens_accepted"] > 0
    target.cache.check_integrity()
    assert target.cache.num_open_handles == 0
