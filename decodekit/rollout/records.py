"""Tree rollout records (nodes, trajectories, per-prompt results) and the driver's mutable node state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from decodekit.rollout.advantages import grpo_advantages, tree_advantages
from decodekit.rollout.budget import find_answer


@dataclass(frozen=True)
class TreeNode:
    """One segment of the tree. The root (id 0, depth 0) holds the prompt and no tokens.

    ``cum_logprob`` sums the raw model log-probabilities of every token from the root to this node's
    end; ``finish_reason`` is None for a node that branched on (an inner node).
    """

    node_id: int
    parent: int | None
    depth: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    cum_logprob: float
    mean_entropy: float  # bits, over this segment's tokens (raw model distribution)
    finish_reason: str | None
    children: tuple[int, ...] = ()


@dataclass(frozen=True)
class Trajectory:
    """One complete path: every token from the root to a finished leaf.

    ``path`` is the node ids root..leaf; ``finish_reason`` is ``"stop"`` (EOS, stop token or stop
    string), ``"answer"`` (an answer pattern), ``"repetition"`` or ``"length"`` (max tokens / depth).
    ``logprobs`` are raw model log-probabilities (before temperature), like ``TokenInfo.logprob``;
    ``"constraint_failed"`` ends a constrained path with no valid continuation. ``sample_logprobs``
    are those of the distribution sampled from before truncation (``log_softmax(logits / T)``; the raw
    ones when T is 0 or 1), what RL trainers take. ``stop_token`` is the stop token (EOS) that ended the
    path, not part of ``token_ids``, and ``stop_logprob`` its sampling log-probability (else None).
    """

    index: int
    path: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    cum_logprob: float
    finish_reason: str
    answer: str | None = None
    log_weight: float = 0.0  # with a constraint: log importance weight (sum of AWRS log Z estimates)
    valid: bool | None = None  # with a constraint: is the text a complete valid output
    sample_logprobs: tuple[float, ...] = ()
    stop_token: int | None = None
    stop_logprob: float | None = None


@dataclass(frozen=True)
class RolloutResult:
    """A prompt's rollout tree, its trajectories and counters (``stats``)."""

    prompt: str
    prompt_token_ids: tuple[int, ...]
    nodes: tuple[TreeNode, ...]
    trajectories: tuple[Trajectory, ...]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [t.text for t in self.trajectories]

    @property
    def paths(self) -> list[tuple[int, ...]]:
        return [t.path for t in self.trajectories]

    def tree_advantages(self, rewards, **options) -> list[float]:
        """TreePO advantages of the trajectories (see ``advantages.tree_advantages``)."""
        return tree_advantages(self.paths, rewards, **options)

    def grpo_advantages(self, rewards, **options) -> list[float]:
        return grpo_advantages(rewards, **options)


class _Node:
    """A segment being grown (a leaf) or grown (an inner node keeping its KV lane and end logits)."""

    def __init__(self, tree: _Tree, parent: _Node | None, lane, logits, generator):
        self.tree, self.parent = tree, parent
        self.node_id = len(tree.nodes)
        self.depth = 0 if parent is None else parent.depth + 1
        self.prefix: list[int] = [] if parent is None else parent.output_ids
        self.prefix_logp = 0.0 if parent is None else parent.cum_logprob
        self.log_weight = 0.0 if parent is None else parent.log_weight  # constrained paths: importance weight
        self.lane, self.next_logits, self.generator = lane, logits, generator
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.sample_logprobs: list[float] = []  # log_softmax(logits / T) of each token
        self.stop_token: int | None = None  # the stop token that ended this leaf, with its sampling logprob
        self.stop_logprob: float | None = None
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

    def result(self, tokenizer, constraint=None) -> RolloutResult:
        trajectories = []
        for leaf in sorted(self.leaves(), key=_path):
            ids = leaf.output_ids
            text = leaf.text if leaf.text is not None else tokenizer.decode(ids)
            nodes = _path_nodes(leaf)
            logps = [lp for n in nodes for lp in n.logprobs]
            sample_logps = [lp for n in nodes for lp in n.sample_logprobs]
            trajectories.append(Trajectory(len(trajectories), _path(leaf), tuple(ids), text, tuple(logps),
                                           leaf.cum_logprob, leaf.finish_reason,
                                           find_answer(text, ("boxed", "gsm8k", "answer_is")), leaf.log_weight,
                                           None if constraint is None else constraint.complete_ok(text),
                                           tuple(sample_logps), leaf.stop_token, leaf.stop_logprob))
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
