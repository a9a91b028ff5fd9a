"""Tree-structured segment rollouts (TreePO, 2025) over the shared KV cache.

Run by the engine (``TreeStrategy``): all live leaves of every prompt advance together, one token
per step, as rows of the step's shared forward, segment (``segment_len`` tokens) by segment. A leaf that
continues splits into children that fork its KV handle (shared prefix slots by reference, no
recomputation, no copy) and its next-token logits; finished leaves hand their branch budget to
live ones. Every computed token is computed once: forward tokens == prompt + unique tree tokens
(less the final token of paths that end without needing its logits).
"""

from __future__ import annotations

from dataclasses import dataclass

from decodekit.constraints.base import Constraint
from decodekit.rollout.budget import SPLIT_MODES, EarlyStop
from decodekit.rollout.records import RolloutResult
from decodekit.types import SamplingParams


@dataclass(frozen=True)
class TreeRollout:
    """Configuration of a tree rollout; ``run`` (or ``LLM.rollout``) executes it.

    Each prompt gets ``max_width`` trajectories: ``first_split`` paths from the prompt, each live
    leaf splitting into about ``branch_factor`` children per segment while the width budget lasts
    (``budget_split``: "even", "logprob" (less likely paths branch more) or "entropy" (uncertain
    segments branch more)). ``max_depth`` segments at most (default: as many as ``max_new_tokens``
    needs). ``early_stop`` ends paths on answer patterns / repetition (None: only EOS, stop strings
    and length). ``fallback``: when a prompt has no live path and spare width, re-branch finished
    paths from their last segment boundary. ``constraint`` (a ``decodekit.constraints`` Constraint):
    every token is drawn under it, from the exact llguidance mask where it has one (a matcher state
    per node; a fork starts from its parent's), else by AWRS; each path carries its importance weight
    (``log_weight``: exact log Z sums on the mask, AWRS's unbiased estimates otherwise) and whether
    its text is complete and valid (``valid``); a dead end ends it ("constraint_failed").
    """

    segment_len: int = 32
    branch_factor: int = 2
    max_width: int = 16
    max_depth: int | None = None
    first_split: int = 4
    budget_split: str = "even"
    early_stop: EarlyStop | None = EarlyStop()
    fallback: bool = True
    constraint: Constraint | None = None

    def __post_init__(self):
        for name in ("segment_len", "branch_factor", "max_width", "first_split"):
            _check_positive(name, getattr(self, name))
        if self.max_depth is not None:
            _check_positive("max_depth", self.max_depth)
        if self.first_split > self.max_width:
            raise ValueError(f"first_split ({self.first_split}) must be <= max_width ({self.max_width})")
        if self.budget_split not in SPLIT_MODES:
            raise ValueError(f"budget_split must be one of {SPLIT_MODES}, got {self.budget_split!r}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(f"constraint must be a decodekit Constraint (Regex, ...), got {self.constraint!r}")
        if self.early_stop is not None and not isinstance(self.early_stop, EarlyStop):
            raise ValueError(f"early_stop must be an EarlyStop or None, got {self.early_stop!r}")

    def run(self, backend, prompts: list[list[int]], params: SamplingParams,
            texts: list[str] | None = None) -> list[RolloutResult]:
        """Roll out every prompt (token ids) on ``backend``; one ``RolloutResult`` per prompt, in order.

        The engine runs it (``TreeStrategy``: one request per prompt, admitted as the KV budget allows
        each tree's worst case), so this is the same decode loop as ``LLM.rollout``. Every lane opened
        is released before returning (also on error); finished paths are committed to the prefix cache.
        A request-level backend (vLLM) that brings its own segment-level driver runs it instead.
        """
        if params.n != 1:
            raise ValueError("n must be 1 for a tree rollout: set TreeRollout(max_width=...) instead")
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token id lists")
        segment_level = getattr(backend, "tree_rollout", None)
        if segment_level is not None:
            return segment_level(prompts, self, params, texts=texts)
        from decodekit.driver import Driver
        from decodekit.engine import Engine
        from decodekit.strategies.tree_strategy import TreeStrategy

        driver = Driver(Engine(backend, max_batch_size=len(prompts)))
        texts = texts or [""] * len(prompts)
        done = driver.complete([(t, list(p)) for t, p in zip(texts, prompts)], params, TreeStrategy(self))
        return [c.stats.extra["rollout"] for c in done]


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


