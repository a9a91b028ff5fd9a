"""EntropySwitch's verified mode (speculative cascades): exact at tolerance 0, provenance, caches, the rule."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_caches_clean
from test_entropy import mock_pair, tiny_pair
from test_speculative import chi2_pvalue

from decodekit.api import LLM
from decodekit.backends.hf import HFBackend
from decodekit.backends.mock import MockBackend
from decodekit.drafting.acceptance import verify_sampled
from decodekit.drafting.cascade import close_to_top, verify_greedy_tolerant, verify_tolerant
from decodekit.sampling import probs_from_logits
from decodekit.strategies.entropy import LARGE, SMALL, EntropySwitch
from decodekit.types import SamplingParams

V = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def similar_pair(vocab: int = 16, noise: float = 0.7, cache_tokens: int = 4096):
    """A large mock and a small one whose logits are the large one's plus noise (they agree often)."""
    large = MockBackend(vocab, seed=1, name="mock-large", num_params=1000, cache_tokens=cache_tokens)
    table = torch.randn((vocab, vocab), generator=torch.Generator().manual_seed(99)) * noise
    small = MockBackend(vocab, seed=1, name="mock-small", num_params=100, cache_tokens=cache_tokens,
                        logits_fn=lambda ctx: large.logits_fn(ctx) + table[ctx[-1]])
    return small, large


def greedy(backend, prompts, n=30):
    return [o.token_ids for o in LLM(backend=backend).generate(prompts, temperature=0, max_new_tokens=n,
                                                                ignore_eos=True)]


# ---- the pure rule ------------------------------------------------------------------------------
def test_tolerance_zero_is_the_exact_rule_draw_for_draw():
    g = torch.Generator().manual_seed(0)
    p = torch.randn((4, V), generator=g).softmax(-1)
    q = torch.randn((3, V), generator=g).softmax(-1)
    for seed in range(50):
        draft = torch.multinomial(q, 1, generator=torch.Generator().manual_seed(seed)).flatten().tolist()
        a = verify_tolerant(draft=draft, p=p, q=q, tolerance=0.0, generator=torch.Generator().manual_seed(seed))
        b = verify_sampled(draft=draft, p=p, q=q, generator=torch.Generator().manual_seed(seed))
        assert a == b


def test_tolerance_keeps_tokens_close_to_the_top():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert close_to_top(probs, [1, 1], 0.5).tolist() == [True, False]
    assert close_to_top(probs, [0, 2], 0.0).tolist() == [True, True]
    logits = probs.log()
    assert verify_greedy_tolerant(draft=[1, 1], logits=torch.cat([logits, logits[:1]]), tolerance=0.0) == (0, 0)
    assert verify_greedy_tolerant(draft=[1, 1], logits=torch.cat([logits, logits[:1]]), tolerance=0.5) == (1, 2)
    assert verify_greedy_tolerant(draft=[1, 0], logits=torch.cat([logits, logits[:1]]), tolerance=1.0) == (2, 0)
    # sampled: tolerance 1 keeps every draft, whatever q
    p = torch.tensor([[0.9, 0.1, 0.0]] * 3)
    assert verify_tolerant(draft=[2, 2], p=p, q=None, tolerance=1.0, generator=torch.Generator())[0] == 2


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0", True, float("nan")])
def test_bad_verify_raises(bad):
    with pytest.raises(ValueError, match="verify"):
        EntropySwitch(verify=bad)


def test_verify_and_constraint_do_not_compose_yet():
    from decodekit.constraints import Regex

    with pytest.raises(ValueError, match="verify and constraint"):
        EntropySwitch(verify=0.0, constraint=Regex("[a-c]+"))


# ---- greedy: token for token the large model ------------------------------------------------------
@pytest.mark.parametrize("pair", [similar_pair, mock_pair, tiny_pair])
@pytest.mark.parametrize("main", [LARGE, SMALL])
@pytest.mark.parametrize("tau", [math.inf, 2.0])
def test_greedy_verified_equals_large_only(pair, main, tau):
    small, large = pair()
    prompts = ["abc", "hello", "gonk"]
    want = greedy(large, prompts)
    if main == LARGE:
        llm, st = LLM(backend=large), EntropySwitch(small=small, threshold=tau, window=2, min_dwell=1, verify=0.0)
    else:
        llm, st = LLM(backend=small), EntropySwitch(large=large, threshold=tau, window=2, min_dwell=1, verify=0.0)
    outs = llm.generate(prompts, strategy=st, temperature=0, max_new_tokens=30, ignore_eos=True)
    assert [o.token_ids for o in outs] == want
    assert sum(o.stats.extra["tokens_drafted"] for o in outs) > 0
    if pair is similar_pair:
        assert sum(o.stats.extra["tokens_kept"] for o in outs) > 0  # the small model's tokens do stand
    assert_caches_clean(small, large)


def test_greedy_verified_stops_and_length_limits():
    small, large = similar_pair()
    llm = LLM(backend=large)
    ref = llm.generate(["abc", "hello", "gonk"], temperature=0, max_new_tokens=40)
    st = EntropySwitch(small=small, threshold=math.inf, verify=0.0, max_segment=5)
    got = llm.generate(["abc", "hello", "gonk"], strategy=st, temperature=0, max_new_tokens=40)
    for a, b in zip(ref, got):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
    for n in (1, 2, 7):
        c = llm.generate("abc", strategy=st, temperature=0, max_new_tokens=n, ignore_eos=True)
        assert len(c.token_ids) == n


