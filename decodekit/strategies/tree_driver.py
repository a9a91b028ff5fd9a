"""The tree-rollout driver: per-prompt trees of segments, batched segment decoding, splits, fallback.

Handles: each node owns one KV handle (the root: the prompt's); a child forks its parent's handle,
so a shared prefix lives once in the slot pool. A finished leaf commits its computed tokens to the
prefix cache and releases its handle; inner nodes keep theirs (and their end logits) until the
prompt is done, for fallback re-branching, then release them.
"""

from __future__ import annotations

import os
import time

import torch

from decodekit.sampling import entropy_bits, sample_token
from decodekit.strategies.tree_budget import branch_weights, fallback_plan, find_answer, next_width, split_budget
from decodekit.strategies.tree_types import RolloutResult, Trajectory, TreeNode

SHARED_PREFIX_DEFER = 16  # prefill a prompt sharing this many uncached tokens with another one round later


class _Node:
    """A segment being grown (a leaf) or grown (an inner node keeping its handle and end logits)."""

    def __init__(self, tree: _Tree, parent: _Node | None, handle, logits, generator):
        self.tree, self.parent = tree, parent
        self.node_id = len(tree.nodes)
        self.depth = 0 if parent is None else parent.depth + 1
        self.prefix: list[int] = [] if parent is None else parent.output_ids
        self.prefix_logp = 0.0 if parent is None else parent.cum_logprob
        self.handle, self.next_logits, self.generator = handle, logits, generator
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.entropies: list[float] = []
        self.children: list[_Node] = []
        self.finish_reason: str | None = None
        self.text: str | None = None  # output text so far (cut at a stop string), when tracked
        tree.nodes.append(self)

    @property
    def output_ids(self) -> list[int]:
        return self.prefix + self.tokens

    @property
    def cum_logprob(self) -> float:
        return self.prefix_logp + sum(self.logprobs)

    def record(self, tokenizer) -> TreeNode:
        mean_entropy = sum(self.entropies) / len(self.entropies) if self.entropies else 0.0
        return TreeNode(self.node_id, None if self.parent is None else self.parent.node_id, self.depth,
                        tuple(self.tokens), tokenizer.decode(self.tokens), tuple(self.logprobs),
                        self.cum_logprob, mean_entropy, self.finish_reason,
                        tuple(c.node_id for c in self.children))


class _Tree:
    """One prompt's tree and counters."""

    def __init__(self, index: int, prompt_ids: list[int], text: str):
        self.index, self.prompt_ids, self.text = index, list(prompt_ids), text
        self.nodes: list[_Node] = []
        self.root: _Node | None = None
        self.live: list[_Node] = []
        self.num_finished = 0
        self.num_fallbacks = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.wall_time_s = 0.0

    def leaves(self) -> list[_Node]:
        return [n for n in self.nodes if n.finish_reason is not None]

    def result(self, tokenizer) -> RolloutResult:
        trajectories = []
        for leaf in sorted(self.leaves(), key=_path):
            ids = leaf.output_ids
            text = leaf.text if leaf.text is not None else tokenizer.decode(ids)
            logps = [lp for n in _path_nodes(leaf) for lp in n.logprobs]
            trajectories.append(Trajectory(len(trajectories), _path(leaf), tuple(ids), text, tuple(logps),
                                           leaf.cum_logprob, leaf.finish_reason,
                                           find_answer(text, ("boxed", "gsm8k", "answer_is"))))
        tree_tokens = sum(len(n.tokens) for n in self.nodes)
        stats = {"forward_tokens": self.prefill_tokens + self.decode_tokens, "prefill_tokens": self.prefill_tokens,
                 "decode_tokens": self.decode_tokens, "tree_tokens": tree_tokens,
                 "trajectory_tokens": sum(len(t.token_ids) for t in trajectories), "num_nodes": len(self.nodes),
                 "num_trajectories": len(trajectories), "max_depth": max(n.depth for n in self.nodes),
                 "num_fallbacks": self.num_fallbacks, "wall_time_s": self.wall_time_s}
        return RolloutResult(self.text, tuple(self.prompt_ids), tuple(n.record(tokenizer) for n in self.nodes),
                             tuple(trajectories), stats)


def _path_nodes(node: _Node) -> list[_Node]:
    out = []
    while node is not None:
        out.append(node)
        node = node.parent
    return out[::-1]


def _path(node: _Node) -> tuple[int, ...]:
    return tuple(n.node_id for n in _path_nodes(node))


