"""The engine: strategies decide, the engine computes.

``step()`` is three calls, like nano-vllm's: ``schedule`` (preempt if the pool runs short, admit
what fits, pick prefill chunks), ``run`` (every strategy plans its rows; ONE forward per model over
the rows of every running request, whatever its strategy, prefill chunks included) and
``postprocess`` (each strategy turns its logits into proposals; the engine appends them checking
stops, and streams events). Requests join and leave between steps: continuous batching. Work a
strategy queues from ``plan`` with ``ctx.beside_forward`` (a constraint's next masks) runs on one
worker thread while the forward runs, and is done before any ``update``.

The engine owns sequences, generators, scheduling and stop conditions; a strategy owns an
algorithm and its per-sequence state; the backend owns the model; the cache manager owns sharing.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import torch

from decodekit.context import StepContext
from decodekit.lanes import LaneKeeper
from decodekit.output import token_info
from decodekit.scheduler import Scheduler
from decodekit.sequence import Request, SeqStatus, Sequence
from decodekit.strategies.base import Proposal, Row, Strategy
from decodekit.strategies.sample import Sample
from decodekit.types import SamplingParams, TokenEvent

__all__ = ["Engine", "EngineStats", "Request", "Sequence", "StepError", "check_prompt"]

# Prompt tokens prefilled per step while other sequences decode, so a long prompt never holds them for
# long: on CPU a token of prefill costs ~5-7 ms of compute (SmolLM2-135M), so 256 keep a step near 1.5 s.
MAX_PREFILL_TOKENS = {"cpu": 256, "cuda": 2048}


_BESIDE = None  # one worker thread for work beside the forward, made on first use


def _beside_pool():
    global _BESIDE
    if _BESIDE is None:
        from concurrent.futures import ThreadPoolExecutor

        _BESIDE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decodekit-beside-forward")
    return _BESIDE


def overlap_default(backend) -> bool:
    """Whether work beside the forward runs by default: where the forward leaves a core free (a GPU
    forward, or torch using fewer threads than the CPU has). On a CPU whose every core runs the forward
    the gain is at most the masks' own time (<1% of a SmolLM2 step on 2 cores) and interleaved runs
    there measured 0.72x-1.23x of no overlap (noise and thread interference): off by default there."""
    device = getattr(getattr(backend, "device", None), "type", "cpu")
    return device != "cpu" or torch.get_num_threads() < (os.cpu_count() or 1)


def _run_beside(tasks) -> None:
    for task in tasks:
        try:
            task()
        except Exception:  # by contract a task only fills caches that update() computes anyway (and raises there)
            pass


def check_prompt(prompt_ids: list[int], max_context: int) -> None:
    """``ValueError`` for an empty prompt or one that leaves no room in the model's context."""
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token")
    if len(prompt_ids) >= max_context:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens, the model's context is {max_context}")


class StepError(RuntimeError):
    """A strategy failed during ``Engine.step``. Its requests (``request_ids``) were aborted and their
    slots freed; every other request advanced normally and its ``events`` are attached."""

    def __init__(self, message: str, request_ids: list[str], events: list[TokenEvent]):
        super().__init__(message)
        self.request_ids = request_ids
        self.events = events


@dataclass
class EngineStats:
    """Engine-wide counters since creation (``Engine.stats()`` returns them as a dict)."""

    steps: int = 0
    main_forwards: int = 0  # forward calls of the engine's model
    side_forwards: int = 0  # forwards of other models' rows in the step (entropy switching plans them)
    peak_running: int = 0  # most sequences running (or prefilling) in one step
    beside_wait_s: float = 0.0  # time the step waited, after its forward, for work queued beside it


