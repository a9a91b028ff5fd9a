"""TreePO rollouts as an engine strategy: a rollout is one engine request whose tree leaves are rows
of the shared step forward, so rollouts run beside chat traffic (and through the server).

The request's prompt is prefilled by the engine; the tree's root forks its handle, and from then on
each step every live leaf that needs logits is one row of the step's forward (keyed by the leaf).
Sampling, stops, segment splits and fallback are the rollout driver's own (``tree_driver``), so an
engine rollout equals ``TreeRollout.run`` token for token. A rollout is not preempted: admission
reserves its worst case (``max_width`` paths of ``max_new_tokens``), as ``TreeRollout.run`` does.
The completion's choices are the trajectories; ``stats.extra["rollout"]`` is the ``RolloutResult``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from decodekit.rollout.driver import _Driver, _seeded
from decodekit.rollout.records import RolloutResult, _Node, _Tree
from decodekit.rollout.tree import TreeRollout
from decodekit.strategies.base import Row, Strategy
from decodekit.types import Choice, Provenance


@dataclass
class TreeRun:
    driver: _Driver
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

    def extra_slots(self, request) -> int:
        return self.config.max_width * self._max_tokens(request.params)

    def step_slots(self, seq) -> int:
        """The rest of the tree's worst case: a rollout is never preempted, so it keeps it free."""
        run = seq.state if isinstance(seq.state, TreeRun) else None
        computed = run.tree.decode_tokens if run is not None else 0
        return max(1, self.config.max_width * self._max_tokens(seq.params) - computed)

    def plan(self, engine, seqs):
        rows = []
        for seq in seqs:
            run = seq.state if isinstance(seq.state, TreeRun) else self._start(engine, seq)
            rows += [Row(seq, [leaf.tokens[-1]], handle=leaf.handle, key=leaf) for leaf in run.tree.live
                     if leaf.finish_reason is None and leaf.next_logits is None]
        return rows

    def update(self, engine, seqs, rows):
        for row in rows:
            row.key.next_logits = row.logits[-1]
            row.key.tree.decode_tokens += 1
        for seq in seqs:
            run = seq.state
            _advance(run.driver, run.tree, self.config.segment_len)
            if not run.tree.live:
                self._done(engine, seq, run)
        return {}

    def on_finish(self, engine, seq) -> None:
        if isinstance(seq.state, TreeRun):
            seq.state.driver._release_all(seq.state.tree)

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
    def _start(self, engine, seq) -> TreeRun:
        driver = _Driver(self.config, engine.backend, seq.params)
        tree = _Tree(0, seq.request.prompt_ids, seq.request.prompt)
        tree.prefill_tokens = seq.request.stats.prefill_tokens_computed
        seed = seq.params.seed
        tree.root = _Node(tree, None, engine.backend.cache.fork(seq.handle), seq.take_next_logits(),
                          _seeded(seed, self.config.first_split))
        driver._spawn(tree, tree.root, [_seeded(seed, i) for i in range(self.config.first_split)])
        seq.state = TreeRun(driver, tree, time.perf_counter())
        return seq.state

    def _done(self, engine, seq, run: TreeRun) -> None:
        run.driver._release_all(run.tree)
        run.tree.wall_time_s = time.perf_counter() - run.started
        run.result = run.tree.result(engine.tokenizer, self.config.constraint)
        engine.finish(seq, "stop")

    def _max_tokens(self, params) -> int:
        limits = [params.max_new_tokens] + ([self.config.max_depth * self.config.segment_len]
                                            if self.config.max_depth else [])
        return min(limits)


def _advance(driver: _Driver, tree: _Tree, segment_len: int) -> None:
    """The driver's ``run_wave`` loop one token at a time: split once every live leaf reached the
    segment boundary, sample one token per leaf that has its logits, and when every leaf has
    finished let ``_grow`` fall back (re-branch) or end the tree (``tree.live`` empty)."""
    if _all_at_boundary(tree, segment_len):
        driver._grow(tree)
    active = [leaf for leaf in tree.live
              if leaf.finish_reason is None and len(leaf.tokens) < segment_len and leaf.next_logits is not None]
    if active:
        driver._sample(active)
        for leaf in active:
            if leaf.finish_reason is None:
                leaf.next_logits = None  # its new token is computed in the next step's forward
    if tree.live and all(leaf.finish_reason is not None for leaf in tree.live):
        driver._grow(tree)


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
