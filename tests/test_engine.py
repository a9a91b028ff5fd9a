"""The engine on the mock backend: exact greedy / sampled distributions, stops, n, streaming, batching."""

import math

import pytest
import torch

from decodekit import LLM, SamplingParams
from decodekit.backends.mock import MockBackend


def make_llm(vocab=16, seed=0, cache_tokens=512, **kw):
    return LLM(backend=MockBackend(vocab_size=vocab, seed=seed, cache_tokens=cache_tokens, **kw))


def greedy_reference(backend, ids, steps, eos=0):
    ids, out = list(ids), []
    for _ in range(steps):
        tok = int(backend.exact_logits(ids).argmax())
        if tok == eos:
            break
        out.append(tok)
        ids.append(tok)
    return out


def test_greedy_equals_reference_and_batch_equals_single():
    llm = make_llm()
    prompts = ["abc", "hello", "k", "bead"]
    batch = llm.generate(prompts, max_new_tokens=20, temperature=0)
    for prompt, c in zip(prompts, batch):
        ref = greedy_reference(llm.backend, llm.tokenizer.encode(prompt), 20)
        assert list(c.token_ids) == ref
        assert llm.generate(prompt, max_new_tokens=20, temperature=0).token_ids == c.token_ids
    llm.backend.cache.check_integrity()
    assert llm.backend.cache.num_open_handles == 0


def test_first_token_distribution_is_exact():
    llm = make_llm(cache_tokens=8192)
    ids = llm.tokenizer.encode("cab")
    exact = torch.softmax(llm.backend.exact_logits(ids) / 0.8, -1)
    c = llm.generate("cab", n=4000, max_new_tokens=1, temperature=0.8, seed=1, ignore_eos=True)
    counts = torch.bincount(torch.tensor([ch.token_ids[0] for ch in c.choices]), minlength=16).float()
    keep = exact * 4000 >= 5
    chi2 = float((((counts[keep] - exact[keep] * 4000) ** 2) / (exact[keep] * 4000)).sum())
    assert chi2 < 37.7  # chi-square with <= 15 dof at p = 0.001


def test_two_token_sequences_are_exact_through_the_cache():
    """Joint distribution of two tokens: the second depends on the first through the cached K/V."""
    llm = make_llm(vocab=6, cache_tokens=8192)
    ids = llm.tokenizer.encode("ab")
    p1 = torch.softmax(llm.backend.exact_logits(ids), -1)
    joint = torch.stack([p1[a] * torch.softmax(llm.backend.exact_logits(ids + [a]), -1) for a in range(6)])
    c = llm.generate("ab", n=3000, max_new_tokens=2, temperature=1.0, seed=3, ignore_eos=True)
    counts = torch.zeros(6, 6)
    for ch in c.choices:
        counts[ch.token_ids[0], ch.token_ids[1]] += 1
    tv = 0.5 * float((counts / 3000 - joint).abs().sum())
    assert tv < 0.05


def test_seed_reproducible_and_n_samples_share_the_prompt():
    llm = make_llm()
    a = llm.generate("hello", n=3, max_new_tokens=8, temperature=1.0, seed=5)
    b = llm.generate("hello", n=3, max_new_tokens=8, temperature=1.0, seed=5)
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    assert len({c.token_ids for c in a.choices}) > 1
    assert a.usage.completion_tokens == sum(len(c.token_ids) for c in a.choices)
    assert a.stats.prefill_tokens_computed == 5  # the prompt was computed once for all three samples


