"""The example strategy (``strategies/best_of.py``): one file and one registry entry, exact against
a no-cache recomputation, and correct under preemption with no clean-up code of its own."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_caches_clean

from decodekit import LLM
from decodekit.backends.mock import MockBackend
from decodekit.strategies import BestOfN, Strategy, by_name, entry
from decodekit.types import SamplingParams

PARAMS = dict(temperature=1.0, max_new_tokens=12, seed=3, ignore_eos=False)


def _mean_logp(backend, prompt, tokens) -> float:
    logps = [float(torch.log_softmax(backend.exact_logits(prompt + tokens[:j]), -1)[t]) for j, t in enumerate(tokens)]
    return sum(logps) / len(logps)


def test_registered_with_no_clean_up_code():
    assert isinstance(by_name("best_of", num_candidates=3), BestOfN)
    assert entry("best_of").constraint == "no"
    assert BestOfN.on_finish is Strategy.on_finish and BestOfN.on_preempt is Strategy.on_preempt
    with pytest.raises(ValueError, match="num_candidates"):
        BestOfN(0)


def test_one_candidate_greedy_equals_plain_greedy():
    llm = LLM(backend=MockBackend(vocab_size=16, seed=1, cache_tokens=1024))
    plain = llm.generate(["abc", "hello"], temperature=0, max_new_tokens=10)
    best = llm.generate(["abc", "hello"], strategy=BestOfN(1), temperature=0, max_new_tokens=10)
    assert [c.token_ids for c in plain] == [c.token_ids for c in best]
    assert_caches_clean(llm.backend)


def test_answer_has_the_best_mean_logprob_recomputed_without_cache():
    backend = MockBackend(vocab_size=16, seed=2, cache_tokens=2048)
    llm = LLM(backend=backend)
    prompt = backend.tokenizer.encode("abcd")
    done = llm.generate("abcd", strategy=BestOfN(4), **PARAMS)
    means = done.stats.extra["mean_logprobs"][0]
    out = list(done.token_ids)
    assert _mean_logp(backend, prompt, out) == pytest.approx(max(means), abs=1e-4)
    assert len(set(means)) > 1  # the candidates differ, so the choice means something
    assert_caches_clean(backend)


def test_preempted_run_equals_unpreempted():
    def run(cache_tokens):
        backend = MockBackend(vocab_size=16, seed=2, cache_tokens=cache_tokens)
        llm = LLM(backend=backend, max_batch_size=8)
        done = llm.generate(["abcd", "hello", "gonk", "abcabc"], strategy=BestOfN(3),
                            **{**PARAMS, "max_new_tokens": 20})
        assert_caches_clean(backend)
        return [c.token_ids for c in done], llm.engine.stats()["preemptions"]

    roomy, none = run(4096)
    tight, preemptions = run(150)
    assert none == 0 and preemptions > 0
    assert tight == roomy


def test_sampling_params_validation_still_applies():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_a_backend_with_few_lanes_admits_by_lanes_and_outputs_do_not_change():
    """A backend with few KV lanes (llama.cpp's sequence ids: ``max_lanes``) admits requests by the lanes
    their strategy may hold (main KV + candidates), so requests wait rather than run out mid-step."""
    def run(max_lanes):
        backend = MockBackend(vocab_size=16, seed=2, cache_tokens=4096)
        if max_lanes is not None:
            backend.max_lanes = max_lanes
        llm = LLM(backend=backend, max_batch_size=8)
        engine, peak = llm.engine, [0]
        step = engine.step

        def counting_step():
            events = step()
            peak[0] = max(peak[0], len(backend.cache._handles))
            return events

        engine.step = counting_step
        done = llm.generate(["abcd", "hello", "gonk", "abcabc"], strategy=BestOfN(3), **PARAMS)
        assert_caches_clean(backend)
        return [c.token_ids for c in done], peak[0]

    free, free_peak = run(None)
    limited, limited_peak = run(9)  # 4 lanes per request (main + 3 candidates): two requests at a time
    assert limited == free
    assert free_peak > 9 >= limited_peak
    assert BestOfN(3).lanes_per_sequence(None) == 4
