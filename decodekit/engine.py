"""The engine: owns sequences, seeds, stop conditions, streaming events and per-request stats.

``step()`` is three calls: admit waiting requests (prefill, prefix reuse, fork for ``n``), let
each strategy propose tokens for its running sequences, then append them checking stops.
Requests join and leave between steps, which is what the server's continuous batching uses.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque

import torch

from decodekit.output import TextState
from decodekit.sampling import token_logprobs
from decodekit.strategies.base import Proposal, Strategy
from decodekit.strategies.sample import Sample
from decodekit.types import (
    Choice,
    Completion,
    RequestStats,
    SamplingParams,
    TokenEvent,
    TokenInfo,
    TopLogprob,
    Usage,
)


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


class Sequence:
    """One sample of a request: prompt + output ids, its KV handle, generator and output text."""

    def __init__(self, seq_id: int, request: Request, index: int, generator: torch.Generator):
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.ids = list(request.prompt_ids)
        self.num_prompt = len(request.prompt_ids)
        self.params = request.params
        self.generator = generator
        self.handle = None
        self.next_logits: torch.Tensor | None = None
        self.finish_reason: str | None = None
        self.logprobs: list[TokenInfo] = []
        self.text = TextState(request.tokenizer, request.params.stop)
        self.num_forwards = 0
        self.state: dict = {}  # strategy-owned

    @property
    def output_ids(self) -> list[int]:
        return self.ids[self.num_prompt :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_next_logits(self) -> torch.Tensor:
        logits, self.next_logits = self.next_logits, None
        return logits


class Request:
    def __init__(self, request_id, prompt, prompt_ids, params, strategy, tokenizer):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.strategy = strategy
        self.tokenizer = tokenizer
        self.seqs: list[Sequence] = []
        self.stats = RequestStats()
        self.start_time = time.perf_counter()

    @property
    def finished(self) -> bool:
        return bool(self.seqs) and all(s.finished for s in self.seqs)

    def completion(self) -> Completion:
        choices = tuple(
            Choice(s.index, s.text.text, tuple(s.output_ids), s.finish_reason,
                   tuple(s.logprobs) if self.params.logprobs is not None else None)
            for s in self.seqs
        )
        usage = Usage(len(self.prompt_ids), sum(len(s.output_ids) for s in self.seqs))
        self.stats.forward_passes = max((s.num_forwards for s in self.seqs), default=0)
        self.stats.extra.update(self.strategy.stats(self.seqs))
        return Completion(self.request_id, self.prompt, tuple(self.prompt_ids), choices, usage, self.stats)


class Engine:
    def __init__(self, backend, *, max_batch_size: int = 32, default_strategy: Strategy | None = None):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.max_batch_size = max_batch_size
        self.default_strategy = default_strategy or Sample()
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self._attached: dict[int, Strategy] = {}  # holds the object so its id is never reused
        self._seq_ids = itertools.count()
        self._req_ids = itertools.count()

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
        request = Request(request_id, prompt, prompt_ids, params, strategy, self.tokenizer)
        strategy.validate(request)
        need = self._worst_case_slots(request)
        if need > self.backend.cache.capacity:
            raise ValueError(
                f"request needs up to {need} KV slots (prompt + n * max_new_tokens), the cache budget is "
                f"{self.backend.cache.capacity} tokens: lower max_new_tokens or n, or raise cache_tokens")
        self.requests[request_id] = request
        self.waiting.append(request)
        return request

    def abort(self, request_id: str) -> None:
        """Finish a request now (client gone); frees its cache slots."""
        request = self.requests.get(request_id)
        if request is None:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        for seq in request.seqs:
            if not seq.finished:
                self._finish(seq, "abort")
        self.running = [s for s in self.running if s.request is not request]
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def pop_completion(self, request_id: str) -> Completion:
        request = self.requests.pop(request_id)
        request.stats.wall_time_s = time.perf_counter() - request.start_time
        return request.completion()

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        self._admit()
        by_strategy: dict[int, list[Sequence]] = {}
        for seq in self.running:
            by_strategy.setdefault(id(seq.request.strategy), []).append(seq)
        events: list[TokenEvent] = []
        failed: list[str] = []
        error: Exception | None = None
        for seqs in by_strategy.values():
            try:
                proposals = seqs[0].request.strategy.step(self, seqs)
            except Exception as e:  # isolate the failure: only this strategy's requests end
                error = error or e
                failed += self._abort_all({s.request.request_id for s in seqs})
                continue
            for seq in seqs:
                events.extend(self._append(seq, proposals.get(seq.seq_id, [])))
        self.running = [s for s in self.running if not s.finished]
        if error is not None:
            raise StepError(f"strategy step failed ({type(error).__name__}: {error}); aborted requests {failed}",
                            failed, events) from error
        return events

    def _abort_all(self, request_ids) -> list[str]:
        for request_id in sorted(request_ids):
            self.abort(request_id)
        return sorted(request_ids)

    def compute_next_logits(self, seqs: list[Sequence], backend=None) -> None:
        """Fill ``seq.next_logits`` for sequences that lack it by computing their uncached tokens."""
        need = [s for s in seqs if s.next_logits is None]
        if not need:
            return
        logits = self.forward(need, [s.ids[len(s.handle):] for s in need])
        for seq, row in zip(need, logits):
            seq.next_logits = row[-1]

    def forward(self, seqs: list[Sequence], new_ids: list[list[int]], num_logits=1) -> list[torch.Tensor]:
        """Main-model forward over ``seqs`` (counted in each sequence's stats)."""
        for seq in seqs:
            seq.num_forwards += 1
        return self.backend.forward([s.handle for s in seqs], new_ids, num_logits)

    # ---- admission ------------------------------------------------------------------------
    def _admit(self) -> None:
        admitted: list[Request] = []
        deferred: list[Request] = []
        while self.waiting and self._has_room(admitted, self.waiting[0]):
            request = self.waiting[0]
            if not self._fits(request, admitted):
                break
            self.waiting.popleft()
            if self._shares_uncached_prefix(request, admitted):
                deferred.append(request)
                continue
            admitted.append(request)
        self.waiting.extendleft(reversed(deferred))
        if admitted:
            self._prefill(admitted)

    def _prefill(self, requests: list[Request]) -> None:
        cache = self.backend.cache
        handles = [cache.open(r.prompt_ids) for r in requests]
        for request, handle in zip(requests, handles):
            request.stats.cached_prompt_tokens = len(handle)
            request.stats.prefill_tokens_computed = len(request.prompt_ids) - len(handle)
        logits = self.backend.forward(handles, [r.prompt_ids[len(h):] for r, h in zip(requests, handles)])
        for request, handle, row in zip(requests, handles, logits):
            cache.commit(handle, request.prompt_ids)
            for index in range(request.params.n):
                seq = Sequence(next(self._seq_ids), request, index, self._generator(request.params, index))
                seq.handle = handle if index == 0 else cache.fork(handle)
                seq.next_logits = row[-1]
                seq.num_forwards = 1
                request.seqs.append(seq)
                self.running.append(seq)

    def _fits(self, request: Request, admitted: list[Request]) -> bool:
        reserved = sum(max(0, self._seq_budget(s.request) - len(s.handle)) for s in self.running)
        reserved += sum(self._worst_case_slots(r) for r in admitted)
        return self.backend.cache.available() - reserved >= self._worst_case_slots(request)

    def _shares_uncached_prefix(self, request: Request, admitted: list[Request]) -> bool:
        return self.backend.cache.shares_uncached_prefix(request.prompt_ids, [r.prompt_ids for r in admitted])

    def _seq_budget(self, request: Request) -> int:
        return len(request.prompt_ids) + request.params.max_new_tokens + request.strategy.extra_slots(request)

    def _worst_case_slots(self, request: Request) -> int:
        per_seq = request.params.max_new_tokens + request.strategy.extra_slots(request)
        return len(request.prompt_ids) + request.params.n * per_seq

    def _has_room(self, admitted: list[Request], request: Request) -> bool:
        """Batch-size check; a request with n above the batch size still runs, alone."""
        running = len(self.running) + sum(r.params.n for r in admitted)
        return running == 0 or running + request.params.n <= self.max_batch_size

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator:
        seed = params.seed + index if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        return torch.Generator().manual_seed(seed)

    def _attach(self, strategy: Strategy) -> None:
        if self._attached.get(id(strategy)) is not strategy:
            strategy.attach(self)
            self._attached[id(strategy)] = strategy

    # ---- postprocess ----------------------------------------------------------------------
    def _append(self, seq: Sequence, proposals: list[Proposal]) -> list[TokenEvent]:
        new_ids, infos = [], []
        for token, logits in proposals:
            if seq.finished:
                break
            reason = self._stop_reason_before(seq, token)
            if reason is None:
                seq.ids.append(token)
                new_ids.append(token)
                if seq.params.logprobs is not None and logits is not None:
                    infos.append(self._token_info(token, logits, seq.params.logprobs))
                    seq.logprobs.append(infos[-1])
                reason = self._stop_reason_after(seq)
            if reason is not None:
                self._finish(seq, reason)
        text = seq.text.delta(final=seq.finished)
        if not new_ids and not text and not seq.finished:
            return []
        return [TokenEvent(seq.request.request_id, seq.index, tuple(new_ids), text, seq.finish_reason, tuple(infos))]

    def _stop_reason_before(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_ids or (token in self.tokenizer.eos_token_ids and not params.ignore_eos):
            return "stop"
        return None

    def _stop_reason_after(self, seq: Sequence) -> str | None:
        if seq.text.update(seq.output_ids):
            return "stop"
        if len(seq.output_ids) >= seq.params.max_new_tokens or len(seq.ids) >= self.backend.max_context:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` now with ``reason`` (e.g. a strategy's "constraint_failed"); frees its cache slots."""
        if not seq.finished:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.next_logits = None
        cache = self.backend.cache
        cache.truncate(seq.handle, min(len(seq.handle), len(seq.ids)))
        if reason != "abort":
            cache.commit(seq.handle, seq.ids)
        cache.release(seq.handle)
        seq.request.strategy.on_finish(self, seq)

    def _token_info(self, token: int, logits: torch.Tensor, top_n: int) -> TokenInfo:
        logp, top = token_logprobs(logits, token, top_n)
        name = self.tokenizer.token_str
        return TokenInfo(token, name(token), logp, tuple(TopLogprob(t, name(t), lp) for t, lp in top))