class Engine:
    """decodekit's one-step engine; implements ``driver.EngineProtocol`` (``LLM``, the server and
    ``TreeRollout.run`` use nothing else). Strategies see it only through ``self.ctx``."""

    token_level = True  # strategies run token by token, through ``StepContext``

    def __init__(self, backend, *, max_batch_size: int = 32, default_strategy: Strategy | None = None,
                 max_prefill_tokens: int | None = None):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.default_strategy = default_strategy or Sample()
        if max_prefill_tokens is None:
            device = getattr(getattr(backend, "device", None), "type", "cpu")
            max_prefill_tokens = MAX_PREFILL_TOKENS.get(device, MAX_PREFILL_TOKENS["cuda"])
        self.scheduler = Scheduler(self, max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens)
        self.lanes = LaneKeeper(backend)
        self.ctx = StepContext(self)
        self.requests: dict[str, Request] = {}
        self.counters = EngineStats()
        self.step_batch = 0
        self.beside: list = []  # tasks queued for this step's forward (``ctx.beside_forward``)
        self.overlap = overlap_default(backend)  # False: skip them (the strategies compute the same in ``update``)
        self._attached: dict[int, Strategy] = {}  # holds the object so its id is never reused
        self._seq_ids = itertools.count()
        self._req_ids = itertools.count()

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    @property
    def running(self) -> list[Sequence]:
        """Sequences admitted and not finished (running or prefilling)."""
        return self.scheduler.live_seqs()

    @property
    def waiting(self):
        return self.scheduler.waiting

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, strategy: Strategy | None = None,
                    *, prompt: str = "", request_id: str | None = None, stream: bool = True) -> Request:
        """Queue a request; raises ``ValueError`` for an empty or too long prompt or a bad strategy.

        ``stream=False`` tells a request-level engine (vLLM) that only the completion is read; this
        engine produces its per-step events either way."""
        check_prompt(prompt_ids, self.backend.max_context)
        strategy = strategy or self.default_strategy
        self._attach(strategy)
        request_id = request_id or f"req-{next(self._req_ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = Request(request_id, prompt, prompt_ids, params, strategy, self.tokenizer, self.backend.max_context)
        strategy.validate(request)
        need = self._worst_case_slots(request)
        if need > self.backend.cache.capacity:
            raise ValueError(
                f"request needs up to {need} KV slots (prompt + n * max_new_tokens), the cache budget is "
                f"{self.backend.cache.capacity} tokens: lower max_new_tokens or n, or raise cache_tokens")
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> None:
        """Finish a request now (client gone); frees its cache slots and forgets it."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        self.scheduler.forget(request)
        for seq in request.live_seqs:
            self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def pop_completion(self, request_id: str):
        request = self.requests.pop(request_id)
        request.stats.wall_time_s = time.perf_counter() - request.start_time
        return request.completion()

    def detach(self, strategy: Strategy) -> None:
        """Forget an attached strategy instance (the server's per-option cache evicted it); requests
        that still use it keep it alive, so its id cannot be reused while they run."""
        if self._attached.get(id(strategy)) is strategy:
            del self._attached[id(strategy)]

    def serve_mode(self) -> None:
        """Requests arrive at any time: an idle step prefills no more than a busy one (a request arriving
        during an idle prefill step would wait for that whole step)."""
        self.scheduler.idle_prefill_tokens = self.scheduler.max_prefill_tokens

    def stats(self) -> dict:
        """Engine-wide counters: steps, main / side forwards, peak running sequences, preemptions."""
        return {**self.counters.__dict__, "preemptions": self.scheduler.num_preemptions}

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        self.scheduler.schedule()
        groups = self._groups()
        self.step_batch = sum(len(seqs) for _, seqs in groups.values())  # rows sharing this step's forward
        self.counters.steps += 1
        self.counters.peak_running = max(self.counters.peak_running, len(self.scheduler.live_seqs()))
        failed: dict[str, Exception] = {}
        prefills = [Row(seq, ids) for seq, ids in self.scheduler.prefill_chunks()]
        planned = {key: self._guard(failed, seqs, strategy.plan, self.ctx, seqs)
                   for key, (strategy, seqs) in groups.items() if strategy.shares_forward}
        beside = self._start_beside()
        self.run_rows(prefills + [r for rows in planned.values() if rows for r in rows])
        self._join_beside(beside)
        events: list[TokenEvent] = self._first_tokens(self._finish_prefills(prefills), failed)
        for key, (strategy, seqs) in groups.items():
            seqs = [s for s in seqs if not s.finished]
            if not seqs or (strategy.shares_forward and planned[key] is None):
                continue
            if strategy.shares_forward:
                proposals = self._guard(failed, seqs, strategy.update, self.ctx, seqs, planned[key])
            else:  # a one-call strategy: its own forward
                proposals = self._guard(failed, seqs, strategy.step, self.ctx, seqs)
            for seq in seqs if proposals is not None else ():
                events.extend(self._append(seq, proposals.get(seq.seq_id, [])))
        if failed:
            error = next(iter(failed.values()))
            ids = sorted(failed)
            raise StepError(f"strategy step failed ({type(error).__name__}: {error}); aborted requests {ids}",
                            ids, events) from error
        return events

    def _first_tokens(self, started: list[Sequence], failed: dict) -> list[TokenEvent]:
        """Sequences whose prefill completed in this step take their first token now, from the prefill's
        logits, where their strategy needs no forward for it (``Strategy.first_token_from_prefill``):
        a short request arriving beside a long prompt is done a step sooner."""
        groups: dict[int, tuple[Strategy, list[Sequence]]] = {}
        for seq in started:
            strategy = seq.request.strategy
            if strategy.first_token_from_prefill:
                groups.setdefault(id(strategy), (strategy, []))[1].append(seq)
        events = []
        for strategy, seqs in groups.values():
            proposals = self._guard(failed, seqs, strategy.update, self.ctx, seqs, [])
            for seq in seqs if proposals is not None else ():
                events.extend(self._append(seq, proposals.get(seq.seq_id, [])))
        return events

    def _groups(self) -> dict[int, tuple[Strategy, list[Sequence]]]:
        groups: dict[int, tuple[Strategy, list[Sequence]]] = {}
        for seq in self.scheduler.live_seqs():
            if seq.status is SeqStatus.RUNNING:
                strategy = seq.request.strategy
                groups.setdefault(id(strategy), (strategy, []))[1].append(seq)
        return groups

    def _guard(self, failed: dict, seqs: list[Sequence], fn, *args):
        """``fn(*args)``; on an exception abort ``seqs``' requests (only them) and return None."""
        try:
            return fn(*args)
        except Exception as e:  # isolate the failure: only this strategy's requests end
            for request_id in sorted({s.request.request_id for s in seqs}):
                failed.setdefault(request_id, e)
                self.abort(request_id)
            return None

    def _start_beside(self):
        """The tasks strategies queued with ``ctx.beside_forward``, started on the worker thread (None:
        none, or ``overlap`` off: the strategies then compute the same things in ``update``)."""
        tasks, self.beside = self.beside, []
        if not tasks or not self.overlap:
            return None
        return _beside_pool().submit(_run_beside, tasks)

    def _join_beside(self, future) -> None:
        if future is not None:
            start = time.perf_counter()
            future.result()
            self.counters.beside_wait_s += time.perf_counter() - start

    def run_rows(self, rows: list[Row]) -> None:
        """One forward per model over ``rows`` (filling ``row.logits``); counted in the sequences' stats."""
        by_backend: dict[int, list[Row]] = {}
        for row in rows:
            if not row.seq.finished:
                by_backend.setdefault(id(row.backend or self.backend), []).append(row)
        for group in by_backend.values():
            backend = group[0].backend or self.backend
            logits = backend.forward([r.kv for r in group], [r.new_ids for r in group], [r.num_logits for r in group])
            for row, row_logits in zip(group, logits):
                row.logits = row_logits
            if backend is self.backend:
                self.counters.main_forwards += 1
                for seq in {id(r.seq): r.seq for r in group}.values():
                    seq.num_forwards += 1
            else:
                self.counters.side_forwards += 1

    def _finish_prefills(self, rows: list[Row]) -> list[Sequence]:
        """Sequences whose prefill completed in this step start running (with their fresh-request
        siblings, which fork the prompt); returns them all."""
        cache = self.backend.cache
        started = []
        for row in rows:
            seq = row.seq
            if seq.finished or len(seq.handle) < len(seq.ids):
                continue
            seq.next_logits = row.logits[-1]
            seq.status = SeqStatus.RUNNING
            started.append(seq)
            cache.commit(seq.handle, seq.ids)  # verified: the prompt (and output) enters the prefix cache
            if seq.num_preemptions == 0:  # the other samples of a fresh request fork its prompt
                for sibling in [s for s in seq.request.seqs if s.status is SeqStatus.WAITING and not s.finished]:
                    sibling.handle = cache.fork(seq.handle)
                    sibling.next_logits = seq.next_logits
                    sibling.num_forwards = seq.num_forwards
                    sibling.status = SeqStatus.RUNNING
                    started.append(sibling)
        return started

    # ---- helpers for strategies (through ``StepContext``) -------------------------------------
    def compute_next_logits(self, seqs: list[Sequence]) -> None:
        """Fill ``seq.next_logits`` for sequences that lack it (one-call strategies: own forward)."""
        need = [s for s in seqs if s.next_logits is None]
        if need:
            for seq, row in zip(need, self.forward(need, [self.ctx.uncomputed(s) for s in need])):
                seq.next_logits = row[-1]

    def forward(self, seqs: list[Sequence], new_ids: list[list[int]], num_logits=1) -> list[torch.Tensor]:
        """A main-model forward of its own over ``seqs`` (one-call strategies)."""
        counts = num_logits if isinstance(num_logits, list) else [num_logits] * len(seqs)
        rows = [Row(s, ids, k) for s, ids, k in zip(seqs, new_ids, counts)]
        self.run_rows(rows)
        return [r.logits for r in rows]

    def new_sequence(self, request: Request, index: int) -> Sequence:
        return Sequence(next(self._seq_ids), request, index, self._generator(request.params, index))

    def release(self, seq: Sequence, commit: bool = True) -> None:
        """Release ``seq``'s main KV and every lane, first committing its verified tokens to the prefix cache."""
        self.lanes.release_all(seq, commit)

    def _worst_case_slots(self, request: Request) -> int:
        per_seq = request.params.max_new_tokens + request.strategy.extra_slots(request)
        return len(request.prompt_ids) + request.params.n * per_seq

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator:
        seed = params.seed + index if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        return torch.Generator().manual_seed(seed)

    def _attach(self, strategy: Strategy) -> None:
        if self._attached.get(id(strategy)) is not strategy:
            strategy.attach(self.ctx)
            self._attached[id(strategy)] = strategy

    # ---- postprocess ----------------------------------------------------------------------
    def _append(self, seq: Sequence, proposals: list[Proposal]) -> list[TokenEvent]:
        new_ids, infos = [], []
        for token, logits, provenance in proposals:
            if seq.finished:
                break
            reason = self._stop_reason_before(seq, token)
            if reason is None:
                seq.ids.append(token)
                seq.provenance.append(provenance)
                new_ids.append(token)
                if seq.params.logprobs is not None and logits is not None:
                    infos.append(token_info(self.tokenizer, token, logits, seq.params.logprobs, provenance))
                    seq.logprobs.append(infos[-1])
                reason = self._stop_reason_after(seq)
            if reason is not None:
                self._finish(seq, reason)
        text = seq.text.delta(final=seq.finished)
        if not new_ids and not text and not seq.finished:
            return []
        added = tuple(seq.provenance[len(seq.provenance) - len(new_ids):])
        return [TokenEvent(seq.request.request_id, seq.index, tuple(new_ids), text, seq.finish_reason, tuple(infos),
                           added)]

    def _stop_reason_before(self, seq: Sequence, token: int) -> str | None:
        return seq.stops.before(token)

    def _stop_reason_after(self, seq: Sequence) -> str | None:
        return seq.stops.after(seq.text, seq.output_ids, len(seq.ids))

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` now with ``reason`` (e.g. a strategy's "constraint_failed"); frees its cache slots."""
        if not seq.finished:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        running = seq.status is SeqStatus.RUNNING
        seq.finish_reason = reason
        seq.status = SeqStatus.FINISHED
        seq.next_logits = None
        self.release(seq, commit=reason != "abort")
        if running:
            seq.request.strategy.on_finish(self.ctx, seq)
