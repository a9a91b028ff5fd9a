"""Server counters and their Prometheus text exposition (``GET /metrics``)."""

from __future__ import annotations

import threading
from collections import defaultdict

KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class Metrics:
    """Thread-safe counters; the engine thread reports finished requests, the HTTP side the rest."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_prompt_tokens = 0
        self.finished = 0
        self.latency_sum = 0.0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.rejected_queue_full = 0
        self.cancelled = 0
        self.strategy_stats: dict[tuple[str, str], float] = defaultdict(float)

    def count_request(self, path: str, status: int) -> None:
        label = path if path in KNOWN_PATHS else "other"
        with self._lock:
            self.requests[(label, status)] += 1

    def record_done(self, strategy_name: str, completion, latency_s: float) -> None:
        with self._lock:
            self.finished += 1
            self.prompt_tokens += completion.usage.prompt_tokens
            self.completion_tokens += completion.usage.completion_tokens
            self.cached_prompt_tokens += completion.stats.cached_prompt_tokens
            self.latency_sum += latency_s
            for key, value in completion.stats.extra.items():
                if _is_counter(key, value):
                    self.strategy_stats[(strategy_name, key)] += value

    def record_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_count += 1

    def count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def acceptance_rate(self) -> float | None:
        """Speculative acceptance: accepted / drafted tokens summed over finished requests."""
        accepted = sum(v for (_, k), v in self.strategy_stats.items() if k == "tokens_accepted")
        drafted = sum(v for (_, k), v in self.strategy_stats.items() if k == "tokens_drafted")
        return accepted / drafted if drafted else None

    def render(self, worker) -> str:
        """The Prometheus text format (version 0.0.4)."""
        out: list[str] = []
        with self._lock:
            _metric(out, "decodekit_requests_total", "counter", "HTTP requests by endpoint and status",
                    [({"endpoint": p, "status": str(s)}, v) for (p, s), v in sorted(self.requests.items())])
            _metric(out, "decodekit_requests_finished_total", "counter", "generation requests completed",
                    [({}, self.finished)])
            _metric(out, "decodekit_requests_cancelled_total", "counter", "requests cancelled by a client disconnect",
                    [({}, self.cancelled)])
            _metric(out, "decodekit_requests_rejected_total", "counter", "requests refused because the queue was full",
                    [({}, self.rejected_queue_full)])
            _metric(out, "decodekit_prompt_tokens_total", "counter", "prompt tokens of finished requests",
                    [({}, self.prompt_tokens)])
            _metric(out, "decodekit_completion_tokens_total", "counter", "generated tokens of finished requests",
                    [({}, self.completion_tokens)])
            _metric(out, "decodekit_cached_prompt_tokens_total", "counter", "prompt tokens found in the prefix cache",
                    [({}, self.cached_prompt_tokens)])
            _summary(out, "decodekit_request_latency_seconds", "request latency", self.latency_sum, self.finished)
            _summary(out, "decodekit_time_to_first_token_seconds", "time to first token (streamed requests)",
                     self.ttft_sum, self.ttft_count)
            rate = self.acceptance_rate()
            if rate is not None:
                _metric(out, "decodekit_speculative_acceptance_rate", "gauge",
                        "accepted / drafted tokens over finished speculative requests", [({}, rate)])
            _metric(out, "decodekit_strategy_stat_total", "counter", "strategy counters summed over finished requests",
                    [({"strategy": s, "stat": k}, v) for (s, k), v in sorted(self.strategy_stats.items())])
        _engine_metrics(out, worker)
        return "\n".join(out) + "\n"


def _is_counter(key: str, value) -> bool:
    """Numeric strategy stats that add up over requests (not rates or means)."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return numeric and "rate" not in key and "mean" not in key


def _engine_metrics(out: list[str], worker) -> None:
    s = worker.stats
    _metric(out, "decodekit_queue_length", "gauge", "requests waiting for admission", [({}, worker.queue_length)])
    _metric(out, "decodekit_running_requests", "gauge", "requests in the running batch", [({}, worker.num_running)])
    _metric(out, "decodekit_engine_steps_total", "counter", "engine steps", [({}, s.num_steps)])
    _metric(out, "decodekit_engine_step_sequences_total", "counter",
            "running sequences summed over steps (divide by steps: mean batch size)", [({}, s.num_step_seqs)])
    _metric(out, "decodekit_engine_max_batch_sequences", "gauge", "largest batch seen", [({}, s.max_running_seqs)])
    engine_stats = worker.engine.stats()
    if engine_stats:
        _metric(out, "decodekit_engine_main_forwards_total", "counter", "forwards of the engine's model (one per step)",
                [({}, engine_stats["main_forwards"])])
        _metric(out, "decodekit_engine_preemptions_total", "counter",
                "requests preempted (KV freed, recomputed later) when the pool ran short",
                [({}, engine_stats["preemptions"])])
    backend = worker.engine.backend
    _metric(out, "decodekit_forward_calls_total", "counter", "model forward calls", [({}, backend.num_forward_calls)])
    _metric(out, "decodekit_forward_tokens_total", "counter", "tokens through the model",
            [({}, backend.num_forward_tokens)])
    cache = backend.cache
    st = cache.stats
    _metric(out, "decodekit_cache_hit_rate", "gauge", "prefix-cache hit rate (hit / looked-up prompt tokens)",
            [({}, st.hit_rate)])
    _metric(out, "decodekit_cache_lookup_tokens_total", "counter", "prompt tokens looked up", [({}, st.lookup_tokens)])
    _metric(out, "decodekit_cache_hit_tokens_total", "counter", "prompt tokens found cached", [({}, st.hit_tokens)])
    _metric(out, "decodekit_cache_evicted_tokens_total", "counter", "tokens evicted", [({}, st.evicted_tokens)])
    _metric(out, "decodekit_cache_capacity_tokens", "gauge", "KV slots in the pool", [({}, cache.capacity)])
    _metric(out, "decodekit_cache_free_tokens", "gauge", "KV slots free now", [({}, cache.pool.num_free)])
    _metric(out, "decodekit_cache_open_handles", "gauge", "open KV handles", [({}, cache.num_open_handles)])


def _metric(out: list[str], name: str, kind: str, help_text: str, samples) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        out.append(f"{name}{_labels(labels)} {_num(value)}")


def _summary(out: list[str], name: str, help_text: str, total: float, count: int) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} summary")
    out.append(f"{name}_sum {_num(total)}")
    out.append(f"{name}_count {count}")


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))
