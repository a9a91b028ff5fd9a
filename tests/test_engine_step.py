"""One engine step for every strategy: one main-model forward per step over mixed strategies,
each request's output equal to running it alone; the batched sampler; admission on need,
preemption with recompute and chunked prefill (outputs identical to an unconstrained run)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_speculative import chi2_pvalue

from decodekit import LLM, Constrained, SamplingParams, Speculative
from decodekit.backends.mock import MockBackend
from decodekit.constraints import Regex
from decodekit.engine import Engine
from decodekit.sampling import sample_batch, sample_token


def mock(cache_tokens=4096, **kw):
    return MockBackend(vocab_size=16, seed=0, cache_tokens=cache_tokens, **kw)


def mixed_requests():
    """(prompt, params, strategy factory): plain greedy / seeded, speculative (greedy), constrained
    AWRS and masked, SMC; each constrained request with its own strategy instance."""
    return [
        ("abc", SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True), lambda: None),
        ("hello", SamplingParams(max_new_tokens=12, temperature=0.8, seed=3, ignore_eos=True), lambda: None),
        ("bead", SamplingParams(max_new_tokens=12, temperature=1.0, top_k=5, seed=4, n=2), lambda: None),
        ("abcabcab", SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True), lambda: Speculative()),
        ("kab", SamplingParams(max_new_tokens=10, temperature=0.9, seed=5), lambda: Constrained(Regex("[a-e]{3,8}"))),
        ("dab", SamplingParams(max_new_tokens=10, temperature=1.0, seed=6),
         lambda: Constrained(Regex("(ab|cd)+e"), sampler="masked")),
        ("fab", SamplingParams(max_new_tokens=8, temperature=1.0, seed=7),
         lambda: Constrained(Regex("[a-c]{2,5}"), num_particles=4)),
    ]


def run_alone(prompt, params, strategy):
    llm = LLM(backend=mock())
    return llm.generate(prompt, strategy=strategy, **params.__dict__)


def run_engine(engine, jobs, check=None):
    requests = [engine.add_request(engine.tokenizer.encode(p), params, make()) for p, params, make in jobs]
    while engine.has_unfinished():
        engine.step()
        if check is not None:
            check(engine)
    return [engine.pop_completion(r.request_id) for r in requests]


def outputs(completions):
    return [[c.token_ids for c in comp.choices] for comp in completions]


def test_mixed_strategies_share_one_forward_per_step_and_match_running_alone():
    backend = mock()
    engine = Engine(backend)
    jobs = mixed_requests()
    forwards = []

    def one_forward(engine):
        forwards.append(engine.stats()["main_forwards"])
        backend.cache.check_integrity()

    together = run_engine(engine, jobs, one_forward)
    steps = [b - a for a, b in zip([0, *forwards], forwards)]
    assert max(steps) == 1, steps  # one forward of the main model per step, whatever the mix
    for (prompt, params, make), comp in zip(jobs, together):
        alone = run_alone(prompt, params, make())
        assert [c.token_ids for c in comp.choices] == [c.token_ids for c in alone.choices], prompt
        assert [c.finish_reason for c in comp.choices] == [c.finish_reason for c in alone.choices]
    assert backend.cache.num_open_handles == 0


def test_mixed_step_runs_fewer_forwards_than_strategy_groups():
    """Eight requests that each carry their own constraint instance cost one forward per step, not eight."""
    backend = mock()
    engine = Engine(backend)
    params = SamplingParams(max_new_tokens=6, temperature=0.7, seed=1)
    prompts = ["ab", "bc", "cd", "de", "ef", "fg", "gh", "ha"]
    jobs = [(p, params, lambda: Constrained(Regex("[a-h]{6}"))) for p in prompts]
    run_engine(engine, jobs)
    stats = engine.stats()
    assert stats["main_forwards"] <= stats["steps"] and stats["peak_running"] == 8


def test_batched_sampler_rows_equal_single_rows():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=1.2, top_p=0.8), SamplingParams(temperature=1.0, min_p=0.1),
              SamplingParams(temperature=0.5, top_k=10, top_p=0.9, min_p=0.05), SamplingParams(temperature=1.0)]
    for seed in range(20):
        batch = sample_batch(logits, params, [torch.Generator().manual_seed(seed + i) for i in range(6)])
        single = [sample_token(logits[i], params[i], torch.Generator().manual_seed(seed + i)) for i in range(6)]
        assert batch == single


def test_batched_sampler_is_exact():
    """Chi-square: the inverse-CDF draw follows the processed distribution (top-k + temperature)."""
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=0.8, top_k=6)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(12)
    for _ in range(6000):
        counts[sample_batch(logits, [params], [gen])[0]] += 1
    kth = logits[0].topk(6).values[-1]
    p = (logits[0] / 0.8).masked_fill(logits[0] < kth, float("-inf")).softmax(-1)
    keep = p > 0
    assert counts[~keep].sum() == 0
    assert chi2_pvalue(counts[keep], p[keep]) > 1e-3


@pytest.mark.parametrize("cache_tokens", [48, 64, 96])
def test_preemption_in_a_tiny_pool_gives_identical_outputs(cache_tokens):
    """Admission on need overcommits a tiny pool; preempted requests recompute through the prefix
    cache and finish with exactly the tokens of a run in a big pool; integrity holds every step."""
    jobs = [(p, SamplingParams(max_new_tokens=24, temperature=t, seed=i, ignore_eos=True), make)
            for i, (p, t, make) in enumerate([("abc", 0, lambda: None), ("hello", 0.9, lambda: None),
                                               ("bead", 1.0, lambda: None), ("abcabc", 0, lambda: Speculative()),
                                               ("kab", 1.0, lambda: None), ("fab", 0.7, lambda: None)])]
    big = run_engine(Engine(mock()), jobs)
    small_backend = mock(cache_tokens)
    engine = Engine(small_backend)
    small = run_engine(engine, jobs, lambda e: small_backend.cache.check_integrity())
    assert outputs(small) == outputs(big)
    assert engine.stats()["preemptions"] > 0
    assert small_backend.cache.num_open_handles == 0


def test_preempted_smc_and_constrained_requests_finish_identically():
    jobs = [(p, SamplingParams(max_new_tokens=10, temperature=1.0, seed=i), make)
            for i, (p, make) in enumerate([("ab", lambda: Constrained(Regex("[a-d]{6,9}"), num_particles=3)),
                                           ("cd", lambda: Constrained(Regex("[a-d]{6,9}"))),
                                           ("ef", lambda: None), ("gh", lambda: None)])]
    big = run_engine(Engine(mock()), jobs)
    small_backend = mock(40)
    engine = Engine(small_backend)
    small = run_engine(engine, jobs, lambda e: small_backend.cache.check_integrity())
    assert outputs(small) == outputs(big)
    assert engine.stats()["preemptions"] > 0


def test_admission_on_need_runs_every_request_at_once():
    """16 requests with max_new_tokens far beyond what fits at worst all run together when their
    answers are short (the old up-front reservation ran a few at a time)."""
    backend = mock(cache_tokens=1024)
    engine = Engine(backend)
    params = SamplingParams(max_new_tokens=900, temperature=0, stop_token_ids=(1, 2, 3, 4, 5, 6, 7, 8, 9))
    requests = [engine.add_request(backend.tokenizer.encode(p), params) for p in ["abc"] * 8 + ["bcd"] * 8]
    while engine.has_unfinished():
        engine.step()
    assert engine.stats()["peak_running"] == 16
    assert all(engine.pop_completion(r.request_id).choices[0].finish_reason == "stop" for r in requests)


def test_chunked_prefill_interleaves_with_decoding():
    backend = mock()
    engine = Engine(backend, max_prefill_tokens=4)
    short = engine.add_request(backend.tokenizer.encode("ab"), SamplingParams(max_new_tokens=12, temperature=0,
                                                                                ignore_eos=True))
    engine.step()  # prefill of the short prompt
    long_ids = backend.tokenizer.encode("abcdefghijklmno" * 3)
    long = engine.add_request(long_ids, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
    decoded = []
    for _ in range(6):  # the long prompt takes 12 steps of 4 tokens; the short one decodes in every one
        events = engine.step()
        decoded.append(sum(len(e.token_ids) for e in events if e.request_id == short.request_id))
        assert engine.stats()["main_forwards"] <= engine.stats()["steps"]
    assert decoded == [1] * 6
    while engine.has_unfinished():
        engine.step()
    alone = LLM(backend=mock()).generate("abcdefghijklmno" * 3, max_new_tokens=4, temperature=0,
                                         ignore_eos=True)
    assert engine.pop_completion(long.request_id).token_ids == alone.token_ids
    assert len(engine.pop_completion(short.request_id).token_ids) == 12


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cache_tokens=st.integers(30, 120), prefill=st.integers(1, 8),
       plan=st.lists(st.tuples(st.sampled_from(["ab", "abc", "bca", "cab", "kk"]), st.integers(1, 12),
                               st.sampled_from([0.0, 1.0]), st.integers(1, 2)), min_size=1, max_size=6),
       abort_at=st.integers(0, 30))
def test_engine_state_machine_with_forks_preemption_and_aborts(cache_tokens, prefill, plan, abort_at):
    """Random request mixes (n forks, greedy / seeded) in small pools with chunked prefill: cache
    integrity after every step, every handle released at the end, and outputs of requests not aborted
    equal to a big-pool run."""
    jobs = [(p, SamplingParams(max_new_tokens=m, temperature=t, n=n, seed=i, ignore_eos=True), lambda: None)
            for i, (p, m, t, n) in enumerate(plan)]
    big = outputs(run_engine(Engine(mock()), jobs))
    backend = mock(cache_tokens)
    engine = Engine(backend, max_prefill_tokens=prefill)
    requests = [engine.add_request(backend.tokenizer.encode(p), params) for p, params, _ in jobs]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        backend.cache.check_integrity()
        steps += 1
        if steps == abort_at:
            engine.abort(requests[0].request_id)
    assert backend.cache.num_open_handles == 0
    for i, request in enumerate(requests):
        if request.request_id in engine.requests:
            comp = engine.pop_completion(request.request_id)
            assert [c.token_ids for c in comp.choices] == big[i]
