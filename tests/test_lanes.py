"""The engine owns every KV lane: a hypothesis state machine drives lanes through the step context
(forks of the main KV and of other lanes, truncations, early closes) while requests are added,
stepped, preempted and aborted on a small cache, and checks after every operation that the cache is
consistent and holds exactly the handles of live sequences and their open lanes; at the end, none."""

from __future__ import annotations

import random

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from decodekit.backends.mock import MockBackend
from decodekit.engine import Engine
from decodekit.sequence import SeqStatus
from decodekit.strategies.sample import Sample
from decodekit.types import SamplingParams

MAX_LANES = 2


class LaneChaos(Sample):
    """Plain sampling on the main KV, plus up to ``MAX_LANES`` branch lanes per sequence that it forks,
    extends by a token, truncates and closes at random; it never releases anything itself."""

    name = "lane_chaos"

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.lanes_seen = []

    def step_slots(self, seq) -> int:
        return super().step_slots(seq) + MAX_LANES  # each lane grows by at most one token a step

    def plan(self, ctx, seqs):
        rows = super().plan(ctx, seqs)
        for seq in seqs:
            self._mutate(ctx, seq)
            for lane in list(seq.lanes):
                if len(lane) < len(seq.ids) + 3 and self.rng.random() < 0.5:
                    rows.append(ctx.plan_row(seq, [self.rng.randrange(16)], lane=lane, key="chaos"))
        return rows

    def _mutate(self, ctx, seq) -> None:
        action = self.rng.random()
        if action < 0.3 and len(seq.lanes) < MAX_LANES:
            source = self.rng.choice([None, *seq.lanes])
            self.lanes_seen.append(ctx.fork_lane(seq, source))
        elif action < 0.5 and seq.lanes:
            lane = self.rng.choice(seq.lanes)
            ctx.truncate_lane(seq, lane, self.rng.randrange(len(lane) + 1))
        elif action < 0.65 and seq.lanes:
            ctx.close_lane(seq, self.rng.choice(seq.lanes))


class EngineLanes(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed):
        self.backend = MockBackend(vocab_size=16, seed=seed % 7, cache_tokens=160)
        self.engine = Engine(self.backend, max_batch_size=4)
        self.strategy = LaneChaos(seed)
        self.rng = random.Random(seed)
        self.ids = []

    @rule(prompt=st.lists(st.integers(1, 15), min_size=1, max_size=12), new=st.integers(1, 12),
          n=st.integers(1, 2))
    def add(self, prompt, new, n):
        params = SamplingParams(max_new_tokens=new, n=n, seed=len(self.ids), ignore_eos=self.rng.random() < 0.5)
        self.ids.append(self.engine.add_request(prompt, params, self.strategy).request_id)

    @precondition(lambda self: self.engine.has_unfinished())
    @rule()
    def step(self):
        self.engine.step()

    @precondition(lambda self: bool(self.engine.scheduler.active))
    @rule(i=st.integers(0, 100))
    def preempt(self, i):
        active = self.engine.scheduler.active
        self.engine.scheduler.preempt(active[i % len(active)])

    @precondition(lambda self: bool(self.ids))
    @rule(i=st.integers(0, 100))
    def abort(self, i):
        self.engine.abort(self.ids[i % len(self.ids)])

    @invariant()
    def every_handle_is_a_live_lane(self):
        cache = self.backend.cache
        cache.check_integrity()
        live = [s for r in self.engine.requests.values() for s in r.seqs if not s.finished]
        expected = sum((s.handle is not None) + len(s.lanes) for s in live)
        assert cache.num_open_handles == expected
        for seq in live:
            assert all(not lane.closed for lane in seq.lanes)
            if seq.status is SeqStatus.WAITING:
                assert seq.handle is None and not seq.lanes  # preempted: the engine released every lane
        finished = [s for r in self.engine.requests.values() for s in r.seqs if s.finished]
        assert all(s.handle is None and not s.lanes for s in finished)

    def teardown(self):
        while self.engine.has_unfinished():
            self.engine.step()
        for rid in list(self.engine.requests):
            self.engine.pop_completion(rid)
        assert all(lane.closed for lane in self.strategy.lanes_seen)
        assert self.backend.cache.num_open_handles == 0
        self.backend.cache.check_integrity()


EngineLanes.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestEngineLanes = EngineLanes.TestCase


def test_lane_verbs_name_the_closed_lane():
    backend = MockBackend(vocab_size=16, cache_tokens=64)
    engine = Engine(backend)
    request = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=2), Sample())
    engine.step()
    seq = request.seqs[0]
    lane = engine.ctx.fork_lane(seq)
    assert len(lane) == len(seq.handle) and lane in seq.lanes
    engine.ctx.close_lane(seq, lane)
    assert lane.closed and len(lane) == 0 and lane not in seq.lanes
    engine.ctx.close_lane(seq, lane)  # closing twice is a no-op, never a double release
    with pytest.raises(ValueError, match="closed"):
        engine.ctx.fork_lane(seq, lane)
    engine.abort(request.request_id)
    assert backend.cache.num_open_handles == 0
