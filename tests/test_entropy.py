"""Entropy-adaptive switching: the pure rule, exact limits, catch-up correctness, provenance, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import assert_caches_clean, tiny_llama

from decodekit.api import LLM
from decodekit.backends.hf import HFBackend
from decodekit.backends.mock import MockBackend, MockTokenizer
from decodekit.sampling import entropy_bits
from decodekit.strategies import by_name
from decodekit.strategies.entropy import (
    LARGE,
    SMALL,
    EntropySwitch,
    check_same_tokenizer,
    choose_model,
    param_weighted_cost,
    rolling_mean,
)

PROMPTS = ["abc", "hello", "gonk", "needle"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


class Recording(EntropySwitch):
    """Logs (context, writer, logits) of every proposed token."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = []

    def update(self, engine, seqs, rows):
        before = {s.seq_id: list(s.ids) for s in seqs}
        out = super().update(engine, seqs, rows)
        for s in seqs:
            for i, p in enumerate(out.get(s.seq_id, [])):
                self.log.append((before[s.seq_id] + [q.token_id for q in out[s.seq_id][:i]], p.provenance.source,
                                 p.logits))
        return out


def mock_pair():
    large = MockBackend(16, seed=1, name="mock-large", num_params=1000, cache_tokens=2048)
    small = MockBackend(16, seed=2, name="mock-small", num_params=100, cache_tokens=2048)
    return small, large


def tiny_pair():
    """Two random Llamas sharing a 69-token vocabulary; heads scaled so entropies vary per position."""
    models = []
    for seed, layers in ((3, 2), (4, 1)):
        model = tiny_llama(seed, vocab_size=69, num_hidden_layers=layers)
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)
        models.append(model)
    large = HFBackend(models[0], MockTokenizer(69), name="tiny-large", cache_tokens=1024)
    small = HFBackend(models[1], MockTokenizer(69), name="tiny-small", cache_tokens=1024)
    return small, large


def greedy(backend, prompt, n):
    return LLM(backend=backend).generate(prompt, temperature=0, max_new_tokens=n, ignore_eos=True).token_ids


def no_cache_logits(backend, ids):
    if isinstance(backend, MockBackend):
        return backend.exact_logits(ids)
    with torch.no_grad():
        return backend.model(input_ids=torch.tensor([ids], device=backend.model.device)).logits[0, -1].float()


# ---- pure pieces -----------------------------------------------------------------------------
def test_entropy_bits_on_known_distributions():
    assert float(entropy_bits(torch.zeros(8))) == pytest.approx(3.0, abs=1e-6)
    assert float(entropy_bits(torch.tensor([0.0, -math.inf, -math.inf]))) == pytest.approx(0.0, abs=1e-7)
    assert float(entropy_bits(torch.tensor([0.5, 0.25, 0.25]).log())) == pytest.approx(1.5, abs=1e-6)
    # shifting logits does not change the distribution; batched rows are independent
    rows = torch.tensor([[1.0, 1.0], [0.0, math.log(3.0)]]) + 7.0
    h = entropy_bits(rows)
    p = 0.25
    assert h.tolist() == pytest.approx([1.0, -(p * math.log2(p) + (1 - p) * math.log2(1 - p))], abs=1e-6)


def test_rolling_mean_and_rule():
    assert rolling_mean([], 3) == 0.0
    assert rolling_mean([4.0, 1.0, 2.0, 3.0], 3) == pytest.approx(2.0)
    assert rolling_mean([4.0], 3) == pytest.approx(4.0)
    rule = dict(threshold=2.0, min_dwell=3)
    assert choose_model(active=SMALL, mean_entropy=2.0, since_switch=3, **rule) == LARGE  # >= threshold
    assert choose_model(active=LARGE, mean_entropy=1.99, since_switch=3, **rule) == SMALL
    assert choose_model(active=LARGE, mean_entropy=0.1, since_switch=2, **rule) == LARGE  # dwell holds it
    assert choose_model(active=SMALL, mean_entropy=0.0, since_switch=9, threshold=0.0, min_dwell=1) == LARGE
    assert choose_model(active=LARGE, mean_entropy=1e30, since_switch=9, threshold=math.inf, min_dwell=1) == SMALL


def test_param_weighted_cost():
    assert param_weighted_cost(6, 4, 100, 1000) == pytest.approx((600 + 4000) / 10000)
    assert param_weighted_cost(0, 5, 1, 10) == 1.0
    assert param_weighted_cost(0, 0, 1, 10) == 0.0


@pytest.mark.parametrize("kwargs", [dict(threshold=-1.0), dict(threshold=float("nan")), dict(window=0),
                                    dict(min_dwell=0), dict(window=2.5)])
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        EntropySwitch(**kwargs)


