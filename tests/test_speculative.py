"""Speculative drafting: the acceptance rule is exact, outputs match plain decoding, caches stay clean."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import spec_bench_prompts

from decodekit import LLM, SamplingParams, Speculative
from decodekit.backends.mock import MockBackend
from decodekit.drafting.acceptance import verify_greedy, verify_sampled
from decodekit.drafting.drafters import (
    Draft,
    Drafter,
    LookupThenModel,
    ModelDrafter,
    NgramDrafter,
    best_length,
    check_same_tokenizer,
    int8_backend,
    ngram_propose,
    verify_cost_of,
)
from decodekit.sampling import probs_from_logits
from decodekit.strategies import by_name

V = 8


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness-of-fit p-value (cells with expected count < 5 pooled)."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    if df < 1:
        return 1.0 if stat == 0 else 0.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))




# ---- the pure acceptance rule -----------------------------------------------------------------

def _toy(seed: int, rows: int, sharp: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((rows, V), generator=g) * sharp).softmax(-1)


@pytest.mark.parametrize("q_kind", ["similar", "unlike", "one_hot"])
def test_verify_sampled_emits_the_target_distribution(q_kind, one_thread):
    p = _toy(0, 3)  # p_1, p_2, p_3 (context-free toy target)
    unlike = (1.0 / (p[:2] + 0.01)) ** 2  # mass where p has little
    unlike = unlike / unlike.sum(-1, keepdim=True)
    q = {"similar": (p[:2].log() + 0.3 * torch.randn((2, V), generator=torch.Generator().manual_seed(1))).softmax(-1),
         "unlike": unlike, "one_hot": None}[q_kind]
    g = torch.Generator().manual_seed(1234)
    n = 12000
    # one-hot drafts (n-gram lookup) may come from anywhere: the rule is exact given any draft token
    drafts = torch.stack([torch.multinomial(unlike[i] if q is None else q[i], n, replacement=True, generator=g)
                          for i in range(2)], 1).tolist()
    first, second = torch.zeros(V), torch.zeros(V)
    wrong = torch.zeros(V)  # a broken rule (resample from p after rejection) must be detected
    for draft in drafts:
        accepted, token = verify_sampled(draft=draft, p=p, q=q, generator=g)
        block = draft[:accepted] + [token]
        first[block[0]] += 1
        if len(block) > 1:
            second[block[1]] += 1
        wrong[draft[0] if accepted else int(torch.multinomial(p[0], 1, generator=g))] += 1
    assert chi2_pvalue(first, p[0]) > 1e-3
    assert chi2_pvalue(second, p[1]) > 1e-3
    if q_kind != "similar":
        assert chi2_pvalue(wrong, p[0]) < 1e-6, "the test must be able to tell a wrong rule apart"


def test_verify_sampled_edge_cases():
    g = torch.Generator().manual_seed(0)
    p = _toy(3, 3)
    assert verify_sampled(draft=[2, 5], p=p, q=p[:2].clone(), generator=g)[0] == 2  # q == p: always accepted
    zero = p.clone()
    zero[0, 4] = 0.0
    zero[0] /= zero[0].sum()
    for _ in range(50):  # a draft the target gives probability 0 is always rejected, never re-emitted
        accepted, token = verify_sampled(draft=[4, 1], p=zero, q=None, generator=g)
        assert accepted == 0 and token != 4
    with pytest.raises(ValueError, match="k \\+ 1"):
        verify_sampled(draft=[1], p=p, q=None, generator=g)


def test_verify_greedy():
    assert verify_greedy(draft=[3, 4, 5], target=[3, 4, 5, 6]) == (3, 6)
    assert verify_greedy(draft=[3, 9, 5], target=[3, 4, 5, 6]) == (1, 4)
    assert verify_greedy(draft=[], target=[7]) == (0, 7)


# ---- n-gram lookup ---------------------------------------------------------------------------------

def test_ngram_propose_longest_latest_match():
    ids = [1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3]
    assert ngram_propose(ids, num_tokens=3, max_ngram=2) == [4, 5, 7]  # "2 3" latest earlier match
    assert ngram_propose(ids, num_tokens=3, max_ngram=3) == [4, 5, 7]  # "7 2 3" never recurs: fall to 2
    assert ngram_propose([5, 6, 7, 5, 8, 8, 5], num_tokens=2, max_ngram=1) == [8, 8]
    assert ngram_propose([1, 2, 3], num_tokens=4) == []
    assert ngram_propose([1, 1], num_tokens=4) == [1]
    assert ngram_propose([4, 1, 2, 4], num_tokens=9) == [1, 2, 4]


# ---- engine-level exactness on the mock ----------------------------------------------------------

def _exact_pair(backend: MockBackend, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """Exact joint distribution of the first two generated tokens (V, V) under the processed target."""
    first = probs_from_logits(backend.exact_logits(prompt), params)
    second = torch.stack([probs_from_logits(backend.exact_logits(prompt + [a]), params) for a in range(V)])
    return first.unsqueeze(1) * second


@pytest.mark.parametrize("draft_kind,sampling,k", [
    ("unlike_model", dict(temperature=1.0), 3),
    ("similar_model", dict(temperature=0.7, top_k=5), 3),
    ("ngram", dict(temperature=1.2, top_p=0.9), 3),
    ("unlike_model", dict(temperature=1.5, min_p=0.05), 3),
    # draft lengths chosen by value, from confidences calibrated on each sequence's earlier verifies
    ("similar_model", dict(temperature=1.0), "adaptive"),
    ("unlike_model", dict(temperature=0.8, top_p=0.95), "adaptive"),
])
def test_generated_tokens_follow_target_distribution(draft_kind, sampling, k, one_thread):
    n = 2000
    target = MockBackend(vocab_size=V, seed=0, cache_tokens=n * 30 + 64)
    draft = {"unlike_model": lambda: MockBackend(vocab_size=V, seed=7, name="draft", cache_tokens=n * 30 + 64),
             "similar_model": lambda: MockBackend(vocab_size=V, seed=0, name="draft", cache_tokens=n * 30 + 64,
                                                  logits_fn=_noisy(target.logits_fn)),
             "ngram": lambda: "ngram"}[draft_kind]()
    # adaptive: draft lengths chosen by value (flat costs: every draft the confidences justify is verified)
    llm = LLM(backend=target, max_batch_size=n)
    prompt = "abcab"  # the n-gram drafter finds "ab" and proposes "c"
    spec = Speculative(draft=draft, num_draft_tokens=k, verify_cost=(1.0,) * 17, width_cost=0.0)
    out = llm.generate(prompt, strategy=spec, max_new_tokens=4, n=n, seed=11, ignore_eos=True, **sampling)
    counts = torch.zeros(V * V)
    for choice in out.choices:
        counts[choice.token_ids[0] * V + choice.token_ids[1]] += 1
    exact = _exact_pair(target, target.tokenizer.encode(prompt), SamplingParams(**sampling)).flatten()
    assert chi2_pvalue(counts, exact) > 1e-3
    assert out.stats.extra["tokens_accepted"] > 0 and out.stats.extra["verify_steps"] >= n
    if draft_kind != "ngram":  # a draft model's own distribution is far from the target's: the test can see it
        q = _exact_pair(draft, target.tokenizer.encode(prompt), SamplingParams(**sampling)).flatten()
        if draft_kind == "unlike_model":
            assert chi2_pvalue(counts, q) < 1e-6
    target.cache.check_integrity()
    assert target.cache.num_open_handles == 0


def _noisy(logits_fn):
    table = torch.randn((V, V), generator=torch.Generator().manual_seed(99)) * 0.5
    return lambda ctx: logits_fn(ctx) + table[ctx[-1]]


@pytest.mark.parametrize("seed,ignore_eos", [(0, True), (6, False)])
@pytest.mark.parametrize("draft", ["ngram", "model", "unlike", "ngram+model"])
def test_greedy_equals_plain_on_mock_batch(draft, seed, ignore_eos):
    target = MockBackend(vocab_size=16, seed=seed)
    drafts = {"model": MockBackend(vocab_size=16, seed=seed, name="d"),
              "unlike": MockBackend(vocab_size=16, seed=seed + 5, name="d"),
              "ngram+model": LookupThenModel(NgramDrafter(3), ModelDrafter(MockBackend(vocab_size=16, seed=1)))}
    spec = Speculative(draft=drafts.get(draft, draft))
    llm = LLM(backend=target)
    prompts = ["abcabcab", "hello", "gg", "bagbaghidebagba", "abc"]  # a batch: rows get different k
    params = dict(temperature=0, max_new_tokens=40, logprobs=2, ignore_eos=ignore_eos)
    plain = llm.generate(prompts, **params)
    fast = llm.generate(prompts, strategy=spec, **params)
    assert sum(len(c.token_ids) for c in plain) > 40
    for a, b in zip(plain, fast):
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
        assert [t.logprob for t in a.choices[0].logprobs] == pytest.approx([t.logprob for t in b.choices[0].logprobs])
    target.cache.check_integrity()
    assert target.cache.num_open_handles == 0


def test_stops_inside_a_block_and_streaming():
    target = MockBackend(vocab_size=16, seed=6)
    llm = LLM(backend=target)
    spec = Speculative(draft=MockBackend(vocab_size=16, seed=6, name="d"), num_draft_tokens=8)
    for kw in [dict(stop=["mf"]), dict(stop_token_ids=[13]), dict(max_new_tokens=5)]:
        params = dict(temperature=0, max_new_tokens=60) | kw
        plain = llm.generate("abc", **params)
        fast = llm.generate("abc", strategy=spec, **params)
        assert len(plain.token_ids) < params["max_new_tokens"] or "max_new_tokens" in kw
        assert (fast.token_ids, fast.text, fast.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason)
    plain = llm.generate("hello", temperature=0, max_new_tokens=60)
    assert plain.finish_reason == "stop" and len(plain.token_ids) == 5  # EOS (token 0) inside a block
    streamed = list(llm.stream("hello", strategy=spec, temperature=0, max_new_tokens=60))
    assert "".join(e.text for e in streamed) == plain.text
    assert sum((e.token_ids for e in streamed), ()) == plain.token_ids  # nothing after EOS
    assert streamed[-1].finish_reason == "stop"
    assert target.cache.num_open_handles == 0


def test_cache_holds_only_verified_tokens_after_rejections():
    target = MockBackend(vocab_size=16, seed=0, cache_tokens=1024)
    draft = MockBackend(vocab_size=16, seed=4, name="d", cache_tokens=1024)  # unlike: many rejections
    llm = LLM(backend=target)
    spec = Speculative(draft=draft, num_draft_tokens=6)
    engine = llm.engine
    params = SamplingParams(temperature=0.9, max_new_tokens=30, seed=3, n=2, ignore_eos=True)
    requests = [engine.add_request(target.tokenizer.encode(p), params, spec) for p in ["abcd", "abce", "ojk"]]
    while engine.has_unfinished():
        engine.step()
        for seq in engine.running:
            slots = seq.handle.slots
            assert [target.slot_tokens[s] for s in slots] == seq.ids[: len(slots)]
            assert len(slots) >= len(seq.ids) - 1  # everything verified but the newest token is cached
            dh = getattr(seq.state, "drafter", {}).get("draft_handle")
            if dh is not None:
                assert [draft.slot_tokens[s] for s in dh.slots] == seq.ids[: len(dh.slots)]
        target.cache.check_integrity()
        draft.cache.check_integrity()
    outputs = [tuple(s.ids) for r in requests for s in r.seqs]
    for cache in (target.cache, draft.cache):  # the prefix caches hold verified sequences only
        assert cache.num_open_handles == 0
        for path in _tree_paths(cache.tree):
            assert any(out[: len(path)] == path for out in outputs)
    stats = engine.pop_completion(requests[0].request_id).stats.extra
    assert stats["tokens_drafted"] > stats["tokens_accepted"] and stats["acceptance_histogram"][0] > 0
    assert sum(stats["acceptance_histogram"]) == stats["verify_steps"]


def _tree_paths(tree):
    out, stack = [], [(tree.root, ())]
    while stack:
        node, prefix = stack.pop()
        path = prefix + tuple(node.key)
        if not node.children and path:
            out.append(path)
        stack.extend((c, path) for c in node.children.values())
    return out


class NoConfidence(Drafter):
    """Greedy drafts from a mock model with no confidence estimates: adaptive k follows acceptance alone."""

    def __init__(self, backend):
        self.backend = backend

    def propose(self, ctx, seqs, ks):
        return [Draft(self._chain(list(s.ids), k)) for s, k in zip(seqs, ks)]

    def _chain(self, ids, k):
        for _ in range(k):
            ids.append(int(self.backend.exact_logits(ids).argmax()))
        return ids[len(ids) - k:] if k else []


def test_adaptive_k_and_stats():
    target = MockBackend(vocab_size=16, seed=0)
    llm = LLM(backend=target)
    same = llm.generate("abc", strategy=Speculative(draft=NoConfidence(MockBackend(vocab_size=16, seed=0, name="d"))),
                        temperature=0, max_new_tokens=60, ignore_eos=True).stats.extra
    assert same["acceptance_rate"] == 1.0 and max(i for i, c in enumerate(same["acceptance_histogram"]) if c) > 8
    assert same["mean_tokens_per_step"] == pytest.approx(same["mean_accepted"] + 1)
    assert same["target_forward_passes"] < 15  # 60 tokens
    unlike = llm.generate("abc", strategy=Speculative(draft=NoConfidence(MockBackend(vocab_size=16, seed=9,
                                                                                     name="d"))),
                          temperature=0, max_new_tokens=60, ignore_eos=True).stats.extra
    assert unlike["tokens_drafted"] < 2 * unlike["verify_steps"]  # k shrank towards 1


def test_draft_length_by_value():
    """best_length keeps the prefix with the most expected tokens per verify cost; a drafter whose
    confidences undersell it gets trusted more as its drafts keep being accepted, and one that oversells
    drafts less."""
    flat = (1.0, 1.0, 1.0, 1.0)
    assert best_length([0.9, 0.9, 0.9], flat) == (3, pytest.approx(1 + 0.9 + 0.81 + 0.729))
    assert best_length([0.1, 0.9], (1.0, 1.5, 1.6))[0] == 0  # (1 + 0.1) / 1.5 < 1
    assert best_length([0.5, 0.9, 0.9], (1.0, 1.05, 1.1, 1.12))[0] == 3
    assert best_length([], flat) == (0, 1.0)
    assert verify_cost_of((1.0, 1.5), 4) == pytest.approx(2.5)
    for bad in [(), (0.5, 1.0), (1.0, 0.9), "cheap"]:
        with pytest.raises(ValueError, match="verify_cost"):
            Speculative(verify_cost=bad)
    llm = LLM(backend=MockBackend(vocab_size=16, seed=0))
    same = llm.generate("abc", strategy=Speculative(draft=MockBackend(vocab_size=16, seed=0, name="d")),
                        temperature=0, max_new_tokens=120, ignore_eos=True).stats.extra
    assert same["acceptance_rate"] == 1.0 and same["target_forward_passes"] < 40
    hist = same["acceptance_histogram"]
    assert max(i for i, c in enumerate(hist) if c) >= 4  # the mock's own confidence is ~0.3 per token
    unlike = llm.generate("abc", strategy=Speculative(draft=MockBackend(vocab_size=16, seed=9, name="d")),
                          temperature=0, max_new_tokens=120, ignore_eos=True).stats.extra
    assert unlike["tokens_drafted"] < 1.2 * unlike["verify_steps"]


def test_validation_and_registry():
    for bad in [dict(num_draft_tokens=0), dict(num_draft_tokens=17), dict(num_draft_tokens="fast"),
                dict(draft=""), dict(draft=3), dict(max_ngram=0), dict(min_ngram=0), dict(min_ngram=4)]:
        with pytest.raises(ValueError):
            Speculative(**bad)
    assert isinstance(by_name("speculative", draft="ngram"), Speculative)
    assert Speculative(num_draft_tokens=5).extra_slots(None) == 6
    llm = LLM(backend=MockBackend(vocab_size=16))
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("abc", strategy=Speculative(draft=MockBackend(vocab_size=20, name="d")), temperature=0)
    with pytest.raises(ValueError, match="HF"):
        llm.generate("abc", strategy=Speculative(draft="int8"), temperature=0)


def test_adaptive_k_pauses_drafting_after_single_token_misses():
    """k grows on full acceptance, shrinks on rejection; a rejected single draft pauses drafting for
    1, 2, 4, ... plain steps (capped at 16), and any acceptance resets the pause."""
    from types import SimpleNamespace

    spec = Speculative()
    ctx = SimpleNamespace(max_context=10**6)
    seq = SimpleNamespace(state=None, params=SamplingParams(max_new_tokens=10**4), output_ids=[], ids=[1])
    seq.state_as = lambda cls: seq.state if isinstance(seq.state, cls) else setattr(seq, "state", cls()) or seq.state

    def budgets(n):
        return [spec._budget(ctx, seq) for _ in range(n)]

    assert budgets(1) == [4]
    spec._record(seq, 4, 4)
    assert budgets(1) == [6]
    for k in (6, 5, 4, 3, 2):
        spec._record(seq, k, 0)
    assert budgets(1) == [1]
    pauses = []
    for _ in range(6):
        spec._record(seq, 1, 0)
        pauses.append(budgets(20).index(1))
    assert pauses == [1, 2, 4, 8, 16, 16]
    spec._record(seq, 1, 1)  # an acceptance: k grows, the next miss pauses for one step only
    spec._record(seq, 3, 0)
    assert budgets(1) == [2]
    seq.state.k = 1
    spec._record(seq, 1, 0)
    assert budgets(2) == [0, 1]


# ---- real models ----------------------------------------------------------------------------------

def _greedy_match(backend, prompts, drafts, max_new_tokens):
    llm = LLM(backend=backend)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    plain = llm.generate(chats, temperature=0, max_new_tokens=max_new_tokens)
    for draft in drafts:
        # fixed k: every step verifies drafts (adaptive k may pause drafting on short outputs)
        fast = llm.generate(chats, strategy=Speculative(draft=draft, num_draft_tokens=4), temperature=0,
                            max_new_tokens=max_new_tokens)
        for a, b in zip(plain, fast):
            assert a.token_ids == b.token_ids, f"draft {draft!r} diverged"
        assert sum(c.stats.extra["tokens_accepted"] for c in fast) > 0
    backend.cache.check_integrity()
    assert backend.cache.num_open_handles == 0


# The full size (128 new tokens, several Spec-Bench prompts) with DECODEKIT_SPEC_FULL=1; the default
# keeps the file within its time budget on a shared 2-core machine.
FULL = os.environ.get("DECODEKIT_SPEC_FULL") == "1"


@pytest.mark.real
def test_real_smollm_greedy_identical(smollm):
    int8 = int8_backend(smollm)
    prompts = spec_bench_prompts(6)[: 4 if FULL else 2]
    _greedy_match(smollm, prompts, ["ngram", int8, "ngram+int8"], 128 if FULL else 32)
    int8.cache.check_integrity()
    assert int8.cache.num_open_handles == 0


@pytest.mark.real
def test_real_gemma_greedy_identical(gemma):
    prompts = spec_bench_prompts(6)[4:6 if FULL else 5]
    _greedy_match(gemma, prompts, ["ngram", "int8", gemma] if FULL else ["ngram", gemma], 128 if FULL else 12)


@pytest.mark.real
def test_real_tokenizer_mismatch(smollm, gemma):
    with pytest.raises(ValueError, match="different tokenizer"):
        check_same_tokenizer(smollm, gemma)


def test_common_draft_length_prices_the_step_width():
    """A batched step costs by its width: drafts pay when all rows' expected accepted drafts together
    beat widening the step; once wide, every row's drafts up to that width ride along."""
    from decodekit.drafting.drafters import common_draft_length

    cost = (0.05, 0.1, 0.125, 0.15) + (0.3,) * 12
    assert common_draft_length([[0.7, 0.6], [], [], []], 4, cost) == 1  # 4.7 / 1.15 > 4, 5.12 / 1.3 < 4.7/1.15
    assert common_draft_length([[0.3], [], [], []], 4, cost) == 0  # 4.3 / 1.15 < 4
    assert common_draft_length([[0.9, 0.9]] * 4, 4, cost) == 2  # (4 + 4 * 1.71) / 1.3 beats k = 1
    assert common_draft_length([[0.9, 0.9, 0.9]] + [[]] * 15, 16, cost) == 0  # one row cannot pay a wide batch
    assert common_draft_length([[0.8]] * 16, 16, cost) == 1  # all rows can: 28.8 / 1.3 > 16
    assert common_draft_length([[0.2]], 4, (0.0,)) == 1  # free width: any draft
    # no request waiting: only the rows with the most tokens left count, and together
    assert common_draft_length([[0.7], [0.7], [0.7], [0.7]], 4, cost, critical=[True] * 4) == 0  # 0.7^4 = 0.24
    assert common_draft_length([[0.9], [0.2], [0.2], [0.2]], 4, cost, critical=[True, False, False, False]) == 1