# ---- sampling: exactly the large model's distribution at tolerance 0 ------------------------------
def _exact_pair(backend, prompt, params):
    first = probs_from_logits(backend.exact_logits(prompt), params)
    second = torch.stack([probs_from_logits(backend.exact_logits(prompt + [a]), params) for a in range(V)])
    return (first.unsqueeze(1) * second).flatten()


@pytest.mark.parametrize("kind,tau,sampling", [
    ("similar", math.inf, dict(temperature=1.0)),
    ("unlike", math.inf, dict(temperature=0.8, top_k=5)),
    ("similar", 1.6, dict(temperature=1.2, top_p=0.9)),  # entropy decides where the small model drafts
])
def test_sampled_verified_follows_the_large_distribution(kind, tau, sampling):
    n = 2000
    small, large = similar_pair(V, cache_tokens=n * 30) if kind == "similar" else (
        MockBackend(V, seed=7, name="s", cache_tokens=n * 30), MockBackend(V, seed=0, name="l", cache_tokens=n * 30))
    st = EntropySwitch(small=small, threshold=tau, window=1, min_dwell=1, verify=0.0, max_segment=3)
    out = LLM(backend=large, max_batch_size=n).generate("abcab", strategy=st, n=n, seed=3, max_new_tokens=4,
                                                       ignore_eos=True, **sampling)
    counts = torch.zeros(V * V)
    for choice in out.choices:
        counts[choice.token_ids[0] * V + choice.token_ids[1]] += 1
    prompt = large.tokenizer.encode("abcab")
    assert chi2_pvalue(counts, _exact_pair(large, prompt, SamplingParams(**sampling))) > 1e-3
    assert out.stats.extra["tokens_kept"] > 0
    if kind == "unlike":  # the test can tell the small model's distribution apart
        assert chi2_pvalue(counts, _exact_pair(small, prompt, SamplingParams(**sampling))) < 1e-6
    assert large.cache.num_open_handles == 0 and small.cache.num_open_handles == 0


def test_lossy_tolerance_moves_towards_the_small_model():
    n = 2000
    small, large = MockBackend(V, seed=7, name="s", cache_tokens=n * 30), MockBackend(V, seed=0, cache_tokens=n * 30)
    st = EntropySwitch(small=small, threshold=math.inf, verify=0.9, max_segment=3)
    out = LLM(backend=large, max_batch_size=n).generate("abcab", strategy=st, n=n, seed=3, max_new_tokens=4,
                                                       ignore_eos=True, temperature=1.0)
    counts = torch.zeros(V * V)
    for choice in out.choices:
        counts[choice.token_ids[0] * V + choice.token_ids[1]] += 1
    assert chi2_pvalue(counts, _exact_pair(large, large.tokenizer.encode("abcab"), SamplingParams())) < 1e-6
    assert out.stats.extra["tokens_kept"] > 0


def test_higher_tolerance_keeps_more_drafts():
    rates = []
    for tol in (0.0, 0.5, 1.0):
        small, large = mock_pair()
        st = EntropySwitch(small=small, threshold=math.inf, verify=tol)
        outs = LLM(backend=large).generate(["abc", "hello"], strategy=st, temperature=0, max_new_tokens=30,
                                           ignore_eos=True)
        kept, drafted = (sum(o.stats.extra[k] for o in outs) for k in ("tokens_kept", "tokens_drafted"))
        rates.append(kept / drafted)
    assert rates[0] <= rates[1] <= rates[2] == 1.0


# ---- provenance ---------------------------------------------------------------------------------
@pytest.mark.parametrize("verify", [None, 0.0, 0.3])
def test_provenance_matches_the_counters(verify):
    small, large = similar_pair()
    st = EntropySwitch(small=small, threshold=2.0, window=2, min_dwell=1, verify=verify)
    outs = LLM(backend=large).generate(["abc", "hello", "gonk"], strategy=st, temperature=1.0, seed=2, n=2,
                                       max_new_tokens=30)
    sources = set()
    for o in outs:
        tags = [p for c in o.choices for p in c.provenance]
        assert len(tags) == o.usage.completion_tokens
        counts = {role: sum(p.source == role for p in tags) for role in (SMALL, LARGE)}
        assert counts == o.stats.extra["tokens_by_model"]
        assert ["".join("S" if p.source == SMALL else "L" for p in c.provenance) for c in o.choices] \
            == o.stats.extra["provenance"]
        for p in tags:
            assert set(p.detail) <= {"entropy", "verified"} and p.detail["entropy"] == round(p.detail["entropy"], 4)
            assert p.detail.get("verified", False) == (verify is not None and p.source == SMALL)
        sources |= {p.source for p in tags}
    assert sources == {SMALL, LARGE}


# ---- real model: SmolLM2 with a cut (untrained) student of itself --------------------------------
@pytest.mark.real
def test_real_greedy_verified_identical(smollm):
    from decodekit.training.distill import cut_student

    small = HFBackend(cut_student(smollm.model, 8), smollm.tokenizer, name="smollm-cut8", cache_tokens=2048)
    prompt = [{"role": "user", "content": "Name three colors."}]
    want = LLM(backend=smollm).generate(prompt, temperature=0, max_new_tokens=16).token_ids
    st = EntropySwitch(small=small, threshold=3.0, verify=0.0)
    out = LLM(backend=smollm).generate(prompt, strategy=st, temperature=0, max_new_tokens=16)
    assert out.token_ids == want and out.stats.extra["tokens_drafted"] > 0
    assert smollm.cache.num_open_handles == 0 and small.cache.num_open_handles == 0
