"""bench/mixed_traffic.py without a model: its engine counters (engine.stats() or the fallback) and targets."""

from types import SimpleNamespace

from decodekit.bench.mixed_traffic import Job, Meter, plain_jobs
from decodekit.bench.targets import check

from decodekit import SamplingParams


class FakeEngine:
    """Each step runs every request one token further in two backend forward calls."""

    def __init__(self, backend):
        self.backend, self.live, self.steps = backend, {}, 0

    def stats(self):
        return {"steps": self.steps, "main_forwards": 2 * self.steps, "side_forwards": 0,
                "peak_running": 3 if self.steps else 0, "preemptions": 0}

    @property
    def running(self):
        return [r for r, left in self.live.items() if left]

    def add_request(self, ids, params, strategy=None, prompt=""):
        request = SimpleNamespace(request_id=f"r{len(self.live)}", n=params.max_new_tokens)
        self.live[request.request_id] = params.max_new_tokens
        return request

    def has_unfinished(self):
        return any(self.live.values())

    def step(self):
        self.steps += 1
        self.backend.num_forward_calls += 2
        for r in self.running:
            self.live[r] -= 1
        return []

    def pop_completion(self, request_id):
        return SimpleNamespace(usage=SimpleNamespace(completion_tokens=self.live.pop(request_id) or 4))


def jobs(lengths):
    return [Job("sample", "q", [1, 2], SamplingParams(max_new_tokens=n), None) for n in lengths]


def test_meter_counts_steps_and_forwards_from_engine_stats():
    backend = SimpleNamespace(num_forward_calls=0)
    meter = Meter(SimpleNamespace(engine=FakeEngine(backend), backend=backend))
    run = meter.run(jobs([4, 2, 3]))
    assert run["steps"] == 4 and run["main_forwards"] == 8 and run["tokens"] == [4, 4, 4]
    assert run["peak_running"] == 3 and run["peak_running_seen"] == 3  # after step 1 all three still run
    assert run["side_forwards"] is not None and meter.source == "engine.stats()"
    single = meter.run(jobs([2]))  # the engine's peak so far stays 3: this run's own peak is 1
    assert single["peak_running"] == 1 and single["steps"] == 2


def test_plain_jobs_reproduce_lengths_and_ignore_eos():
    plain = plain_jobs(jobs([64, 64]), [12, 0])
    assert [j.params.max_new_tokens for j in plain] == [12, 1]
    assert all(j.params.ignore_eos and j.make_strategy is None and j.kind == "plain" for j in plain)


def test_mixed_traffic_targets():
    summary = {"forwards_per_step": 1.0, "mixed_vs_plain": 0.8, "mixed_vs_serial": 3.0,
               "spec_batch_speedup": {"4": 1.1, "16": 0.9}}
    assert [row[3] for row in check("mixed_traffic", summary)] == ["met", "met", "missed", "met", "missed"]
    assert check("mixed_traffic", {**summary, "forwards_per_step": 1.2})[0][3] == "missed"
