"""Speculative drafting under a constraint: greedy and seeded outputs equal constrained decoding's,
the masked rule with a model's sampled drafts follows the constrained target (chi-square), SMC
weights stay unbiased with drafts, forced text is drafted, and pairs that do not compose say so."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from test_speculative import chi2_pvalue

from decodekit import LLM, SamplingParams, Speculative
from decodekit.backends.mock import MockBackend
from decodekit.constraints import JsonSchema, OneOf, Regex, token_bytes
from decodekit.constraints.forced import forced_tokens
from decodekit.drafting.drafters import LookupThenModel, ModelDrafter, NgramDrafter
from decodekit.sampling import probs_from_logits
from decodekit.strategies import Constrained, ConstrainedSpeculative, EntropySwitch
from decodekit.strategies.tree_strategy import TreeStrategy

V = 16  # mock: 0 EOS, 1.. = a b c d ...
PATTERN = "(ab|ac)(defg|hij)+k"  # forced runs ("efg" after "d", "ij" after "h") between choices


def _drafts(seed: int):
    return {"forced": "forced", "ngram": "ngram", "model": MockBackend(vocab_size=V, seed=seed, name="d"),
            "unlike": MockBackend(vocab_size=V, seed=seed + 5, name="d"),
            "ngram+model": LookupThenModel(NgramDrafter(3), ModelDrafter(MockBackend(vocab_size=V, seed=1)))}


@pytest.mark.parametrize("sampler", ["awrs", "masked"])
@pytest.mark.parametrize("draft", ["forced", "ngram", "model", "unlike", "ngram+model"])
def test_greedy_identical_to_constrained(draft, sampler):
    target = MockBackend(vocab_size=V, seed=3, cache_tokens=8192)
    llm = LLM(backend=target)
    prompts = ["abcab", "a", "acac", "bad"]
    params = dict(temperature=0, max_new_tokens=40, logprobs=2)
    plain = llm.generate(prompts, constraint=Regex(PATTERN), sampler=sampler, **params)
    fast = llm.generate(prompts, strategy=Speculative(draft=_drafts(3)[draft]), constraint=Regex(PATTERN),
                        sampler=sampler, **params)
    assert sum(len(c.token_ids) for c in plain) > 20
    for a, b in zip(plain, fast):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert [t.logprob for t in a.choices[0].logprobs] == pytest.approx([t.logprob for t in b.choices[0].logprobs])
        assert Regex(PATTERN).complete_ok(b.text) or b.finish_reason != "stop"
    extra = fast[0].stats.extra
    assert extra["forced_tokens"] > 0 and extra["tokens_accepted"] >= extra["forced_tokens"]
    assert sum(c.stats.extra["target_forward_passes"] for c in fast) < sum(len(c.token_ids) for c in plain)
    target.cache.check_integrity()
    assert target.cache.num_open_handles == 0


@pytest.mark.parametrize("sampler", ["awrs", "masked"])
@pytest.mark.parametrize("draft", ["forced", "ngram"])
def test_seeded_sampling_identical_to_constrained(draft, sampler):
    """Drafts that use no randomness verify by drawing with the constrained sampler and comparing:
    the same random stream, so the same text token for token. (A model drafting by sampling draws
    from the request's stream too: exact in law, tested by chi-square below.)"""
    target = MockBackend(vocab_size=V, seed=2, cache_tokens=30000)
    llm = LLM(backend=target, max_batch_size=64)
    params = dict(temperature=1.0, max_new_tokens=30, seed=5, n=24)
    pattern = "(ab|ac)(defg|hij){1,4}"
    plain = llm.generate("abca", constraint=Regex(pattern), sampler=sampler, **params)
    spec = Speculative(draft=_drafts(2)[draft], width_cost=0.0)  # a batch of 24 rows: drafts ride free
    fast = llm.generate("abca", strategy=spec, constraint=Regex(pattern),
                        sampler=sampler, **params)
    assert [c.token_ids for c in plain.choices] == [c.token_ids for c in fast.choices]
    assert len({c.text for c in fast.choices}) >= 3
    assert fast.stats.extra["tokens_accepted"] > 0
    assert target.cache.num_open_handles == 0


def _masked_pair(backend, prompt: list[int], params: SamplingParams, allowed: set[int]) -> torch.Tensor:
    """Exact joint law (V, V) of the first two tokens under the masked target (mask, renormalise)."""
    def masked(ids):
        p = probs_from_logits(backend.exact_logits(ids), params).double()
        keep = torch.zeros(V, dtype=torch.bool)
        keep[list(allowed)] = True
        p = p.masked_fill(~keep, 0.0)
        return p / p.sum()
    second = torch.stack([masked(prompt + [a]) for a in range(V)])
    return (masked(prompt).unsqueeze(1) * second).float()


@pytest.mark.parametrize("sampler,sampling", [("masked", dict(temperature=1.0)),
                                              ("masked", dict(temperature=0.8, top_k=8)),
                                              ("awrs", dict(temperature=1.2))])
def test_sampled_model_drafts_follow_constrained_target(sampler, sampling, one_thread):
    n = 2000
    target = MockBackend(vocab_size=V, seed=0, cache_tokens=n * 30 + 64)
    drafter = MockBackend(vocab_size=V, seed=7, name="draft", cache_tokens=n * 30 + 64)  # unlike the target
    llm = LLM(backend=target, max_batch_size=n)
    letters = "abcdefgh"
    spec = Speculative(draft=drafter, num_draft_tokens=3, verify_cost=(1.0,) * 17, width_cost=0.0)
    out = llm.generate("abcab", strategy=spec, constraint=Regex(f"[{letters}]{{4}}"), sampler=sampler,
                       max_new_tokens=6, n=n, seed=11, **sampling)
    counts = torch.zeros(V * V)
    for choice in out.choices:
        counts[choice.token_ids[0] * V + choice.token_ids[1]] += 1
    allowed = {target.tokenizer.encode(c)[0] for c in letters}
    prompt = target.tokenizer.encode("abcab")
    exact = _masked_pair(target, prompt, SamplingParams(**sampling), allowed).flatten()
    assert chi2_pvalue(counts, exact) > 1e-3
    assert out.stats.extra["tokens_accepted"] > 0
    unmasked_draft = _masked_pair(drafter, prompt, SamplingParams(**sampling), allowed).flatten()
    assert chi2_pvalue(counts, unmasked_draft) < 1e-6, "the test must tell the draft's law from the target's"
    target.cache.check_integrity()
    assert target.cache.num_open_handles == 0


# ---- SMC: particles draft forced text; the marginal-likelihood estimate stays unbiased -----------
# vocab: 0 EOS, 1 a, 2 b, 3 c, 4 d, 5 e. Prompt "e". Constraint "[ab]c[cd]": "c" is forced after the
# first letter, so every particle drafts it; the model gives it only part of its mass after "a".
NEXT = {(): {1: 0.7, 2: 0.3}, (1,): {3: 0.5, 5: 0.5}, (2,): {3: 0.9, 5: 0.1},
        (1, 3): {3: 0.05, 4: 0.05, 5: 0.9}, (2, 3): {3: 0.5, 4: 0.5}}
P_EOS_END = 0.9


def _toy_logits(context: list[int]) -> torch.Tensor:
    out = tuple(context[1:])
    probs = NEXT.get(out, {0: P_EOS_END, 5: 1 - P_EOS_END} if len(out) == 3 else {0: 1.0})
    logits = torch.full((6,), float("-inf"))
    for t, pr in probs.items():
        logits[t] = math.log(pr)
    return logits


def _toy_exact() -> tuple[dict[str, float], float]:
    joint = {}
    for a in (1, 2):
        for b in (3, 4):
            joint["ab"[a - 1] + "c" + "cd"[b - 3]] = NEXT[()][a] * NEXT[(a,)][3] * NEXT[(a, 3)][b] * P_EOS_END
    z = sum(joint.values())
    return {k: v / z for k, v in joint.items()}, z


@pytest.mark.parametrize("draft", ["forced", "ngram"])
def test_smc_with_drafts_unbiased(draft):
    toy = LLM(backend=MockBackend(vocab_size=6, logits_fn=_toy_logits, cache_tokens=60000), max_batch_size=1000)
    exact, z = _toy_exact()
    n = 200
    strategy = ConstrainedSpeculative(Regex("[ab]c[cd]"), Speculative(draft=draft), num_particles=20)
    c = toy.generate("e", strategy=strategy, n=n, seed=7, max_new_tokens=5)
    assert all(ch.finish_reason == "stop" for ch in c.choices)
    counts = Counter(ch.text for ch in c.choices)
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in set(counts) | set(exact))
    assert tv < 0.09, (counts, exact)
    ml = torch.tensor([math.exp(x) for x in c.stats.extra["log_ml_per_choice"]], dtype=torch.float64)
    assert abs(float(ml.mean()) - z) < 4 * float(ml.std()) / math.sqrt(n) + 1e-3
    assert c.stats.extra["tokens_accepted"] > 0  # the forced "c" rode in the first letter's verify row
    assert toy.backend.cache.num_open_handles == 0
    toy.backend.cache.check_integrity()


