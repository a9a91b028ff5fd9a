"""The tree-rollout driver: one prompt's tree of segments grown token by token inside an engine request.

It decides, the engine computes: ``TreeStrategy`` plans one row per live leaf that needs logits and
hands the logits back; the driver samples each leaf's token (its own generator, the engine's
sampler; under a constraint the exact llguidance mask where the constraint has one, each node holding
its matcher state (a fork shares its parent's: states are values), AWRS otherwise; penalties and
``logit_bias`` with the leaf's own path as its history), applies the one stop rule
(``output.stop_reason``) plus the rollout's early stops, splits leaves at segment boundaries and
falls back when every path ended.

Lanes: each node owns one KV lane (the root: a fork of the request's prompt); a child forks its
parent's lane, so a shared prefix lives once in the KV cache. A finished leaf closes its lane,
committing its tokens to the prefix cache; inner nodes keep theirs (and their end logits) for
fallback re-branching; the engine releases whatever is left when the request ends.
"""

from __future__ import annotations

import os

import torch

from decodekit.constraints.awrs import recursive_awrs
from decodekit.constraints.base import TokenChecker
from decodekit.constraints.masking import mask_draws, mask_token_draw
from decodekit.constraints.tokens import constrained_logp
from decodekit.output import StopRule, stop_index
from decodekit.rollout.budget import branch_weights, fallback_plan, next_width, split_budget
from decodekit.rollout.records import _Node, _Tree
from decodekit.sampling import apply_penalties, entropy_bits, process_logits, sample_token


