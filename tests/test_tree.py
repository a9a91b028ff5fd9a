"""Tree rollouts (TreePO): pure budget / early-stop / advantage functions, then the driver on the mock
backend (exact: plain-sampling parity, no-cache recomputation, forward tokens, cache integrity),
then a short real-model check."""

from __future__ import annotations

import math

import pytest
import torch

from decodekit import LLM
from decodekit.backends.mock import MockBackend
from decodekit.rollout.advantages import grpo_advantages, tree_advantages
from decodekit.rollout.budget import (
    NO_EARLY_STOP,
    EarlyStop,
    branch_weights,
    fallback_plan,
    find_answer,
    is_repetitive,
    next_width,
    split_budget,
)
from decodekit.rollout.tree import TreeRollout
from decodekit.types import SamplingParams

# ---- pure functions ---------------------------------------------------------------------------


def test_next_width_hands_finished_budget_to_live_leaves():
    assert next_width(remaining=16, num_live=4, num_finished_step=0, branch_factor=2) == 8
    assert next_width(remaining=16, num_live=3, num_finished_step=1, branch_factor=2) == 8  # 1 finished: +2
    assert next_width(remaining=5, num_live=4, num_finished_step=0, branch_factor=2) == 5  # capped
    assert next_width(remaining=4, num_live=4, num_finished_step=4, branch_factor=1) == 4  # >= one per live
    assert next_width(remaining=9, num_live=0, num_finished_step=3, branch_factor=2) == 0


def test_split_budget_at_least_one_each_and_proportional():
    assert split_budget(8, [1, 1, 1, 1]) == [2, 2, 2, 2]
    assert split_budget(3, [1, 1, 1]) == [1, 1, 1]
    assert split_budget(7, [1, 1, 1]) == [3, 2, 2]  # ties go to the earlier leaf
    assert split_budget(10, [3, 1]) == [7, 3]  # 8 extra: 6 and 2
    assert split_budget(2, [1, 1, 1]) == [1, 1, 1]  # never fewer than one per live leaf
    for width, w in [(13, [0.1, 0.5, 0.2, 0.2]), (16, [1e-9, 1.0]), (5, [0, 0, 0])]:
        counts = split_budget(width, w)
        assert sum(counts) == max(width, len(w)) and min(counts) >= 1


def test_branch_weights_favour_uncertain_paths():
    lp = branch_weights("logprob", mean_logprobs=[-0.1, -2.0, -1.0], mean_entropies=[0, 0, 0])
    assert lp[1] > lp[2] > lp[0] and math.isclose(sum(lp), 1.0)
    ent = branch_weights("entropy", mean_logprobs=[0, 0, 0], mean_entropies=[3.0, 0.5, 1.0])
    assert ent[0] > ent[2] > ent[1]
    assert branch_weights("even", mean_logprobs=[1, 2], mean_entropies=[1, 2]) == [1.0, 1.0]
    assert branch_weights("entropy", mean_logprobs=[0, 0], mean_entropies=[2.0, 2.0]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="budget_split"):
        branch_weights("uniform", mean_logprobs=[0], mean_entropies=[0])


def test_fallback_plan():
    assert fallback_plan(6, [1, 1], 2) == [2, 2]  # min(spare, b * candidates)
    assert fallback_plan(3, [1, 1], 2) == [2, 1]
    assert fallback_plan(1, [0.2, 0.8, 0.8], 2) == [0, 1, 0]  # heaviest first, ties to the earlier
    assert fallback_plan(0, [1.0], 2) == [0]