def test_forced_text_of_a_json_schema(smollm):
    spec = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
            "additionalProperties": False}
    schema = JsonSchema(spec, engine="outlines", whitespace=r"[ ]?")  # the byte automaton's forced text
    forced = forced_tokens(schema, smollm.tokenizer)
    assert forced.forced.after(b"") == b"{"
    assert forced.forced.after(b'{"') == b'name"'
    ids = forced.after(b'{"', 16)
    assert b"".join(token_bytes(smollm.tokenizer)[i] for i in ids) == b'name"'
    assert forced.after(b'{"', 1) == ids[:1]
    assert forced.forced.after(b'{"name": "x') == b""  # free text: nothing forced
    assert forced_tokens(Regex("(?=a)a+", automaton=False), smollm.tokenizer) is None
    default = JsonSchema(spec)  # llguidance: its own forced tokens, in the compact layout
    index = default.index(smollm.tokenizer)
    assert forced_tokens(default, smollm.tokenizer) is None and default.engine == "llguidance"
    pieces = token_bytes(smollm.tokenizer)
    assert b"".join(pieces[i] for i in index.forced(index.initial(), 16)) == b'{"name'  # tokens it is sure of
    assert index.initial().matcher.compute_ff_bytes() == b'{"name":"'


def test_real_model_greedy_identical(smollm):
    llm = LLM(backend=smollm)
    schema = JsonSchema({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                          "population": {"type": "integer"}},
                         "required": ["city", "population"], "additionalProperties": False})
    cases = [("The largest city of France as JSON: ", schema),
             ("A US phone number: ", Regex(r"\(\d{3}\) \d{3}-\d{4}"))]
    for prompt, constraint in cases:
        plain = llm.generate(prompt, constraint=constraint, temperature=0, max_new_tokens=40)
        for draft in ("forced", "ngram"):
            fast = llm.generate(prompt, strategy=Speculative(draft=draft), constraint=constraint, temperature=0,
                                max_new_tokens=40)
            assert (fast.token_ids, fast.finish_reason) == (plain.token_ids, plain.finish_reason), draft
            assert fast.stats.extra["target_forward_passes"] < len(plain.token_ids)
    assert smollm.cache.num_open_handles == 0