# ---- exact limits ----------------------------------------------------------------------------
@pytest.mark.parametrize("pair", [mock_pair, tiny_pair])
@pytest.mark.parametrize("main", [LARGE, SMALL])
def test_threshold_limits_are_the_two_models(pair, main):
    small, large = pair()
    for prompt in PROMPTS[:2]:
        want_large, want_small = greedy(large, prompt, 24), greedy(small, prompt, 24)
        assert want_large != want_small  # otherwise the test proves nothing
        for tau, want, share in ((0.0, want_large, 1.0), (math.inf, want_small, 0.0)):
            if main == LARGE:
                llm, st = LLM(backend=large), EntropySwitch(small=small, threshold=tau, min_dwell=1)
            else:
                llm, st = LLM(backend=small), EntropySwitch(large=large, threshold=tau, min_dwell=1)
            c = llm.generate(prompt, strategy=st, temperature=0, max_new_tokens=24, ignore_eos=True)
            assert c.token_ids == want
            assert c.stats.extra["large_share"] == share


# ---- catch-up through each model's own cache -------------------------------------------------
@pytest.mark.parametrize("pair,tau", [(mock_pair, 2.3), (tiny_pair, None)])
def test_active_logits_match_a_no_cache_forward(pair, tau):
    small, large = pair()
    if tau is None:  # the median entropy of the large model's own greedy run: forces switches both ways
        c = LLM(backend=large).generate("abc", temperature=0, max_new_tokens=30, ignore_eos=True)
        tau = float(torch.tensor([float(entropy_bits(no_cache_logits(large, list(c.prompt_token_ids) + list(
            c.token_ids[:i])))) for i in range(30)]).median())
    st = Recording(small=small, threshold=tau, window=2, min_dwell=2)
    llm = LLM(backend=large)
    outs = llm.generate(PROMPTS, strategy=st, temperature=0, max_new_tokens=30, ignore_eos=True)
    assert sum(o.stats.extra["num_switches"] for o in outs) >= 4
    worst = 0.0
    for ids, writer, logits in st.log:
        ref = no_cache_logits(small if writer == SMALL else large, ids)
        worst = max(worst, float((logits - ref.to(logits.device)).abs().max()))
    assert worst <= 1e-4
    assert {w for _, w, _ in st.log} == {SMALL, LARGE}
    assert_caches_clean(small, large)


def test_switched_in_model_prefills_only_unseen_tokens():
    small, large = mock_pair()
    llm = LLM(backend=large)
    prompt = "abcdefghij"
    st = EntropySwitch(small=small, threshold=math.inf)
    first = llm.generate(prompt, strategy=st, temperature=0, max_new_tokens=5, ignore_eos=True)
    # the small model prefilled the 10-token prompt once, then decoded; a second request reuses its cache
    assert first.stats.extra["forward_tokens"] == {SMALL: 10 + 4, LARGE: 0}
    second = llm.generate(prompt, strategy=st, temperature=0, max_new_tokens=5, ignore_eos=True)
    assert second.stats.extra["forward_tokens"][SMALL] <= 1 + 4
    assert second.token_ids == first.token_ids


# ---- provenance, sampling, stops, streaming --------------------------------------------------
def test_provenance_counts_sum_to_generated_length():
    small, large = mock_pair()
    llm = LLM(backend=large)
    st = EntropySwitch(small=small, threshold=2.3, window=3, min_dwell=2)
    outs = llm.generate(PROMPTS, strategy=st, temperature=1.0, seed=5, n=3, max_new_tokens=40)
    assert any(len(c.token_ids) < 40 for o in outs for c in o.choices)  # some hit EOS
    for o in outs:
        extra = o.stats.extra
        assert [len(p) for p in extra["provenance"]] == [len(c.token_ids) for c in o.choices]
        assert sum(extra["tokens_by_model"].values()) == o.usage.completion_tokens
        n_large = sum(p.count("L") for p in extra["provenance"])
        assert extra["large_share"] == pytest.approx(n_large / o.usage.completion_tokens)
        assert extra["cost_param_weighted"] == pytest.approx(
            param_weighted_cost(o.usage.completion_tokens - n_large, n_large, 100, 1000))
    assert 0.0 < sum(o.stats.extra["large_share"] for o in outs) / len(outs) < 1.0
    small.cache.check_integrity()
    assert small.cache.num_open_handles == 0 and large.cache.num_open_handles == 0