def test_find_answer_patterns():
    assert find_answer("so #### 42\n", ("gsm8k",)) == "42"
    assert find_answer("so #### 42", ("gsm8k",)) is None  # the number may go on
    assert find_answer("so #### 4.", ("gsm8k",)) is None
    assert find_answer("so #### 4.5 dollars", ("gsm8k",)) == "4.5"
    assert find_answer("#### 1,200.", ("gsm8k",)) is None
    assert find_answer("#### 1,200. Done", ("gsm8k",)) == "1,200"
    assert find_answer(r"thus \boxed{\frac{1}{2}} ok", ("boxed",)) == r"\frac{1}{2}"
    assert find_answer(r"thus \boxed{\frac{1}{2", ("boxed",)) is None
    assert find_answer("The answer is 7.", ("answer_is",)) is None
    assert find_answer("The answer is 7. ", ("answer_is",)) == "7"
    assert find_answer("x=12;", (r"x=(\d+);",)) == "12"
    assert find_answer("nothing", ("boxed", "gsm8k")) is None


def test_is_repetitive():
    kw = dict(min_repeats=4, min_chars=12, max_unit=8)
    assert is_repetitive("intro " + "abc " * 4, **kw)  # 16 chars of period 4
    assert not is_repetitive("intro " + "abc " * 2, **kw)
    assert is_repetitive("x" + "z" * 12, **kw)  # period 1 needs min_chars
    assert not is_repetitive("x" + "z" * 11, **kw)
    assert not is_repetitive("the quick brown fox jumps over the lazy dog", **kw)
    assert is_repetitive("so " + "ab" * 7 + "a", **kw)  # mid-unit ending still periodic


def test_early_stop_and_config_validation():
    stop = EarlyStop(answer=("gsm8k",), repeat_min_repeats=3, repeat_min_chars=6, repeat_max_unit=4)
    assert stop.reason("#### 5\n") == "answer"
    assert stop.reason("hello lalala") == "repetition"
    assert stop.reason("hello") is None
    with pytest.raises(ValueError, match="answer pattern"):
        EarlyStop(answer=("(unclosed",))
    with pytest.raises(ValueError, match="repeat_min_repeats"):
        EarlyStop(repeat_min_repeats=1)
    for kwargs, name in [({"segment_len": 0}, "segment_len"), ({"branch_factor": 1.5}, "branch_factor"),
                         ({"max_width": 2, "first_split": 4}, "first_split"), ({"budget_split": "x"}, "budget_split"),
                         ({"max_depth": 0}, "max_depth"), ({"early_stop": "yes"}, "early_stop")]:
        with pytest.raises(ValueError, match=name):
            TreeRollout(**kwargs)


def test_advantages_on_hand_made_tree():
    # root 0 -> 1 -> {3, 4, 5}; root 0 -> 2 (a leaf). Rewards A=1, B=0, C=0, D=1.
    paths = [(0, 1, 3), (0, 1, 4), (0, 2), (0, 1, 5)]
    rewards = [1.0, 0.0, 0.0, 1.0]
    # groups with > 1 member: root (mean 1/2, std 1/2) and node 1 (A, B, D: mean 2/3, std sqrt(2)/3)
    a = ((1 - 0.5) + (1 - 2 / 3)) / 2
    b = ((0 - 0.5) + (0 - 2 / 3)) / 2
    c = -0.5
    assert tree_advantages(paths, rewards, normalize=None) == pytest.approx([a, b, c, a])
    assert tree_advantages(paths, rewards, normalize="global", eps=0) == pytest.approx([2 * a, 2 * b, 2 * c, 2 * a])
    s1 = math.sqrt(2) / 3
    ga = ((1 - 0.5) / 0.5 + (1 - 2 / 3) / s1) / 2
    gb = ((0 - 0.5) / 0.5 + (0 - 2 / 3) / s1) / 2
    assert tree_advantages(paths, rewards, normalize="group", eps=0) == pytest.approx([ga, gb, -1.0, ga])
    assert grpo_advantages(rewards, eps=0) == pytest.approx([1, -1, -1, 1])
    assert grpo_advantages(rewards, normalize=False) == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert tree_advantages([(0, 1)], [3.0]) == [0.0]
    with pytest.raises(ValueError, match="normalize"):
        tree_advantages(paths, rewards, normalize="batch")
    with pytest.raises(ValueError, match="length"):
        tree_advantages(paths, rewards[:3])


# ---- the driver on the mock backend ------------------------------------------------------------