class _Driver:
    """Runs waves of trees on one backend with one set of sampling parameters."""

    def __init__(self, config, backend, params):
        self.cfg, self.backend, self.params = config, backend, params
        self.cache = backend.cache
        self.tokenizer = backend.tokenizer
        limits = [params.max_new_tokens] + ([config.max_depth * config.segment_len] if config.max_depth else [])
        self.max_tokens = min(limits)
        self.max_depth = config.max_depth or -(-params.max_new_tokens // config.segment_len)
        self.track_text = bool(params.stop) or config.early_stop is not None

    # ---- waves and prefill --------------------------------------------------------------------
    def waves(self, prompts: list[list[int]]):
        """Indices of prompts per wave: as many as fit the KV budget at worst (no sharing at all)."""
        need = [len(p) + self.cfg.max_width * self.max_tokens for p in prompts]
        for i, n in enumerate(need):
            if len(prompts[i]) >= self.backend.max_context:
                raise ValueError(f"prompt {i} has {len(prompts[i])} tokens, the model's context is "
                                 f"{self.backend.max_context}")
            if n > self.cache.capacity:
                raise ValueError(f"prompt {i} needs up to {n} KV slots (prompt + max_width * max tokens), the "
                                 f"cache budget is {self.cache.capacity}: lower max_width or max_new_tokens, "
                                 "or raise cache_tokens")
        i = 0
        while i < len(prompts):
            budget, wave = self.cache.available(), [i]
            budget -= need[i]
            i += 1
            while i < len(prompts) and need[i] <= budget:
                budget -= need[i]
                wave.append(i)
                i += 1
            yield wave

    def run_wave(self, trees: list[_Tree]) -> list[_Tree]:
        start = time.perf_counter()
        try:
            self._prefill(trees)
            for tree in trees:
                root = tree.root
                gens = [_seeded(self.params.seed, i) for i in range(self.cfg.first_split)]
                self._spawn(tree, root, gens)
            while live := [leaf for tree in trees for leaf in tree.live]:
                self._segment(live)
                for tree in trees:
                    self._grow(tree)
        finally:
            for tree in trees:
                self._release_all(tree)
        for tree in trees:
            tree.wall_time_s = time.perf_counter() - start
        return trees

    def _prefill(self, trees: list[_Tree]) -> None:
        """Prefill prompts in rounds so a prefix shared by several prompts is computed once."""
        pending = list(trees)
        while pending:
            batch, later = [], []
            for tree in pending:
                cached = len(self.cache.tree.match_prefix(tree.prompt_ids[:-1])[0])
                shares = any(_common_len(tree.prompt_ids, o.prompt_ids) >= max(SHARED_PREFIX_DEFER, cached + 1)
                             for o in batch)
                (later if shares else batch).append(tree)
            handles = [self.cache.open(t.prompt_ids) for t in batch]
            for tree, handle in zip(batch, handles):
                tree.prefill_tokens = len(tree.prompt_ids) - len(handle)
                tree.root = _Node(tree, None, handle, None, _seeded(self.params.seed, self.cfg.first_split))
            logits = self.backend.forward(handles, [t.prompt_ids[len(h):] for t, h in zip(batch, handles)])
            for tree, handle, row in zip(batch, handles, logits):
                self.cache.commit(handle, tree.prompt_ids)
                tree.root.next_logits = row[-1]
            pending = later

    # ---- one segment for every live leaf ------------------------------------------------------
    def _segment(self, leaves: list[_Node]) -> None:
        for _ in range(self.cfg.segment_len):
            active = [leaf for leaf in leaves if leaf.finish_reason is None and len(leaf.tokens) < self.cfg.segment_len]
            if not active:
                return
            self._sample(active)
            go = [leaf for leaf in active if leaf.finish_reason is None]
            if go:
                rows = self.backend.forward([leaf.handle for leaf in go], [[leaf.tokens[-1]] for leaf in go])
                for leaf, row in zip(go, rows):
                    leaf.next_logits = row[-1]
                    leaf.tree.decode_tokens += 1

    def _sample(self, leaves: list[_Node]) -> None:
        """Sample one token per leaf (its own generator, the engine's ``sample_token``) and check stops."""
        logits = torch.stack([leaf.next_logits for leaf in leaves])  # (B, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        entropy = entropy_bits(logits)  # (B,)
        for i, leaf in enumerate(leaves):
            token = sample_token(leaf.next_logits, self.params, leaf.generator)
            if token in self.params.stop_token_ids or (
                    token in self.tokenizer.eos_token_ids and not self.params.ignore_eos):
                self._finish(leaf, "stop")
                continue
            leaf.tokens.append(token)
            leaf.logprobs.append(float(logp[i, token]))
            leaf.entropies.append(float(entropy[i]))
            reason = self._stop_reason(leaf)
            if reason is not None:
                self._finish(leaf, reason)

    def _stop_reason(self, leaf: _Node) -> str | None:
        """Checks in the engine's order (stop string, then length), early stops between them."""
        if self.track_text:
            text = self.tokenizer.decode(leaf.output_ids)
            cuts = [i for s in self.params.stop if (i := text.find(s)) >= 0]
            leaf.text = text[: min(cuts)] if cuts else text
            if cuts:
                return "stop"
            reason = self.cfg.early_stop.reason(text) if self.cfg.early_stop is not None else None
            if reason is not None:
                return reason
        num_out = len(leaf.prefix) + len(leaf.tokens)
        if num_out >= self.max_tokens or len(leaf.tree.prompt_ids) + num_out >= self.backend.max_context:
            return "length"
        if len(leaf.tokens) == self.cfg.segment_len and leaf.depth >= self.max_depth:
            return "length"
        return None

    def _finish(self, leaf: _Node, reason: str) -> None:
        leaf.finish_reason = reason
        leaf.next_logits = None
        ids = leaf.tree.prompt_ids + leaf.output_ids
        self.cache.commit(leaf.handle, ids)  # the handle holds exactly the computed tokens
        self.cache.release(leaf.handle)
        leaf.handle = None
        leaf.tree.num_finished += 1

    # ---- growing the tree ---------------------------------------------------------------------
    def _grow(self, tree: _Tree) -> None:
        """After a segment: split continuing leaves by the budget, or fall back when none is left."""
        done = sum(leaf.finish_reason is not None for leaf in tree.live)
        live = [leaf for leaf in tree.live if leaf.finish_reason is None]
        tree.live = []
        if live:
            width = next_width(remaining=self.cfg.max_width - tree.num_finished, num_live=len(live),
                               num_finished_step=done, branch_factor=self.cfg.branch_factor)
            for leaf, count in zip(live, split_budget(width, self._weights(live))):
                gens = [leaf.generator] + [_derived(leaf.generator) for _ in range(count - 1)]
                self._spawn(tree, leaf, gens)
        elif self.cfg.fallback and tree.num_finished < self.cfg.max_width:
            self._fallback(tree)

    def _fallback(self, tree: _Tree) -> None:
        """Re-branch from the last segment boundary of finished paths (deepest boundaries first)."""
        seen, bounds = set(), []
        for leaf in tree.leaves():
            node = leaf.parent
            if node.node_id not in seen and node.next_logits is not None:
                seen.add(node.node_id)
                bounds.append(node)
        bounds.sort(key=lambda n: (-n.depth, n.node_id))
        plan = fallback_plan(self.cfg.max_width - tree.num_finished, self._weights(bounds), self.cfg.branch_factor)
        if sum(plan) == 0:
            return
        tree.num_fallbacks += 1
        for node, count in zip(bounds, plan):
            self._spawn(tree, node, [_derived(node.generator) for _ in range(count)])

    def _weights(self, nodes: list[_Node]) -> list[float]:
        mean_logp = [n.cum_logprob / max(1, len(n.output_ids)) for n in nodes]
        mean_ent = [sum(n.entropies) / len(n.entropies) if n.entropies else 0.0 for n in nodes]
        return branch_weights(self.cfg.budget_split, mean_logprobs=mean_logp, mean_entropies=mean_ent)

    def _spawn(self, tree: _Tree, parent: _Node, generators: list[torch.Generator]) -> None:
        """Children of ``parent``: each forks its handle (no copy) and starts from its end logits."""
        for gen in generators:
            child = _Node(tree, parent, self.cache.fork(parent.handle), parent.next_logits, gen)
            parent.children.append(child)
            tree.live.append(child)

    def _release_all(self, tree: _Tree) -> None:
        for node in tree.nodes:
            if node.handle is not None:
                self.cache.release(node.handle)
                node.handle = None
            node.next_logits = None


def _seeded(seed: int | None, index: int) -> torch.Generator:
    """The engine's per-sample generator: sample ``index`` of a request uses ``seed + index``."""
    value = seed + index if seed is not None else int.from_bytes(os.urandom(7), "little")
    return torch.Generator().manual_seed(value)


def _derived(parent: torch.Generator) -> torch.Generator:
    """A new child's generator, seeded from its parent's stream (deterministic given the seed)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=parent)))


def _common_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