class TreeDriver:
    """Grows one request's tree with one set of sampling parameters, through the step context."""

    def __init__(self, config, ctx, seq):
        self.cfg, self.ctx, self.seq = config, ctx, seq
        self.params = params = seq.params
        self.tokenizer = ctx.tokenizer
        limits = [params.max_new_tokens] + ([config.max_depth * config.segment_len] if config.max_depth else [])
        self.max_tokens = min(limits)
        self.max_depth = config.max_depth or -(-params.max_new_tokens // config.segment_len)
        constraint = config.constraint
        self.checker = TokenChecker(constraint, ctx.tokenizer) if constraint is not None else None
        # llguidance's mask where the constraint has one: a matcher state per node (after its tokens)
        self.index = constraint.index(ctx.tokenizer) if constraint is not None and constraint.mask_grammar() else None
        self.states: dict[_Node, object] = {}
        self.stops = StopRule(params, ctx.tokenizer.eos_token_ids, ctx.max_context, self.max_tokens)

    # ---- one token per leaf -------------------------------------------------------------------
    def sample(self, leaves: list[_Node]) -> None:
        """Sample one token per leaf (its own generator, the engine's ``sample_token``) and check stops.
        Penalties see the leaf's path (prompt, then every token from the root); log-probabilities and
        entropies stay the raw model's."""
        logits = torch.stack([leaf.next_logits for leaf in leaves])  # (B, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        t = self.params.temperature
        sample_logp = logp if t in (0.0, 1.0) else torch.log_softmax(logits.float() / t, dim=-1)  # (B, V)
        entropy = entropy_bits(logits)  # (B,)
        for i, leaf in enumerate(leaves):
            penalized = apply_penalties(leaf.next_logits, self.params, leaf.tree.prompt_ids, leaf.output_ids)
            token = self._draw(leaf, penalized) if self.checker is not None else sample_token(
                penalized, self.params, leaf.generator)
            if token < 0:
                self._finish(leaf, "constraint_failed")
                continue
            reason = self.stops.before(token)
            if reason is not None:
                leaf.stop_token, leaf.stop_logprob = token, float(sample_logp[i, token])
                self._finish(leaf, reason)
                continue
            leaf.tokens.append(token)
            if self.index is not None:
                self.states[leaf] = self.index.next(self.states.get(leaf), token)
            leaf.logprobs.append(float(logp[i, token]))
            leaf.sample_logprobs.append(float(sample_logp[i, token]))
            leaf.entropies.append(float(entropy[i]))
            reason = self._stop_after(leaf)
            if reason is not None:
                self._finish(leaf, reason)

    def _draw(self, leaf: _Node, logits: torch.Tensor) -> int:
        """A constrained token (-1 at a dead end): from the exact mask of the leaf's matcher state (the
        weight grows by the exact log Z), else by AWRS (by its unbiased estimate of log Z)."""
        text = b"".join(self.checker.token_bytes[t] or b"" for t in leaf.output_ids)
        gen = None if self.params.greedy else leaf.generator
        state = self.states.get(leaf)
        if mask_draws(self.index, state):
            draw, _ = mask_token_draw(self.index, state, self.cfg.constraint, text, process_logits(logits, self.params),
                                      eos_ids=self.checker.eos_ids, pieces=self.checker.token_bytes,
                                      accept=self.checker.accept_fn(text), final=False, generator=gen, max_checks=0)
        else:
            logp = constrained_logp(logits, self.params, self.tokenizer)
            draw = recursive_awrs(logp=logp, accept=self.checker.accept_fn(text), generator=gen)
        leaf.log_weight += draw.logw
        return draw.token if draw.logw > float("-inf") else -1

    def _stop_after(self, leaf: _Node) -> str | None:
        """The engine's stop rule after a token (stop string, then length) with the rollout's early
        stops between them, then the tree's depth limit."""
        if self.params.stop or self.cfg.early_stop is not None:
            text = self.tokenizer.decode(leaf.output_ids)
            cut = stop_index(text, self.params.stop)
            leaf.text = text[:cut] if cut >= 0 else text
            if cut >= 0:
                return "stop"
            reason = self.cfg.early_stop.reason(text) if self.cfg.early_stop is not None else None
            if reason is not None:
                return reason
        num_out = len(leaf.prefix) + len(leaf.tokens)
        reason = self.stops.length(num_out, len(leaf.tree.prompt_ids) + num_out)
        if reason is None and len(leaf.tokens) == self.cfg.segment_len and leaf.depth >= self.max_depth:
            reason = "length"
        return reason

    def _finish(self, leaf: _Node, reason: str) -> None:
        leaf.finish_reason = reason
        leaf.next_logits = None
        ids = leaf.tree.prompt_ids + leaf.output_ids
        self.ctx.close_lane(self.seq, leaf.lane, commit=ids)  # the lane holds exactly the computed tokens
        leaf.lane = None
        leaf.tree.num_finished += 1

    # ---- growing the tree ---------------------------------------------------------------------
    def start(self, tree: _Tree, logits: torch.Tensor) -> None:
        """The root forks the request's prompt (computed by the engine) and splits ``first_split`` ways."""
        seed = self.params.seed
        tree.root = _Node(tree, None, self.ctx.fork_lane(self.seq), logits, seeded(seed, self.cfg.first_split))
        if self.index is not None:
            self.states[tree.root] = self.index.initial()
        self.spawn(tree, tree.root, [seeded(seed, i) for i in range(self.cfg.first_split)])

    def grow(self, tree: _Tree) -> None:
        """After a segment: split continuing leaves by the budget, or fall back when none is left."""
        done = sum(leaf.finish_reason is not None for leaf in tree.live)
        live = [leaf for leaf in tree.live if leaf.finish_reason is None]
        tree.live = []
        if live:
            width = next_width(remaining=self.cfg.max_width - tree.num_finished, num_live=len(live),
                               num_finished_step=done, branch_factor=self.cfg.branch_factor)
            for leaf, count in zip(live, split_budget(width, self._weights(live))):
                gens = [leaf.generator] + [derived(leaf.generator) for _ in range(count - 1)]
                self.spawn(tree, leaf, gens)
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
            self.spawn(tree, node, [derived(node.generator) for _ in range(count)])

    def _weights(self, nodes: list[_Node]) -> list[float]:
        mean_logp = [n.cum_logprob / max(1, len(n.output_ids)) for n in nodes]
        mean_ent = [sum(n.entropies) / len(n.entropies) if n.entropies else 0.0 for n in nodes]
        return branch_weights(self.cfg.budget_split, mean_logprobs=mean_logp, mean_entropies=mean_ent)

    def spawn(self, tree: _Tree, parent: _Node, generators: list[torch.Generator]) -> None:
        """Children of ``parent``: each forks its lane (no copy) and starts from its end logits."""
        for gen in generators:
            child = _Node(tree, parent, self.ctx.fork_lane(self.seq, parent.lane), parent.next_logits, gen)
            if self.index is not None:
                self.states[child] = self.states.get(parent)  # a value: shared until the child advances
            parent.children.append(child)
            tree.live.append(child)

    def masks_beside_forward(self, leaves: list[_Node]) -> None:
        """Queue the next masks of ``leaves`` (llguidance) to be filled while the step's forward runs."""
        states = [s for leaf in leaves if (s := self.states.get(leaf)) is not None]
        if states:
            self.ctx.beside_forward(lambda: self.index.prefetch(states))

    def drop_logits(self, tree: _Tree) -> None:
        """The tree is done: forget the logits and matcher states nodes kept for fallback (the engine
        releases the lanes)."""
        for node in tree.nodes:
            node.next_logits = None
            self.states.pop(node, None)


def seeded(seed: int | None, index: int) -> torch.Generator:
    """The engine's per-sample generator: sample ``index`` of a request uses ``seed + index``."""
    value = seed + index if seed is not None else int.from_bytes(os.urandom(7), "little")
    return torch.Generator().manual_seed(value)


def derived(parent: torch.Generator) -> torch.Generator:
    """A new child's generator, seeded from its parent's stream (deterministic given the seed)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=parent)))
