"""Tree rollouts on the engine: equal to the rollout driver token for token, beside chat requests in
the same steps (one forward per step), trajectories as choices, cache integrity throughout."""

from __future__ import annotations

import pytest
from test_tree import context_logits

from decodekit import LLM, SamplingParams
from decodekit.backends.mock import MockBackend
from decodekit.engine import Engine
from decodekit.rollout.budget import EarlyStop
from decodekit.rollout.tree import TreeRollout
from decodekit.strategies.tree_strategy import TreeStrategy


def ctx_backend(cache_tokens=4096):
    return MockBackend(vocab_size=16, logits_fn=context_logits(), cache_tokens=cache_tokens)


def trajectories(result):
    return [(t.path, t.token_ids, t.finish_reason, t.text) for t in result.trajectories]


@pytest.mark.parametrize("tree", [
    TreeRollout(segment_len=4, branch_factor=2, max_width=8, first_split=2),
    TreeRollout(segment_len=3, branch_factor=3, max_width=6, first_split=1, budget_split="entropy"),
    TreeRollout(segment_len=5, max_width=6, first_split=2, fallback=True,
                early_stop=EarlyStop(answer=(), repeat_min_repeats=3, repeat_min_chars=6)),
])
@pytest.mark.parametrize("seed", [0, 3])
def test_engine_rollout_equals_the_driver(tree, seed):
    params = dict(max_new_tokens=14, seed=seed, temperature=1.0)
    (want,) = tree.run(ctx_backend(), [[1, 2, 3]], SamplingParams(**params))
    got = LLM(backend=ctx_backend()).rollout([{"role": "user", "content": "abc"}], tree=tree, **params)
    assert trajectories(got) == trajectories(want)
    assert got.stats["forward_tokens"] == want.stats["forward_tokens"]
    assert got.stats["num_fallbacks"] == want.stats["num_fallbacks"]


def test_rollout_and_chat_requests_advance_in_the_same_steps():
    backend = ctx_backend()
    engine = Engine(backend)
    tok = backend.tokenizer
    chat = engine.add_request(tok.encode("hello"), SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    tree = TreeStrategy(TreeRollout(segment_len=4, max_width=6, first_split=2, early_stop=None))
    rollout = engine.add_request(tok.encode("abc"), SamplingParams(max_new_tokens=12, seed=1), tree)
    steps_with_both = 0
    while engine.has_unfinished():
        events = engine.step()
        backend.cache.check_integrity()
        stats = engine.stats()
        assert stats["main_forwards"] <= stats["steps"]
        running = {s.request.request_id for s in engine.running}
        steps_with_both += {chat.request_id, rollout.request_id} <= running and any(
            e.request_id == chat.request_id for e in events)
    assert steps_with_both >= 5
    done = engine.pop_completion(rollout.request_id)
    (alone,) = TreeRollout(segment_len=4, max_width=6, first_split=2, early_stop=None).run(
        ctx_backend(), [tok.encode("abc")], SamplingParams(max_new_tokens=12, seed=1))
    assert [c.token_ids for c in done.choices] == [t.token_ids for t in alone.trajectories]  # choices: trajectories
    assert done.usage.completion_tokens == sum(len(t.token_ids) for t in alone.trajectories)
    assert len(engine.pop_completion(chat.request_id).token_ids) == 20
    assert backend.cache.num_open_handles == 0


def test_rollout_admission_reserves_its_worst_case_and_is_never_preempted():
    backend = ctx_backend(cache_tokens=160)
    engine = Engine(backend)
    tok = backend.tokenizer
    tree = TreeStrategy(TreeRollout(segment_len=4, max_width=6, first_split=2, early_stop=None))
    rollout = engine.add_request(tok.encode("abc"), SamplingParams(max_new_tokens=16, seed=2), tree)
    chats = [engine.add_request(tok.encode(p), SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))
             for p in ["hello", "bead", "kab"]]
    while engine.has_unfinished():
        engine.step()
        backend.cache.check_integrity()
    assert engine.get_request(rollout.request_id).seqs[0].num_preemptions == 0
    (alone,) = TreeRollout(segment_len=4, max_width=6, first_split=2, early_stop=None).run(
        ctx_backend(), [tok.encode("abc")], SamplingParams(max_new_tokens=16, seed=2))
    assert [c.token_ids for c in engine.pop_completion(rollout.request_id).choices] == [
        t.token_ids for t in alone.trajectories]
    for chat in chats:
        assert len(engine.pop_completion(chat.request_id).token_ids) == 30


def test_tree_strategy_by_name_and_validation():
    from decodekit.strategies import by_name

    strategy = by_name("tree", max_width=4, segment_len=8)
    assert isinstance(strategy, TreeStrategy) and strategy.config.max_width == 4
    llm = LLM(backend=ctx_backend())
    with pytest.raises(ValueError, match="n must be 1"):
        llm.generate("abc", strategy=strategy, n=2)
    out = llm.generate("abc", strategy=strategy, max_new_tokens=8, seed=0)
    assert len(out.choices) == 4 and out.stats.extra["tree"]["num_trajectories"] == 4
