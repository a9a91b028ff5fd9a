"""The scheduler: admits on what sequences need now, preempts when the pool runs short, and
hands out prefill chunks under a per-step token budget.

Admission (nano-vllm / vLLM style) reserves nothing for tokens a request may write later: a
request is admitted while the KV pool can hold its prompt plus what every running sequence needs
for its next step, plus a small watermark. When a step would not fit, the most recently admitted
request is preempted: its verified tokens enter the prefix cache, its handles are released, and it
goes back to the front of the queue with its tokens, generators and strategy state; readmitted, it
recomputes through the prefix cache, so its greedy and seeded outputs equal an unpreempted run.
Long prompts are prefilled in chunks of at most ``max_prefill_tokens`` per step, interleaved with
every other sequence's decode steps.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from decodekit.sequence import Request, SeqStatus, Sequence

if TYPE_CHECKING:
    from decodekit.engine import Engine

WATERMARK_FRACTION = 0.01  # of the pool, kept free at admission (vLLM keeps 1%)
MIN_WATERMARK = 8
IDLE_PREFILL_TOKENS = 4096  # prefill budget of a step in which no sequence is decoding (``idle_prefill_tokens``)
MIN_CHUNK = 16  # a prefilling sequence advances at least this much per step


class Scheduler:
    def __init__(self, engine: Engine, *, max_batch_size: int, max_prefill_tokens: int):
        if not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be an integer >= 1, got {max_prefill_tokens!r}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        # a server lowers this: a request arriving during an idle prefill step waits for that whole step
        self.idle_prefill_tokens = IDLE_PREFILL_TOKENS
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # admitted and not finished, in admission order
        self.num_preemptions = 0
        self._admissions = 0

    @property
    def cache(self):
        return self.engine.backend.cache

    @property
    def watermark(self) -> int:
        return max(MIN_WATERMARK, int(self.cache.capacity * WATERMARK_FRACTION))

    # ---- the queues (the engine asks; only the scheduler changes them) -----------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def forget(self, request: Request) -> None:
        """Drop ``request`` from the queue and the running set (an abort)."""
        if request in self.waiting:
            self.waiting.remove(request)
        self.active = [r for r in self.active if r is not request]

    def has_work(self) -> bool:
        return bool(self.waiting or self.live_seqs())

    # ---- the schedule -----------------------------------------------------------------------
    def schedule(self) -> None:
        """Drop finished requests, preempt until the next step fits, then admit what fits."""
        self.active = [r for r in self.active if not r.finished]
        preempted = self._preempt_until_fits()
        if not preempted:
            self._admit()

    def live_seqs(self) -> list[Sequence]:
        return [s for r in self.active for s in r.live_seqs]

    def prefill_chunks(self) -> list[tuple[Sequence, list[int]]]:
        """(sequence, token ids) to prefill this step within the budget, the fewest remaining tokens first.

        The budget protects sequences that are decoding; when none is, prefill runs in big chunks. A
        chunk deep in a long prompt also attends to every earlier token, so the budget counts each
        token at 1 + ``key_cost`` x its context (the backend's attention cost per key). Short prompts
        go first, so a long prompt being prefilled never holds a short request's first token back;
        every prefilling sequence still advances at least ``MIN_CHUNK`` tokens per step."""
        seqs = self.live_seqs()
        decoding = any(s.status is SeqStatus.RUNNING for s in seqs)
        budget = float(self.max_prefill_tokens if decoding else max(self.max_prefill_tokens, self.idle_prefill_tokens))
        key_cost = float(getattr(self.engine.backend, "key_cost", 0.0))
        prefilling = sorted((s for s in seqs if s.status is SeqStatus.PREFILLING),
                            key=lambda s: len(s.ids) - s.num_cached)
        out = []
        for seq in prefilling:
            start = len(seq.handle)
            per_token = 1.0 + key_cost * start
            n = max(min(MIN_CHUNK, self.max_prefill_tokens), int(max(budget, 0.0) / per_token))
            ids = seq.ids[start : start + n]
            budget -= len(ids) * per_token
            out.append((seq, ids))
        return out

    # ---- preemption -------------------------------------------------------------------------
    def step_need(self) -> int:
        """Slots the admitted sequences may allocate in their next steps."""
        need = 0
        for seq in self.live_seqs():
            if seq.status is SeqStatus.RUNNING:
                need += seq.request.strategy.step_slots(seq)
            elif seq.status is SeqStatus.PREFILLING:
                need += len(seq.ids) - seq.num_cached
            else:
                need += 1  # a sample waiting for its fork of the prompt
        return need

    def _preempt_until_fits(self) -> bool:
        preempted = False
        while len(self.active) > 1 and self.cache.available() < self.step_need():
            candidates = [r for r in self.active if r.strategy.preemptible]
            if not candidates:
                break
            self.preempt(max(candidates, key=lambda r: r.admit_order))
            preempted = True
        return preempted

    def preempt(self, request: Request) -> None:
        """Free ``request``'s KV (its verified tokens stay in the prefix cache) and requeue it first."""
        engine = self.engine
        for seq in request.live_seqs:
            running = seq.status is SeqStatus.RUNNING
            engine.release(seq)  # the main KV and every lane: verified tokens stay in the prefix cache
            if running:
                request.strategy.on_preempt(engine.ctx, seq)
            seq.status = SeqStatus.WAITING
            seq.next_logits = None
            seq.num_preemptions += 1
        self.active.remove(request)
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    # ---- admission --------------------------------------------------------------------------
    def _admit(self) -> None:
        reserved = self.step_need() + self.watermark
        deferred: list[Request] = []
        while self.waiting and self._has_room(self.waiting[0]):
            request = self.waiting[0]
            need = self._admission_need(request)
            if self.active and self.cache.available() - reserved < need:
                break
            self.waiting.popleft()
            if not request.seqs and self._shares_uncached_prefix(request):
                deferred.append(request)
                continue
            self._start(request)
            reserved += need
        self.waiting.extendleft(reversed(deferred))

    def _admission_need(self, request: Request) -> int:
        """Slots admission takes out of ``available()``: every token of the sequences it opens (a
        cached prefix gets locked, so it leaves the evictable count too) plus one step each."""
        if not request.seqs:
            reserve = 0 if request.strategy.preemptible else request.strategy.extra_slots(request)
            return len(request.prompt_ids) + request.params.n * (1 + reserve)
        return sum(len(s.ids) + 1 for s in request.live_seqs)

    def _start(self, request: Request) -> None:
        engine = self.engine
        request.admit_order = self._admissions
        self._admissions += 1
        self.active.append(request)
        if not request.seqs:  # fresh: one prefill, the other samples fork it when it is done
            request.seqs = [engine.new_sequence(request, i) for i in range(request.params.n)]
            first = request.seqs[0]
            first.handle = self.cache.open(request.prompt_ids)
            first.status = SeqStatus.PREFILLING
            request.stats.cached_prompt_tokens = len(first.handle)
            request.stats.prefill_tokens_computed = len(request.prompt_ids) - len(first.handle)
            return
        for seq in request.live_seqs:  # readmitted after preemption: recompute through the prefix cache
            seq.handle = self.cache.open(seq.ids)
            seq.status = SeqStatus.PREFILLING

    def _has_room(self, request: Request) -> bool:
        """Batch-size and lane checks; a request above either limit still runs, alone."""
        running = len(self.live_seqs())
        if running == 0:
            return True
        if running + len(request.live_seqs or range(request.params.n)) > self.max_batch_size:
            return False
        limit = getattr(self.engine.backend, "max_lanes", None)
        return limit is None or sum(map(self.lanes_of, self.active)) + self.lanes_of(request) <= limit

    @staticmethod
    def lanes_of(request: Request) -> int:
        """KV lanes on the engine's model ``request`` may hold at once, at worst (main KV, particles, leaves)."""
        return request.params.n * request.strategy.lanes_per_sequence(request)

    def _shares_uncached_prefix(self, request: Request) -> bool:
        prefilling = [r.prompt_ids for r in self.active if any(s.status is SeqStatus.PREFILLING for s in r.seqs)]
        return bool(prefilling) and self.cache.shares_uncached_prefix(request.prompt_ids, prefilling)