def context_logits(vocab: int = 16, seed: int = 1):
    """Logits that depend on the whole context (order and length), so any cache mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    table, bigram = torch.randn((97, vocab), generator=g) * 1.5, torch.randn((vocab, vocab), generator=g) * 1.5

    def fn(ctx):
        h = sum((i + 1) * t for i, t in enumerate(ctx)) % 97
        out = table[h] + bigram[ctx[-1]]
        out[0] -= 2.0  # EOS now and then, not at once
        return out

    return fn


@pytest.fixture
def ctx_mock():
    return MockBackend(vocab_size=16, logits_fn=context_logits(), cache_tokens=4096)


@pytest.mark.parametrize("segment_len", [64, 5])
def test_branch_factor_one_equals_plain_sampling(ctx_mock, segment_len):
    llm = LLM(backend=ctx_mock)
    prompts = ["abc", "hello", "ab"]
    tree = TreeRollout(segment_len=segment_len, branch_factor=1, max_width=4, first_split=4, early_stop=None)
    sampling = dict(max_new_tokens=24, seed=11, temperature=0.9, top_k=12, stop=["q"])
    got = llm.rollout(prompts, tree=tree, **sampling)
    want = llm.generate(prompts, n=4, logprobs=0, **sampling)
    for result, completion in zip(got, want):
        assert [t.token_ids for t in result.trajectories] == [c.token_ids for c in completion.choices]
        assert [t.text for t in result.trajectories] == [c.text for c in completion.choices]
        assert [t.finish_reason for t in result.trajectories] == [c.finish_reason for c in completion.choices]
        for t, c in zip(result.trajectories, completion.choices):
            assert t.logprobs == pytest.approx([i.logprob for i in c.logprobs], abs=1e-5)
    assert {t.finish_reason for r in got for t in r.trajectories} >= {"stop", "length"}  # both paths exercised


def _recompute(backend, prompt_ids, tokens):
    return [float(torch.log_softmax(backend.exact_logits(list(prompt_ids) + list(tokens[:j])), -1)[tok])
            for j, tok in enumerate(tokens)]


@pytest.mark.parametrize("split", ["even", "logprob", "entropy"])
def test_trajectories_equal_no_cache_recomputation(ctx_mock, split):
    tree = TreeRollout(segment_len=4, branch_factor=2, max_width=8, first_split=2, budget_split=split,
                       early_stop=NO_EARLY_STOP)
    results = tree.run(ctx_mock, [[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=20, seed=3))
    for result in results:
        nodes = {n.node_id: n for n in result.nodes}
        assert len(result.trajectories) == 8
        for traj in result.trajectories:
            assert traj.path[0] == 0 and nodes[traj.path[-1]].finish_reason == traj.finish_reason
            assert list(traj.token_ids) == [t for i in traj.path for t in nodes[i].token_ids]
            assert traj.logprobs == pytest.approx(_recompute(ctx_mock, result.prompt_token_ids, traj.token_ids),
                                                  abs=1e-5)
            assert traj.cum_logprob == pytest.approx(sum(traj.logprobs), abs=1e-5)
            assert nodes[traj.path[-1]].cum_logprob == pytest.approx(traj.cum_logprob, abs=1e-5)
        assert max(n.depth for n in result.nodes) > 1 and any(len(n.children) > 1 for n in result.nodes[1:])


def _computed_tree_tokens(result) -> int:
    """Tokens stored in the tree's nodes that went through the model: all but the last token of a leaf
    that ended without needing its logits (length / answer / repetition; EOS needed them)."""
    stored = sum(len(n.token_ids) for n in result.nodes)
    return stored - sum(1 for n in result.nodes if n.finish_reason not in (None, "stop") and n.token_ids)


def test_forward_tokens_equal_unique_tree_tokens(ctx_mock):
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    params = SamplingParams(max_new_tokens=32, seed=5)
    before = ctx_mock.num_forward_tokens
    tree = TreeRollout(segment_len=6, branch_factor=2, max_width=8, first_split=2, early_stop=NO_EARLY_STOP)
    results = tree.run(ctx_mock, prompts, params)
    used = ctx_mock.num_forward_tokens - before
    assert used == sum(len(p) for p in prompts) + sum(_computed_tree_tokens(r) for r in results)
    for r in results:
        nodes = {n.node_id: n for n in r.nodes}
        # every trajectory token lies in exactly one node; nodes shared by paths are stored (and computed) once
        by_path = sum(len(nodes[i].token_ids) for t in r.trajectories for i in set(t.path))
        assert by_path >= r.stats["tree_tokens"] == sum(len(n.token_ids) for n in r.nodes)
        assert r.stats["forward_tokens"] == len(r.prompt_token_ids) + _computed_tree_tokens(r)
    independent = sum(len(t.token_ids) for r in results for t in r.trajectories)
    assert sum(r.stats["tree_tokens"] for r in results) < 0.8 * independent


def test_cache_integrity_and_released_handles(ctx_mock):
    cache = ctx_mock.cache
    tree = TreeRollout(segment_len=3, branch_factor=3, max_width=9, first_split=1, early_stop=NO_EARLY_STOP)
    results = tree.run(ctx_mock, [[1, 2], [1, 2, 3], [9]], SamplingParams(max_new_tokens=15, seed=0))
    assert cache.num_open_handles == 0
    cache.check_integrity()
    assert cache.pool.num_free + cache.tree.num_cached_tokens == cache.capacity  # no slot leaked
    # committed paths are reused: the same rollout again computes only one token per prompt's prefill
    before = ctx_mock.num_forward_tokens
    again = tree.run(ctx_mock, [[1, 2], [1, 2, 3], [9]], SamplingParams(max_new_tokens=15, seed=0))
    assert [r.texts for r in again] == [r.texts for r in results]
    assert sum(r.stats["prefill_tokens"] for r in again) == 3
    assert ctx_mock.num_forward_tokens - before == 3 + sum(r.stats["decode_tokens"] for r in again)


def test_handles_released_when_the_backend_fails():
    calls = {"n": 0}
    base = context_logits()

    def flaky(ctx):
        calls["n"] += 1
        if calls["n"] > 40:
            raise RuntimeError("device lost")
        return base(ctx)

    backend = MockBackend(vocab_size=16, logits_fn=flaky, cache_tokens=1024)
    with pytest.raises(RuntimeError, match="device lost"):
        TreeRollout(segment_len=4, max_width=6).run(backend, [[1, 2]], SamplingParams(max_new_tokens=30, seed=1))
    assert backend.cache.num_open_handles == 0
    backend.cache.check_integrity()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_width_budget_and_fallback(seed):
    # EOS is likely: many paths end early, their budget goes to live ones, fallback fills the rest
    backend = MockBackend(vocab_size=8, seed=seed, cache_tokens=4096)
    tree = TreeRollout(segment_len=3, branch_factor=2, max_width=8, first_split=2, early_stop=NO_EARLY_STOP)
    (result,) = tree.run(backend, [[1, 2]], SamplingParams(max_new_tokens=12, seed=seed))
    assert len(result.trajectories) == 8
    assert sum(1 for n in result.nodes if n.depth == 1 and n.parent == 0) >= 2
    for depth in range(1, result.stats["max_depth"] + 1):
        assert sum(1 for n in result.nodes if n.depth == depth) <= 8
    no_fb = TreeRollout(segment_len=3, branch_factor=2, max_width=8, first_split=2, early_stop=NO_EARLY_STOP,
                        fallback=False)
    (plain,) = no_fb.run(backend, [[1, 2]], SamplingParams(max_new_tokens=12, seed=seed))
    assert len(plain.trajectories) <= 8 and plain.stats["num_fallbacks"] == 0
    assert backend.cache.num_open_handles == 0


def test_fallback_rebranches_from_segment_boundary():
    # first token after the prompt is EOS half the time: fallback must re-branch
    backend = MockBackend(vocab_size=8, seed=4, cache_tokens=4096)
    tree = TreeRollout(segment_len=2, branch_factor=2, max_width=6, first_split=1, early_stop=NO_EARLY_STOP)
    results = tree.run(backend, [[i] for i in range(1, 8)], SamplingParams(max_new_tokens=4, seed=0))
    assert any(r.stats["num_fallbacks"] > 0 for r in results)
    assert all(len(r.trajectories) == 6 for r in results)


def test_early_stop_answer_and_repetition():
    backend = MockBackend(vocab_size=40, seed=2, cache_tokens=8192)
    stop = EarlyStop(answer=(r"(\d\d)",), repeat_min_repeats=0)
    (r,) = TreeRollout(segment_len=8, max_width=8, early_stop=stop).run(
        backend, [[5]], SamplingParams(max_new_tokens=60, seed=0, ignore_eos=True))
    answered = [t for t in r.trajectories if t.finish_reason == "answer"]
    assert answered
    for t in answered:
        assert find_answer(t.text, (r"(\d\d)",)) is not None and find_answer(t.text[:-1], (r"(\d\d)",)) is None
    # a context that always continues "ab" loops at once
    loop = MockBackend(vocab_size=4, logits_fn=lambda ctx: torch.tensor([0.0, 0.0, 0.0, 0.0]).index_fill_(
        0, torch.tensor([1 if ctx[-1] == 2 else 2]), 30.0), cache_tokens=2048)
    (r,) = TreeRollout(segment_len=8, max_width=2, first_split=2).run(
        loop, [[1]], SamplingParams(max_new_tokens=100, seed=0))
    assert {t.finish_reason for t in r.trajectories} == {"repetition"}
    assert all(len(t.token_ids) == 48 for t in r.trajectories)  # repeat_min_chars of "ba"


def test_rollout_api_and_determinism(ctx_mock):
    llm = LLM(backend=ctx_mock)
    tree = TreeRollout(segment_len=4, max_width=6, first_split=2)
    one = llm.rollout("abc", tree=tree, max_new_tokens=16, seed=9)
    two = llm.rollout(["abc"], tree=tree, max_new_tokens=16, seed=9)[0]
    assert one.texts == two.texts and one.prompt == "abc"
    assert one.tree_advantages([1.0] * 6) == [0.0] * 6
    with pytest.raises(ValueError, match="n must be 1"):
        llm.rollout("abc", tree=tree, n=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.rollout("abc", tree=tree, max_new_tokens=0)
    with pytest.raises(ValueError, match="cache budget"):
        TreeRollout(max_width=64).run(MockBackend(cache_tokens=256), [[1]], SamplingParams(max_new_tokens=64))


# ---- real model --------------------------------------------------------------------------------


@pytest.mark.real
def test_smollm_trajectories_equal_no_cache_forward(smollm):
    prompt = smollm.tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}])
    tree = TreeRollout(segment_len=4, branch_factor=2, max_width=4, first_split=2, early_stop=None)
    before = smollm.num_forward_tokens
    (r,) = tree.run(smollm, [prompt], SamplingParams(max_new_tokens=8, seed=0, temperature=1.0))
    assert smollm.num_forward_tokens - before == r.stats["forward_tokens"]
    assert len(r.trajectories) == 4 and r.stats["tree_tokens"] < r.stats["trajectory_tokens"]
    width = max(len(t.token_ids) for t in r.trajectories)
    rows = [list(prompt) + list(t.token_ids) + [0] * (width - len(t.token_ids)) for t in r.trajectories]
    with torch.inference_mode():  # one no-cache forward; right padding does not change causal logits
        ids = torch.tensor(rows, device=smollm.model.device)
        logp = torch.log_softmax(smollm.model(ids).logits.float(), -1)  # (B, T, V)
    for b, t in enumerate(r.trajectories):
        want = [float(logp[b, len(prompt) - 1 + j, tok]) for j, tok in enumerate(t.token_ids)]
        assert t.logprobs == pytest.approx(want, abs=2e-3)
    assert smollm.cache.num_open_handles == 0
    smollm.cache.check_integrity()


def test_constrained_segments(ctx_mock):
    from decodekit.constraints import Regex

    regex = Regex(r"[a-c]{3,6}")
    tree = TreeRollout(segment_len=2, max_width=6, first_split=2, early_stop=None, constraint=regex)
    (r,) = tree.run(ctx_mock, [[4, 5]], SamplingParams(max_new_tokens=10, seed=2))
    assert len(r.trajectories) == 6
    for t in r.trajectories:
        assert t.valid and t.finish_reason == "stop" and 3 <= len(t.text) <= 6
        assert math.isfinite(t.log_weight) and t.log_weight <= 1e-9  # a product of local normalisers Z <= 1
    assert ctx_mock.cache.num_open_handles == 0
    with pytest.raises(ValueError, match="constraint"):
        TreeRollout(constraint="[a-c]+")


def _masked_log_z(backend, prompt: list[int], tokens: list[int], allowed_at) -> float:
    """Sum over positions of log Z = log of the mass the mask allows there (temperature 1)."""
    total = 0.0
    for j in range(len(tokens) + 1):
        logp = torch.log_softmax(backend.exact_logits(prompt + tokens[:j]).double(), -1)
        total += float(torch.logsumexp(logp[sorted(allowed_at(j))], 0))
    return total


@pytest.mark.parametrize("shape", ["flat", "branching"])
def test_constrained_leaves_draw_from_the_exact_mask(shape, one_thread):
    """A constraint with a mask grammar (llguidance): each tree node holds a matcher state (forks share
    their parent's), every leaf draws from the exact masked distribution: paths are valid, a path's log
    weight is exactly the sum of its positions' log Z (AWRS would give a random unbiased estimate), and
    the first two tokens follow the masked reference (chi-square)."""
    from test_speculative import chi2_pvalue

    from decodekit.constraints import Regex

    n, vocab, letters = (1500, 16, "abcdefgh") if shape == "flat" else (8, 16, "abcdefgh")
    target = MockBackend(vocab_size=vocab, seed=0, cache_tokens=n * 12 + 256)
    regex = Regex(f"[{letters}]{{4}}")
    assert regex.mask_grammar() is not None
    tree = (TreeRollout(segment_len=2, branch_factor=1, max_width=n, first_split=n, early_stop=None, fallback=False,
                        constraint=regex) if shape == "flat" else
            TreeRollout(segment_len=1, branch_factor=2, max_width=n, first_split=2, early_stop=None, constraint=regex))
    result = LLM(backend=target).rollout("abcab", tree, max_new_tokens=6, seed=3, temperature=1.0)
    prompt = target.tokenizer.encode("abcab")
    ids = {target.tokenizer.encode(c)[0] for c in letters}
    eos = set(target.tokenizer.eos_token_ids)
    assert len(result.trajectories) == n
    for t in result.trajectories:
        assert t.valid and t.finish_reason == "stop" and len(t.token_ids) == 4
        want = _masked_log_z(target, prompt, list(t.token_ids), lambda j: ids if j < 4 else eos)
        assert t.log_weight == pytest.approx(want, abs=1e-6)
    if shape == "branching":
        assert max(node.depth for node in result.nodes) >= 4 and len(result.nodes) > n
    else:
        counts = torch.zeros(vocab * vocab)
        for t in result.trajectories:
            counts[t.token_ids[0] * vocab + t.token_ids[1]] += 1
        first = torch.log_softmax(target.exact_logits(prompt).double(), -1).exp()
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[sorted(ids)] = True
        first = first.masked_fill(~keep, 0) / first.masked_fill(~keep, 0).sum()
        second = torch.stack([torch.log_softmax(target.exact_logits(prompt + [a]).double(), -1).exp() for a in
                              range(vocab)]).masked_fill(~keep, 0)
        second = second / second.sum(-1, keepdim=True)
        assert chi2_pvalue(counts, (first.unsqueeze(1) * second).flatten().float()) > 1e-3
    assert target.cache.num_open_handles == 0
