"""Segment-level drivers on vLLM: tree rollouts (TreePO) and entropy-adaptive model switching.

vLLM gives no per-token control over its KV cache, so both run the way TreePO's own code does: one
vLLM request per segment whose prompt is the full context so far; vLLM's automatic prefix caching
finds the shared context (prompt + ancestors' segments) in its paged cache and computes only the
new tokens. The saving shows in ``num_cached_tokens`` of each request, reported as the shared-token
saving. Segments are batched: every live leaf of every prompt goes in one ``generate`` call.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from decodekit.output import StopRule
from decodekit.types import SamplingParams


@dataclass
class _Leaf:
    node_id: int
    parent: int | None
    depth: int
    prefix: list[int]  # output tokens before this segment
    seed: int | None
    tokens: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    finish_reason: str | None = None
    children: tuple[int, ...] = ()


def tree_rollout(backend, prompts: list[list[int]], config, params: SamplingParams,
                 texts: list[str] | None = None) -> list:
    """TreePO rollouts of token-id prompts on a ``VLLMBackend``; one ``RolloutResult`` per prompt.

    ``config`` is a ``decodekit.rollout.tree.TreeRollout``. Same tree shape rules as the
    transformers driver (first split, per-segment split by ``next_width`` / ``split_budget``, depth
    and length limits, early stops); not done here: the fallback re-branching. ``budget_split="entropy"``
    uses each segment's mean surprisal (-log p of the sampled token, whose mean estimates the entropy).
    """
    trees = [_VTree(backend, ids, config, params, i) for i, ids in enumerate(prompts)]
    start = time.perf_counter()
    while live := [(t, leaf) for t in trees for leaf in t.live]:
        outputs = _generate(backend, [t.prompt + leaf.prefix for t, leaf in live],
                            [t.segment_params(leaf) for t, leaf in live])
        for (tree, leaf), out in zip(live, outputs):
            tree.record(leaf, out)
        for tree in trees:
            tree.grow()
    wall = time.perf_counter() - start
    return [t.result((texts or [""] * len(prompts))[i], wall) for i, t in enumerate(trees)]


def _generate(backend, contexts: list[list[int]], sampling: list):
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(c)) for c in contexts]
    return backend.llm.generate(prompts, sampling, use_tqdm=False)


class _VTree:
    def __init__(self, backend, prompt_ids, config, params, index):
        self.backend, self.cfg, self.params = backend, config, params
        self.prompt = list(prompt_ids)
        limits = [params.max_new_tokens] + ([config.max_depth * config.segment_len] if config.max_depth else [])
        self.max_tokens = min(limits)
        self.max_depth = config.max_depth or -(-params.max_new_tokens // config.segment_len)
        self.stops = StopRule(params, backend.tokenizer.eos_token_ids, backend.max_context, self.max_tokens)
        self.base_seed = None if params.seed is None else params.seed + 1_000_003 * index
        self.nodes = [_Leaf(0, None, 0, [], self.base_seed)]
        self.nodes[0].finish_reason = None
        self.live = [self._child(self.nodes[0]) for _ in range(config.first_split)]
        self.num_finished = 0
        self.new_leaves: list[_Leaf] = []
        self.counts = {"submitted_prompt_tokens": 0, "cached_tokens": 0, "decode_tokens": 0, "num_requests": 0}

    def _child(self, parent: _Leaf) -> _Leaf:
        seed = None if self.base_seed is None else self.base_seed + len(self.nodes)
        leaf = _Leaf(len(self.nodes), parent.node_id, parent.depth + 1, parent.prefix + list(parent.tokens), seed)
        parent.children = (*parent.children, leaf.node_id)
        self.nodes.append(leaf)
        return leaf

    def segment_params(self, leaf: _Leaf):
        from vllm import SamplingParams as VParams

        p = self.params
        budget = min(self.cfg.segment_len, self.max_tokens - len(leaf.prefix))
        return VParams(max_tokens=budget, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                       seed=leaf.seed, stop=list(p.stop) or None, stop_token_ids=list(p.stop_token_ids) or None,
                       ignore_eos=p.ignore_eos, logprobs=0, detokenize=bool(p.stop))

    def record(self, leaf: _Leaf, out) -> None:
        c = out.outputs[0]
        ids = list(c.token_ids)
        eos = c.finish_reason == "stop" and not isinstance(c.stop_reason, str)
        if eos and ids and self.stops.before(ids[-1]) is not None:  # the one stop rule: a stop token is not output
            ids.pop()
        leaf.tokens = tuple(ids)
        leaf.logprobs = tuple(float(c.logprobs[i][t].logprob) for i, t in enumerate(ids)) if c.logprobs else ()
        self.counts["submitted_prompt_tokens"] += len(out.prompt_token_ids)
        self.counts["cached_tokens"] += out.num_cached_tokens or 0
        self.counts["decode_tokens"] += len(c.token_ids)
        self.counts["num_requests"] += 1
        leaf.finish_reason = self._stop_reason(leaf, c.finish_reason)

    def _stop_reason(self, leaf: _Leaf, vllm_reason: str | None) -> str | None:
        if vllm_reason == "stop":
            return "stop"
        text = None
        if self.cfg.early_stop is not None:
            text = self.backend.tokenizer.decode(leaf.prefix + list(leaf.tokens))
            reason = self.cfg.early_stop.reason(text)
            if reason is not None:
                return reason
        num_out = len(leaf.prefix) + len(leaf.tokens)
        if self.stops.length(num_out, len(self.prompt) + num_out) is not None or leaf.depth >= self.max_depth:
            return "length"
        return None

    def grow(self) -> None:
        from decodekit.rollout.budget import branch_weights, next_width, split_budget

        done = [leaf for leaf in self.live if leaf.finish_reason is not None]
        self.num_finished += len(done)
        cont = [leaf for leaf in self.live if leaf.finish_reason is None]
        self.live = []
        if not cont:
            return
        width = next_width(remaining=self.cfg.max_width - self.num_finished, num_live=len(cont),
                           num_finished_step=len(done), branch_factor=self.cfg.branch_factor)
        logps = [self._cum(leaf) / max(1, len(leaf.prefix) + len(leaf.tokens)) for leaf in cont]
        surprisal = [-sum(leaf.logprobs) / len(leaf.logprobs) / math.log(2) if leaf.logprobs else 0.0
                     for leaf in cont]
        weights = branch_weights(self.cfg.budget_split, mean_logprobs=logps, mean_entropies=surprisal)
        for leaf, count in zip(cont, split_budget(width, weights)):
            self.live.extend(self._child(leaf) for _ in range(max(1, count)))  # a live path always goes on

    def _cum(self, node: _Leaf) -> float:
        total = 0.0
        while node is not None:
            total += sum(node.logprobs)
            node = self.nodes[node.parent] if node.parent is not None else None
        return total

    def result(self, text: str, wall: float):
        from decodekit.rollout.budget import find_answer
        from decodekit.rollout.records import RolloutResult, Trajectory, TreeNode

        tok = self.backend.tokenizer
        nodes = tuple(TreeNode(n.node_id, n.parent, n.depth, n.tokens, tok.decode(n.tokens), n.logprobs,
                               self._cum(n), -sum(n.logprobs) / len(n.logprobs) / math.log(2) if n.logprobs else 0.0,
                               n.finish_reason if not n.children else None, n.children) for n in self.nodes)
        trajectories = []
        for n in self.nodes:
            if n.children or n.parent is None:
                continue
            ids = n.prefix + list(n.tokens)
            out_text = tok.decode(ids)
            logps = self._path_logprobs(n)
            trajectories.append(Trajectory(len(trajectories), self._path(n), tuple(ids), out_text, logps, sum(logps),
                                           n.finish_reason or "length",
                                           find_answer(out_text, ("boxed", "gsm8k", "answer_is"))))
        return RolloutResult(text, tuple(self.prompt), nodes, tuple(trajectories), self._stats(trajectories, wall))

    def _path(self, node: _Leaf) -> tuple[int, ...]:
        path = []
        while node is not None:
            path.append(node.node_id)
            node = self.nodes[node.parent] if node.parent is not None else None
        return tuple(path[::-1])

    def _path_logprobs(self, node: _Leaf) -> tuple[float, ...]:
        return tuple(lp for i in self._path(node) for lp in self.nodes[i].logprobs)

    def _stats(self, trajectories, wall: float) -> dict:
        c = self.counts
        computed = c["submitted_prompt_tokens"] - c["cached_tokens"] + c["decode_tokens"]
        independent = sum(len(self.prompt) + len(t.token_ids) for t in trajectories)  # one request per path
        return {**c, "backend": "vllm", "computed_tokens": computed, "independent_tokens": independent,
                "shared_token_saving": 1 - computed / independent if independent else 0.0,
                "prefix_cache_hit_rate": c["cached_tokens"] / c["submitted_prompt_tokens"]
                if c["submitted_prompt_tokens"] else 0.0,
                "tree_tokens": sum(len(n.tokens) for n in self.nodes), "num_nodes": len(self.nodes),
                "num_trajectories": len(trajectories), "trajectory_tokens": sum(len(t.token_ids) for t in trajectories),
                "max_depth": max(n.depth for n in self.nodes), "wall_time_s": wall}


# ---- entropy-adaptive switching ---------------------------------------------------------------
TOP_LOGPROBS = 20  # vLLM's default cap on returned logprobs


def entropy_from_top(logprobs: list[float]) -> float:
    """Entropy in bits from the top-k log-probabilities, the tail mass counted as one outcome.

    A lower bound of the full entropy; tight when the top k hold almost all the mass (the
    low-entropy positions where the rule keeps the small model)."""
    probs = [math.exp(lp) for lp in logprobs]
    tail = max(0.0, 1.0 - sum(probs))
    return -sum(p * math.log2(p) for p in probs + [tail] if p > 0)


def entropy_switch(small, large, prompt_ids: list[int], params: SamplingParams, *, threshold: float = 1.0,
                   window: int = 5, min_dwell: int = 4, segment_len: int = 16) -> dict:
    """Entropy-adaptive switching between two ``VLLMBackend``s at segment granularity.

    The active model generates up to ``segment_len`` tokens with its top-20 logprobs; walking them, the
    rolling mean entropy (``entropy.rolling_mean`` / ``choose_model``, the token-level strategy's rule)
    picks the writer of each position; at the first position that belongs to the other model the
    segment is cut there and the other model continues from the kept tokens (its prefix cache holds
    the context it saw before). Returns ``{"token_ids", "text", "finish_reason", "stats"}``.
    """
    from decodekit.strategies.entropy import LARGE, SMALL, choose_model, rolling_mean

    models = {SMALL: small, LARGE: large}
    active, since, out, entropies = LARGE, 0, [], []
    counts = {SMALL: 0, LARGE: 0, "num_switches": 0, "num_segments": 0, "cached_tokens": 0}
    finish = None
    while finish is None:
        segment = _entropy_segment(models[active], prompt_ids + out, params, len(out), segment_len, counts)
        finish = segment["finish_reason"]
        for token, top in zip(segment["ids"], segment["tops"]):
            entropies.append(entropy_from_top(top))
            writer = choose_model(active=active, mean_entropy=rolling_mean(entropies, window), threshold=threshold,
                                  since_switch=since, min_dwell=min_dwell)
            if writer != active:
                entropies.pop()  # the incoming model computes this position again
                active, since, finish = writer, 0, None
                counts["num_switches"] += 1
                break
            out.append(token)
            counts[active] += 1
            since += 1
        else:
            if finish is None and len(out) >= params.max_new_tokens:
                finish = "length"
    text = large.tokenizer.decode(out)
    total = counts[SMALL] + counts[LARGE]
    stats = {**{f"{k}_tokens" if k in (SMALL, LARGE) else k: v for k, v in counts.items()},
             "large_share": counts[LARGE] / total if total else 0.0, "backend": "vllm"}
    return {"token_ids": out, "text": text, "finish_reason": finish, "stats": stats}


def _entropy_segment(backend, context: list[int], params: SamplingParams, num_out: int, segment_len: int,
                     counts: dict) -> dict:
    from vllm import SamplingParams as VParams

    budget = min(segment_len, params.max_new_tokens - num_out)
    seed = None if params.seed is None else params.seed + num_out  # deterministic given the seed
    vp = VParams(max_tokens=budget, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                 min_p=params.min_p, seed=seed, stop_token_ids=list(params.stop_token_ids) or None,
                 ignore_eos=params.ignore_eos, logprobs=TOP_LOGPROBS, detokenize=False)
    out = _generate(backend, [context], [vp])[0]
    c = out.outputs[0]
    ids = list(c.token_ids)
    tops = [[lp.logprob for lp in c.logprobs[i].values()] for i in range(len(ids))]
    finish = None
    if c.finish_reason == "stop":
        if ids and (ids[-1] in backend.tokenizer.eos_token_ids or ids[-1] in params.stop_token_ids):
            ids, tops = ids[:-1], tops[:-1]
        finish = "stop"
    counts["num_segments"] += 1
    counts["cached_tokens"] += out.num_cached_tokens or 0
    return {"ids": ids, "tops": tops, "finish_reason": finish}