def test_stop_strings_stop_tokens_and_length():
    llm = make_llm()
    free = llm.generate("abc", max_new_tokens=30, temperature=0, ignore_eos=True).text
    stop = free[3:5]
    c = llm.generate("abc", max_new_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    assert c.finish_reason == "stop" and c.text == free[: free.find(stop)] and stop not in c.text
    tok = llm.tokenizer.encode(free[2])[0]
    c = llm.generate("abc", max_new_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[tok])
    assert c.finish_reason == "stop" and c.text == free[:2]
    c = llm.generate("abc", max_new_tokens=4, temperature=0, ignore_eos=True)
    assert c.finish_reason == "length" and len(c.token_ids) == 4


def test_eos_finishes_with_stop():
    eos_after_two = MockBackend(vocab_size=8, logits_fn=lambda ctx: torch.tensor(
        [10.0 if len(ctx) >= 4 else -10.0] + [0.0] * 7))
    c = LLM(backend=eos_after_two).generate("ab", max_new_tokens=10, temperature=0)
    assert c.finish_reason == "stop" and len(c.token_ids) == 2 and 0 not in c.token_ids


def test_streaming_text_equals_final_text():
    llm = make_llm()
    full = llm.generate("bad", max_new_tokens=25, temperature=0.9, seed=11, stop=["xyz"])
    events = list(llm.stream("bad", max_new_tokens=25, temperature=0.9, seed=11, stop=["xyz"]))
    assert "".join(e.text for e in events) == full.text
    assert events[-1].finish_reason == full.finish_reason
    assert sum(len(e.token_ids) for e in events) == len(full.token_ids)


def test_logprobs_are_the_model_log_softmax():
    llm = make_llm()
    c = llm.generate("ace", max_new_tokens=5, temperature=0.7, seed=2, logprobs=3, ignore_eos=True)
    ids = llm.tokenizer.encode("ace")
    for info in c.choices[0].logprobs:
        logp = torch.log_softmax(llm.backend.exact_logits(ids), -1)
        assert info.logprob == pytest.approx(float(logp[info.token_id]), abs=1e-5)
        assert [t.token_id for t in info.top] == torch.topk(logp, 3).indices.tolist()
        ids.append(info.token_id)


def test_continuous_batching_admits_between_steps_and_shares_forwards():
    llm = make_llm()
    engine = llm.engine
    first = engine.add_request(llm.tokenizer.encode("abc"), SamplingParams(max_new_tokens=10, temperature=0,
                                                                           ignore_eos=True))
    engine.step()
    engine.step()
    second = engine.add_request(llm.tokenizer.encode("def"), SamplingParams(max_new_tokens=10, temperature=0,
                                                                            ignore_eos=True))
    calls = llm.backend.num_forward_calls
    engine.step()  # prefill of the second + decode of the first, in ONE forward
    engine.step()  # both decode in ONE forward
    assert llm.backend.num_forward_calls == calls + 2
    while engine.has_unfinished():
        engine.step()
    a, b = engine.pop_completion(first.request_id), engine.pop_completion(second.request_id)
    assert list(a.token_ids) == greedy_reference(llm.backend, llm.tokenizer.encode("abc"), 10, eos=-1)
    assert list(b.token_ids) == greedy_reference(llm.backend, llm.tokenizer.encode("def"), 10, eos=-1)


def test_shared_prefix_is_reused_and_abort_frees_slots():
    llm = make_llm(cache_tokens=2048)
    system = "abcdefghijklmno" * 14  # 210 tokens
    first = llm.generate(system + "a", max_new_tokens=4, temperature=0)
    second = llm.generate(system + "b", max_new_tokens=4, temperature=0)
    assert first.stats.cached_prompt_tokens == 0
    assert second.stats.prefill_tokens_computed <= 0.1 * len(system)
    events = llm.stream("kkkk", max_new_tokens=50, temperature=1.0, seed=0, ignore_eos=True)
    next(events)
    events.close()  # client gone: the request is aborted
    assert llm.backend.cache.num_open_handles == 0
    assert llm.backend.cache.pool.num_used == llm.backend.cache.tree.num_cached_tokens  # only the cache holds slots
    llm.backend.cache.check_integrity()


def test_same_prefix_batch_computes_the_prefix_once():
    llm = make_llm(cache_tokens=4096)
    system = "abcdefghijklmno" * 14
    cs = llm.generate([system + x for x in "abcdefgh"], max_new_tokens=3, temperature=0)
    computed = sum(c.stats.prefill_tokens_computed for c in cs)
    assert computed <= len(system) + 8 * 2


@pytest.mark.parametrize(
    "call, match",
    [(lambda llm: llm.generate("", max_new_tokens=3), "prompt is empty"),
     (lambda llm: llm.generate("abc", temperature=-1), "temperature"),
     (lambda llm: llm.generate("abc", top_p=0), "top_p"),
     (lambda llm: llm.generate("abc", bogus=1), "bogus"),
     (lambda llm: llm.generate("a" * 300), "context"),
     (lambda llm: llm.generate("abc", max_new_tokens=10_000), "cache budget"),
     (lambda llm: llm.generate([{"role": "user"}]), "content"),
     (lambda llm: llm.generate("abc", strategy="nope"), "unknown strategy")],
)
def test_bad_input_raises_value_error(call, match):
    llm = make_llm(max_context=256)
    with pytest.raises(ValueError, match=match):
        call(llm)
    assert llm.generate("abc", max_new_tokens=2).usage.completion_tokens >= 1  # still serving
    llm.backend.cache.check_integrity()


def test_unknown_model_is_a_value_error():
    with pytest.raises(ValueError, match="unknown model"):
        LLM("no-such-model")


def test_entropy_of_uniform_mock_is_log2_v():
    flat = MockBackend(vocab_size=8, logits_fn=lambda ctx: torch.zeros(8))
    c = LLM(backend=flat).generate("ab", max_new_tokens=1, logprobs=1, temperature=1.0, seed=0, ignore_eos=True)
    assert c.choices[0].logprobs[0].logprob == pytest.approx(-math.log(8), abs=1e-6)


def test_abort_mid_run_leaves_other_requests_running():
    llm = make_llm()
    engine = llm.engine
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    keep = engine.add_request(llm.tokenizer.encode("abc"), params)
    gone = engine.add_request(llm.tokenizer.encode("dfe"), params)
    engine.step()
    engine.step()
    engine.abort(gone.request_id)
    assert all(s.request is keep for s in engine.running)
    while engine.has_unfinished():
        engine.step()
    done = engine.pop_completion(keep.request_id)
    assert list(done.token_ids) == greedy_reference(llm.backend, llm.tokenizer.encode("abc"), 12, eos=-1)
    assert llm.backend.cache.num_open_handles == 0
    llm.backend.cache.check_integrity()


def test_constraint_keyword_maps_to_the_constrained_strategy():
    from decodekit import Regex

    llm = make_llm()
    c = llm.generate("abc", constraint=Regex("[a-e]{3}"), max_new_tokens=6, temperature=1.0, seed=0)
    assert c.finish_reason in ("stop", "length") and len(c.text) == 3 and set(c.text) <= set("abcde")
    same = llm.generate("abc", constraint=Regex("[a-e]{3}"), strategy="sample", max_new_tokens=6, temperature=1.0,
                        seed=0)  # plain sampling under a constraint is constrained decoding
    assert same.token_ids == c.token_ids
    with pytest.raises(ValueError, match="not both"):
        llm.generate("abc", constraint=Regex("a"), strategy="constrained")
    with pytest.raises(ValueError, match="constraint="):
        llm.generate("abc", particles=3)


def test_final_only_output_is_cut_after_the_stop_string_token():
    """vLLM final-only outputs: when decodekit's decode finds a stop string vLLM's detokenizer did not,
    the tokens after the one completing it are dropped, as a delta-by-delta run would have stopped."""
    from types import SimpleNamespace

    from decodekit.integrations.vllm.engine import _cut_at_stop
    from decodekit.output import TextState

    tok = MockBackend(vocab_size=16).tokenizer
    params = SamplingParams(stop=("cd",))
    request = SimpleNamespace(tokenizer=tok, params=params)
    sample = SimpleNamespace(request=request, output_ids=tok.encode("abcdefab"), logprobs=list(range(8)),
                             text=TextState(tok, params.stop))
    assert sample.text.update(sample.output_ids)
    _cut_at_stop(sample)
    assert tok.decode(sample.output_ids) == "abcd" and sample.logprobs == [0, 1, 2, 3]


def test_backend_cost_counter_and_prefix_cache_reset():
    backend = MockBackend(vocab_size=16, seed=0, cache_tokens=512)
    llm = LLM(backend=backend)
    llm.generate("abcabc", max_new_tokens=4, temperature=0, ignore_eos=True)
    assert backend.computed_tokens() == 6 + 3  # prompt + decode tokens (the last one needs no forward)
    again = llm.generate("abcabc", max_new_tokens=4, temperature=0, ignore_eos=True)
    assert again.stats.cached_prompt_tokens > 0
    backend.reset_prefix_cache()
    cold = llm.generate("abcabc", max_new_tokens=4, temperature=0, ignore_eos=True)
    assert cold.stats.cached_prompt_tokens == 0
    backend.cache.check_integrity()


def test_a_failing_strategy_aborts_only_its_requests_and_the_engine_goes_on(exploding):
    from decodekit.engine import StepError

    backend = MockBackend(vocab_size=16, seed=0, cache_tokens=512)
    llm = LLM(backend=backend)
    engine = llm.engine
    greedy = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    good = engine.add_request(llm.tokenizer.encode("abc"), greedy)
    bad = engine.add_request(llm.tokenizer.encode("abd"), SamplingParams(max_new_tokens=6), exploding)
    engine.step()  # the prefill: strategies step from the next one on
    with pytest.raises(StepError, match="boom") as info:
        engine.step()
    assert info.value.request_ids == [bad.request_id] and bad.request_id not in engine.requests
    assert {e.request_id for e in info.value.events} == {good.request_id}  # the good row still advanced
    while engine.has_unfinished():
        engine.step()
    assert len(engine.pop_completion(good.request_id).token_ids) == 6
    backend.cache.check_integrity()
    with pytest.raises(StepError):
        llm.generate("abc", strategy=exploding, max_new_tokens=4)
    assert not engine.requests and not engine.running  # nothing of the failed call is left behind
    assert llm.generate("abc", max_new_tokens=4, temperature=0, ignore_eos=True).usage.completion_tokens == 4
    backend.cache.check_integrity()


def test_a_bad_prompt_in_a_batch_leaves_no_request_queued():
    llm = LLM(backend=MockBackend(vocab_size=16, seed=0, cache_tokens=512))
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["abc", ""], max_new_tokens=4)
    assert not llm.engine.requests and not llm.engine.has_unfinished()