def test_seeded_sampling_stops_and_streaming():
    small, large = mock_pair()
    llm = LLM(backend=large)
    st = EntropySwitch(small=small, threshold=2.3, window=2, min_dwell=1)
    a = llm.generate("abc", strategy=st, temperature=0.8, top_k=5, seed=11, max_new_tokens=30, ignore_eos=True)
    b = llm.generate("abc", strategy=st, temperature=0.8, top_k=5, seed=11, max_new_tokens=30, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.stats.extra["provenance"] == b.stats.extra["provenance"]
    streamed = "".join(e.text for e in llm.stream("abc", strategy=st, temperature=0.8, top_k=5, seed=11,
                                                  max_new_tokens=30, ignore_eos=True))
    assert streamed == a.text
    stop = a.text[5:7]
    c = llm.generate("abc", strategy=st, temperature=0.8, top_k=5, seed=11, max_new_tokens=30, ignore_eos=True,
                     stop=stop)
    assert c.finish_reason == "stop" and stop not in c.text and a.text.startswith(c.text)
    assert len(c.stats.extra["provenance"][0]) == len(c.token_ids)


# ---- set-up errors ---------------------------------------------------------------------------
def test_tokenizer_mismatch_raises():
    large = MockBackend(16, seed=1, name="a")
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(backend=large).generate("abc", strategy=EntropySwitch(small=MockBackend(17, seed=1, name="b")))
    other = MockBackend(16, seed=2, name="c")
    other.tokenizer.pieces[3] = "#"  # same size, one different token
    with pytest.raises(ValueError, match="vocabularies differ"):
        check_same_tokenizer(large, other)
    other.tokenizer = MockTokenizer(16)
    other.tokenizer.eos_token_ids = frozenset([1])
    with pytest.raises(ValueError, match="EOS"):
        check_same_tokenizer(large, other)


def test_setup_errors(monkeypatch, tmp_path):
    small, large = mock_pair()
    with pytest.raises(ValueError, match="both the engine's model"):
        LLM(backend=large).generate("abc", strategy=EntropySwitch(small=large, large="mock-large"))
    with pytest.raises(ValueError, match="must be the engine's model"):
        LLM(backend=large).generate("abc", strategy=EntropySwitch(small=small, large=MockBackend(16, name="x")))
    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="decodekit distill"):
        LLM(backend=MockBackend(16, name="smollm2-135m:float32")).generate("abc", strategy="entropy")
    st = EntropySwitch(small=small)
    LLM(backend=large).generate("abc", strategy=st, max_new_tokens=2)
    with pytest.raises(ValueError, match="one engine"):
        LLM(backend=large).generate("abc", strategy=st, max_new_tokens=2)
    assert isinstance(by_name("entropy", small=small, threshold=1.5), EntropySwitch)


# ---- real model: SmolLM2 with a cut (untrained) student of itself ---------------------------
@pytest.mark.real
def test_real_pair_limits_and_catch_up(smollm):
    from decodekit.training.distill import cut_student

    small = HFBackend(cut_student(smollm.model, 3), smollm.tokenizer, name="smollm-cut3", cache_tokens=2048)
    prompt = [{"role": "user", "content": "Name three colors."}]
    llm = LLM(backend=smollm)
    want = llm.generate(prompt, temperature=0, max_new_tokens=8).token_ids
    st0 = EntropySwitch(small=small, threshold=0.0)
    assert LLM(backend=smollm).generate(prompt, strategy=st0, temperature=0, max_new_tokens=8).token_ids == want
    st = Recording(small=small, threshold=1.5, window=2, min_dwell=2)
    out = LLM(backend=smollm).generate(prompt, strategy=st, temperature=0, max_new_tokens=12)
    assert sum(out.stats.extra["tokens_by_model"].values()) == len(out.token_ids)
    for ids, writer, logits in st.log[:: max(1, len(st.log) // 4)]:
        ref = no_cache_logits(small if writer == SMALL else smollm, ids)
        # float32, 30-layer model vs batched cache path
        assert float((logits - ref.to(logits.device)).abs().max()) <= 1e-3
    assert smollm.cache.num_open_handles == 0 and small.cache.num_open_handles == 0


# ---- composes with constrained decoding ------------------------------------------------------
def test_composes_with_constraints():
    from decodekit.constraints import Regex
    from decodekit.strategies.constrained import Constrained

    pattern = "[a-e]{3,8}"
    small, large = mock_pair()
    st = EntropySwitch(small=small, threshold=2.3, window=2, min_dwell=1, constraint=Regex(pattern))
    outs = LLM(backend=large).generate(PROMPTS, strategy=st, temperature=1.0, seed=4, max_new_tokens=10)
    for o in outs:
        assert re.fullmatch(pattern, o.text), o.text
        assert sum(o.stats.extra["tokens_by_model"].values()) == len(o.token_ids)
        assert o.stats.extra["constraint_checks"] > 0
    assert 0.0 < sum(o.stats.extra["large_share"] for o in outs) / len(outs) < 1.0
    # threshold 0: exactly constrained decoding on the large model alone (same seed, same draws)
    small, large = mock_pair()
    ref = LLM(backend=MockBackend(16, seed=1)).generate("abc", strategy=Constrained(Regex(pattern)), temperature=1.0,
                                                       seed=9, max_new_tokens=10)
    st0 = EntropySwitch(small=small, threshold=0.0, constraint=Regex(pattern))
    got = LLM(backend=large).generate("abc", strategy=st0, temperature=1.0, seed=9, max_new_tokens=10)
    assert got.token_ids == ref.token_ids
