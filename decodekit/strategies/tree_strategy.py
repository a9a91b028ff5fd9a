"""TreePO rollouts as an engine strategy: a rollout is one engine request whose tree leaves are rows
of the shared step forward, so rollouts run beside chat traffic (and through the server).

The request's prompt is prefilled by the engine; the tree's root forks its lane, and from then on
each step every live leaf that needs logits is one row of the step's forward (keyed by the leaf).
Sampling, stops, segment splits and fallback are the rollout driver's (``rollout.driver``), one token
per step; ``TreeRollout.run`` is this strategy on an engine, so there is one decode loop. A rollout
is not preempted: admission reserves its worst case (``max_width`` paths of ``max_new_tokens``).
The completion's choices are the trajectories; ``stats.extra["rollout"]`` is the ``RolloutResult``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from decodekit.rollout.driver import TreeDriver
from decodekit.rollout.records import RolloutResult, _Tree
from decodekit.rollout.tree import TreeRollout
from decodekit.strategies.base import Row, Strategy
from decodekit.types import Choice, Provenance


@dataclass
class TreeRun:
    driver: TreeDriver
    tree: _Tree
    started: float
    result: RolloutResult | None = None


class TreeStrategy(Strategy):
    """``TreeRollout`` settings run as engine requests (``LLM.rollout`` uses it; registry name ``"tree"``)."""

    name = "tree"
    preemptible = False

    def __init__(self, config: TreeRollout | None = None, **options):
        if config is not None and options:
            raise ValueError("give a TreeRollout or its options, not both")
        self.config = config if config is not None else TreeRollout(**options)
        if not isinstance(self.config, TreeRollout):
            raise ValueError(f"config must be a TreeRollout, got {self.config!r}")

    def validate(self, request) -> None:
        if request.params.n != 1:
            raise ValueError("n must be 1 for a tree rollout: set TreeRollout(max_width=...) instead")

    def lanes_per_sequence(self, request) -> int:
        return 1 + self.config.max_width

    def extra_slots(self, request) -> int:
        return self.config.max_width * self._max_tokens(request.params)

    def step_slots(self, seq) -> int:
        """The rest of the tree's worst case: a rollout is never preempted, so it keeps it free."""
        run = seq.state if isinstance(seq.state, TreeRun) else None
        computed = run.tree.decode_tokens if run is not None else 0
        return max(1, self.config.max_width * self._max_tokens(seq.params) - computed)

    def plan(self, ctx, seqs):
        rows = []
        for seq in seqs:
            run = seq.state if isinstance(seq.state, TreeRun) else self._start(ctx, seq)
            leaves = [leaf for leaf in run.tree.live if leaf.finish_reason is None and leaf.next_logits is None]
            rows += [Row(seq, [leaf.tokens[-1]], lane=leaf.lane, key=leaf) for leaf in leaves]
            run.driver.masks_beside_forward(leaves)
        return rows

    def update(self, ctx, seqs, rows):
        for row in rows:
            row.key.next_logits = row.logits[-1]
            row.key.tree.decode_tokens += 1
        for seq in seqs:
            run = seq.state
            _advance(run.driver, run.tree, self.config.segment_len)
            if not run.tree.live:
                self._done(ctx, seq, run)
        return {}

    def on_finish(self, ctx, seq) -> None:
        if isinstance(seq.state, TreeRun):
            seq.state.driver.drop_logits(seq.state.tree)

    def stats(self, seqs) -> dict:
        runs = [s.state for s in seqs if isinstance(s.state, TreeRun) and s.state.result is not None]
        return {"rollout": runs[0].result, "tree": runs[0].result.stats} if runs else {}

    def choices(self, request) -> tuple[Choice, ...] | None:
        run = request.seqs[0].state if request.seqs else None
        if not isinstance(run, TreeRun) or run.result is None:
            return None
        nodes = {n.node_id: n for n in run.result.nodes}
        return tuple(Choice(t.index, t.text, t.token_ids, _reason(t.finish_reason), None, _node_provenance(t, nodes))
                     for t in run.result.trajectories)

    # ---- internals ------------------------------------------------------------------------------
    def _start(self, ctx, seq) -> TreeRun:
        driver = TreeDriver(self.config, ctx, seq)
        tree = _Tree(0, seq.request.prompt_ids, seq.request.prompt)
        tree.prefill_tokens = seq.request.stats.prefill_tokens_computed
        driver.start(tree, seq.take_next_logits())
        seq.state = TreeRun(driver, tree, time.perf_counter())
        return seq.state

    def _done(self, ctx, seq, run: TreeRun) -> None:
        run.tree.wall_time_s = time.perf_counter() - run.started
        run.result = run.tree.result(ctx.tokenizer, self.config.constraint)
        ctx.finish(seq, "stop")

    def _max_tokens(self, params) -> int:
        limits = [params.max_new_tokens] + ([self.config.max_depth * self.config.segment_len]
                                            if self.config.max_depth else [])
        return min(limits)


def _advance(driver: TreeDriver, tree: _Tree, segment_len: int) -> None:
    """The driver's ``run_wave`` loop one token at a time: split once every live leaf reached the
    segment boundary, sample one token per leaf that has its logits, and when every leaf has
    finished let ``_grow`` fall back (re-branch) or end the tree (``tree.live`` empty)."""
    if _all_at_boundary(tree, segment_len):
        driver.grow(tree)
    active = [leaf for leaf in tree.live
              if leaf.finish_reason is None and len(leaf.tokens) < segment_len and leaf.next_logits is not None]
    if active:
        driver.sample(active)
        for leaf in active:
            if leaf.finish_reason is None:
                leaf.next_logits = None  # its new token is computed in the next step's forward
    if tree.live and all(leaf.finish_reason is not None for leaf in tree.live):
        driver.grow(tree)


def _all_at_boundary(tree: _Tree, segment_len: int) -> bool:
    return bool(tree.live) and any(leaf.finish_reason is None for leaf in tree.live) and all(
        leaf.finish_reason is not None or (len(leaf.tokens) == segment_len and leaf.next_logits is not None)
        for leaf in tree.live)


def _reason(reason: str) -> str:
    """OpenAI finish reasons: early stops on an answer or a repetition are stops."""
    return reason if reason in ("stop", "length", "constraint_failed") else "stop"


def _node_provenance(trajectory, nodes: dict) -> tuple[Provenance, ...]:
    """Each token of a trajectory tagged with the tree node (segment) that sampled it."""
    return tuple(Provenance("sampled", {"node": node_id}) for node_id in trajectory.path
                 for _ in nodes[node_id].token_ids)
