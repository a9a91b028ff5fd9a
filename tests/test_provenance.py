"""Per-token provenance is exact: drafted-and-accepted counts equal the speculative stats, forced
tokens are exactly those where the automaton allows one token, rollout tokens carry their node,
SMC results carry weight traces, and streaming events carry the same provenance as the result."""

from __future__ import annotations

from collections import Counter

import pytest

from decodekit import LLM, Speculative
from decodekit.backends.mock import MockBackend
from decodekit.constraints import Regex
from decodekit.constraints.base import TokenChecker
from decodekit.rollout.tree import TreeRollout
from decodekit.strategies import TreeStrategy
from decodekit.types import SOURCES

V = 16
PATTERN = "(ab|ac)(defg|hij)+k"


def _sources(completion) -> Counter:
    return Counter(p.source for c in completion.choices for p in c.provenance)


def _check_shape(completion) -> None:
    for c in completion.choices:
        assert len(c.provenance) == len(c.token_ids)
        assert all(p.source in SOURCES for p in c.provenance)
        if c.logprobs is not None:
            assert tuple(t.provenance for t in c.logprobs) == c.provenance


def test_plain_sampling_is_sampled(mock):
    out = LLM(backend=mock).generate(["abc", "b"], max_new_tokens=12, seed=1, logprobs=1)
    for c in out:
        _check_shape(c)
        assert set(_sources(c)) == {"sampled"}


@pytest.mark.parametrize("draft", ["ngram", "model"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculative_accepted_drafts_equal_stats(draft, temperature):
    target = MockBackend(vocab_size=V, seed=3, cache_tokens=8192)
    source = draft if draft == "ngram" else MockBackend(vocab_size=V, seed=3, name="d")
    llm = LLM(backend=target)
    out = [llm.generate(prompt, strategy=Speculative(draft=source), max_new_tokens=40, temperature=temperature,
                        seed=4, logprobs=0) for prompt in ["abcabcabc", "abab", "dcba"]]  # batch 1: drafts pay
    for c in out:
        _check_shape(c)
        counts = _sources(c)
        assert counts["draft_accepted"] == c.stats.extra["tokens_accepted"]
        assert counts["bonus"] + counts["sampled"] + counts["draft_accepted"] == len(c.token_ids)
        assert all(p.detail["draft"] == c.stats.extra["draft"] for p in c.choices[0].provenance
                   if p.source != "sampled")
    assert sum(_sources(c)["draft_accepted"] for c in out) > 0


def _allowed_counts(backend, constraint, prompt_ids, token_ids) -> list[int]:
    """Tokens the automaton allows before each output token (EOS counted when the text is complete)."""
    index = constraint.index(backend.tokenizer)
    checker = TokenChecker(constraint, backend.tokenizer)
    state, text, counts = index.initial(), b"", []
    for token in token_ids:
        allowed = index.allowed(state)
        for eos in checker.eos_ids:
            if eos < len(allowed):
                allowed[eos] = constraint.complete_ok(text)
        counts.append(int(allowed.sum()))
        if token in checker.eos_ids:
            break
        state = index.next(state, token)
        text += checker.token_bytes[token]
    return counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forced_exactly_where_the_automaton_allows_one_token(seed):
    target = MockBackend(vocab_size=V, seed=seed, cache_tokens=8192)
    constraint = Regex(PATTERN)
    out = LLM(backend=target).generate("abca", constraint=constraint, sampler="masked", max_new_tokens=30,
                                       seed=seed, n=4, ignore_eos=False)
    _check_shape(out)
    forced_total = 0
    for c in out.choices:
        counts = _allowed_counts(target, constraint, out.prompt_token_ids, c.token_ids)
        forced = [p.source == "forced" for p in c.provenance]
        assert forced[: len(counts)] == [n == 1 for n in counts]
        assert all(p.detail["checks"] >= 1 for p in c.provenance)
        forced_total += sum(forced)
    assert forced_total > 0


@pytest.mark.parametrize("draft", ["forced", "ngram"])
def test_constrained_speculative_provenance(draft):
    target = MockBackend(vocab_size=V, seed=3, cache_tokens=8192)
    out = LLM(backend=target).generate(["abcab", "acac"], strategy=Speculative(draft=draft),
                                       constraint=Regex(PATTERN), temperature=0, max_new_tokens=40, logprobs=0)
    for c in out:
        _check_shape(c)
        accepted = [p for p in c.choices[0].provenance if "draft_accepted" in (p.source, p.detail.get("as"))]
        assert len(accepted) == c.stats.extra["tokens_accepted"]
        kinds = Counter(p.detail["draft"] for p in accepted)
        assert kinds["forced_text"] + kinds["layout"] == c.stats.extra["forced_tokens"] + c.stats.extra[
            "layout_tokens"]
    assert sum(_sources(c)["draft_accepted"] for c in out) > 0
    assert sum(_sources(c)["forced"] for c in out) > 0


def test_smc_results_carry_weight_traces(mock):
    out = LLM(backend=mock).generate("ab", constraint=Regex("(ab|ac)(defg|hij){1,3}"), particles=4,
                                     max_new_tokens=20, seed=3)
    _check_shape(out)
    extra = out.stats.extra
    trace = extra["smc_trace"]
    assert len(trace["log_weights"]) == len(extra["ess_trace"])
    assert all(len(step) == 4 for step in trace["log_weights"])
    assert len(trace["resamples"]) == extra["resampling_events"]
    assert all(len(e["ancestors"]) == 4 for e in trace["resamples"])
    assert all(len(p["weight_trace"]) == len(trace["log_weights"]) for p in extra["particles"])
    assert {p.detail.get("particle") for p in out.choices[0].provenance} <= set(range(4))


def test_rollout_tokens_carry_their_node(mock):
    tree = TreeStrategy(TreeRollout(segment_len=4, max_width=6, first_split=2, early_stop=None))
    out = LLM(backend=mock).generate("abc", strategy=tree, max_new_tokens=12, seed=0)
    rollout = out.stats.extra["rollout"]
    nodes = {n.node_id: n for n in rollout.nodes}
    assert len(out.choices) > 1
    for c, t in zip(out.choices, rollout.trajectories):
        _check_shape(out)
        path = [p.detail["node"] for p in c.provenance]
        assert list(dict.fromkeys(path)) == [n for n in t.path if nodes[n].token_ids]
        assert [len(nodes[n].token_ids) for n in dict.fromkeys(path)] == [path.count(n) for n in dict.fromkeys(path)]


def test_stream_events_carry_the_result_provenance():
    target = MockBackend(vocab_size=V, seed=3, cache_tokens=8192)
    llm = LLM(backend=target)
    kwargs = dict(strategy=Speculative(draft="ngram"), max_new_tokens=30, temperature=0)
    streamed = [p for e in llm.stream("abcabcabc", **kwargs) for p in e.provenance]
    assert tuple(streamed) == llm.generate("abcabcabc", **kwargs).choices[0].provenance