def test_draft_length_by_value_keeps_sampled_drafts_exact(one_thread):
    """A draft model whose confidence after its first draft depends on which token it drew: a length
    rule that keeps d_0 because of the confidence after it (argmax over lengths) verifies d_0 = A
    only, and the first token's law is off (p ~ 1e-37 before the fix); the sequential rule is exact."""
    def target_fn(ctx):
        return torch.tensor([-9.0, 0.0, 0.3, 0.1, -0.2, 0.4, 0.0, -0.1])

    def draft_fn(ctx):
        out = torch.full((V,), -20.0)
        if len(ctx) == 3:  # first draft after the 3-token prompt: A (1) or B (2), half and half
            out[1] = out[2] = 0.0
        elif ctx[-1] == 1:
            out[3] = 10.0  # sure after A ...
        else:
            out[:] = 0.0  # ... unsure after B
        return out

    n = 2000
    target = MockBackend(vocab_size=V, logits_fn=target_fn, cache_tokens=n * 12 + 64)
    draft = MockBackend(vocab_size=V, logits_fn=draft_fn, name="d", cache_tokens=n * 12 + 64)
    llm = LLM(backend=target, max_batch_size=1)
    # one draft costs more than it returns at confidence 0.5; two pay off only when the second is sure
    spec = Speculative(draft=draft, verify_cost=(1.0, 1.6, 1.7) + (1.8,) * 14)
    counts = torch.zeros(V)
    for i in range(n):
        counts[llm.generate("abc", strategy=spec, max_new_tokens=4, seed=i, ignore_eos=True).token_ids[0]] += 1
    p = probs_from_logits(target_fn([]), SamplingParams(temperature=1.0))
    assert chi2_pvalue(counts, p) > 1e-3
    assert target.cache.num_open_handles == 0
