"""Result records of tree rollouts: the tree (nodes) and the complete trajectories with their paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from decodekit.strategies.advantages import grpo_advantages, tree_advantages


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
    ``logprobs`` are raw model log-probabilities (before temperature), like ``TokenInfo.logprob``.
    """

    index: int
    path: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    cum_logprob: float
    finish_reason: str
    answer: str | None = None


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
