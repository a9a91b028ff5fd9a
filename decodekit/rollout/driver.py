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

from decodekit.constraints.awrs import recursive_awrs
from decodekit.constraints.base import TokenChecker
from decodekit.rollout.budget import branch_weights, fallback_plan, next_width, split_budget
from decodekit.rollout.records import _Node, _Tree
from decodekit.sampling import entropy_bits, process_logits, sample_token


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
        self.checker = TokenChecker(config.constraint, backend.tokenizer) if config.constraint is not None else None
        self._invalid: torch.Tensor | None = None

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
                shares = self.cache.shares_uncached_prefix(tree.prompt_ids, [o.prompt_ids for o in batch])
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
            token = self._draw(leaf) if self.checker is not None else sample_token(
                leaf.next_logits, self.params, leaf.generator)
            if token < 0:
                self._finish(leaf, "constraint_failed")
                continue
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

    def _draw(self, leaf: _Node) -> int:
        """A constrained token by AWRS (-1 at a dead end); the path's importance weight grows by log Z."""
        logp = torch.log_softmax(process_logits(leaf.next_logits, self.params).double(), -1)
        logp = logp.masked_fill(self._no_bytes(logp.shape[-1]), float("-inf"))
        text = b"".join(self.checker.token_bytes[t] or b"" for t in leaf.output_ids)
        gen = None if self.params.greedy else leaf.generator
        draw = recursive_awrs(logp=logp, accept=self.checker.accept_fn(text), generator=gen)
        leaf.log_weight += draw.logw
        return draw.token if draw.logw > float("-inf") else -1

    def _no_bytes(self, vocab: int) -> torch.Tensor:
        """Tokens a constraint can never accept (special tokens other than EOS), masked before AWRS."""
        if self._invalid is None or self._invalid.shape[-1] != vocab:
            pieces = self.checker.token_bytes[:vocab]
            ok = [i for i, b in enumerate(pieces) if b is not None or i in self.checker.eos_ids]
            self._invalid = torch.ones(vocab, dtype=torch.bool)
            self._invalid[torch.tensor(ok, dtype=torch.long)] = False
        return self._invalid

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