def test_pairs_that_do_not_compose_say_so():
    llm = LLM(backend=MockBackend(vocab_size=V))
    with pytest.raises(ValueError, match="EntropySwitch takes the constraint itself"):
        llm.generate("ab", strategy=EntropySwitch(small=MockBackend(vocab_size=V), large=MockBackend(vocab_size=V)),
                     constraint=Regex("a+"))
    with pytest.raises(ValueError, match="TreeRollout\\(constraint=C\\)"):
        llm.generate("ab", strategy=TreeStrategy(), constraint=Regex("a+"))
    with pytest.raises(ValueError, match="not both"):
        llm.generate("ab", strategy=Constrained(Regex("a+")), constraint=Regex("a+"))
    with pytest.raises(ValueError, match="SMC particles"):
        llm.generate("ab", strategy=Speculative(draft=MockBackend(vocab_size=V)), constraint=Regex("a+"),
                     particles=4)
    with pytest.raises(ValueError, match="only apply together with constraint"):
        llm.generate("ab", strategy=Speculative(), sampler="masked")
    out = llm.generate("ab", strategy="speculative", constraint=OneOf(["abc", "abd"]), temperature=0)
    assert out.text in ("abc", "abd")


@pytest.mark.parametrize("sampler", ["awrs", "masked"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rejected_drafts_leave_the_matcher_where_it_was(sampler, temperature):
    """Verify positions after the first draft token draw on masks prefetched along the draft (one
    matcher copy per draft token); a rejected draft's states are dropped: after every step the track's
    matcher equals a fresh replay of its kept tokens (same token count, same mask), and where drafts
    were kept the verify adopted the prefetched states."""
    from decodekit.strategies.constrained import ConstrainedState

    target = MockBackend(vocab_size=V, seed=3, cache_tokens=8192)
    llm = LLM(backend=target)
    engine = llm.engine
    constraint = Regex("(ab|ba|cd|dc){1,30}")  # each pair's first letter decides the next mask: no paths merge
    strategy = ConstrainedSpeculative(constraint, Speculative(draft="ngram", num_draft_tokens=4, width_cost=0.0),
                                      sampler=sampler)
    params = SamplingParams(temperature=temperature, max_new_tokens=40, seed=1)
    prompts = ["abbacdab", "cddcabba", "ababcdcd"]  # n-gram drafts from these pairs; the target often parts
    adopted, advance = [], strategy._advance
    strategy._advance = lambda ctx, st, track, token, state=None: (adopted.append(state is not None),
                                                                   advance(ctx, st, track, token, state))
    requests = [engine.add_request(target.tokenizer.encode(p), params, strategy) for p in prompts]
    while engine.has_unfinished():
        engine.step()
        for seq in engine.running:
            st = seq.parts.get(ConstrainedState)
            if st is None or st.track.fsa_state is None:
                continue
            fresh = st.index.advance(st.index.initial(), st.track.out)
            assert fresh[0] == len(st.track.out) and st.track.fsa_state.num_tokens == len(st.track.out)
            assert torch.equal(st.index.allowed_ids(st.track.fsa_state), st.index.allowed_ids(fresh[1]))
    stats = [engine.pop_completion(r.request_id).stats.extra for r in requests]
    assert sum(s["tokens_drafted"] for s in stats) > sum(s["tokens_accepted"] for s in stats) > 0  # both happen
    assert any(adopted) and not all(adopted)  # kept drafts take their prefetched states, the rest a fresh one
    assert target.cache.num_open_handles == 0
