"""``VLLMEngine``: the public surface of ``decodekit.engine.Engine`` over vLLM's ``LLMEngine``.

Each decodekit sample (``n`` per request) is one vLLM request with seed ``seed + index`` (the
engine's per-sample seeds); the prompt is shared through vLLM's automatic prefix caching. Streamed
requests ask vLLM for per-step deltas; requests added with ``stream=False`` (``LLM.generate``, the
server's non-streaming calls) ask for the final output only, as ``vllm.LLM.generate`` does, so vLLM
builds no per-step outputs for them. vLLM schedules, batches, stops on EOS / stop ids / length and stop
strings; decodekit decodes the text with its own tokenizer (``TextState``, which also cuts at stop
strings) so text matches the transformers backend for the same token ids.
"""

from __future__ import annotations

import itertools
import time

from decodekit.engine import check_prompt
from decodekit.integrations.vllm.strategies import request_options, strategy_stats
from decodekit.output import TextState, stop_index
from decodekit.sequence import Request
from decodekit.strategies.base import Strategy
from decodekit.strategies.registry import entry_of
from decodekit.types import Choice, Completion, SamplingParams, TokenEvent, TokenInfo, TopLogprob, Usage


class _Sample:
    """One vLLM request: a decodekit sample."""

    def __init__(self, request, index: int, vllm_id: str, final_only: bool):
        self.request = request
        self.index = index
        self.vllm_id = vllm_id
        self.final_only = final_only
        self.output_ids: list[int] = []
        self.logprobs: list[TokenInfo] = []
        self.finish_reason: str | None = None
        self.text = TextState(request.tokenizer, request.params.stop)
        self.num_steps = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class VLLMRequest(Request):
    """The engine's ``Request`` whose samples are vLLM requests (``_Sample``)."""

    def __init__(self, request_id, prompt, prompt_ids, params, strategy, tokenizer, max_context=None):
        super().__init__(request_id, prompt, prompt_ids, params, strategy, tokenizer, max_context)
        self.metrics_before: dict[str, float] = {}

    def completion(self, extra: dict) -> Completion:
        logprobs = self.params.logprobs is not None
        choices = tuple(Choice(s.index, s.text.text, tuple(s.output_ids), s.finish_reason,
                               tuple(s.logprobs) if logprobs else None) for s in self.seqs)
        usage = Usage(len(self.prompt_ids), sum(len(s.output_ids) for s in self.seqs))
        self.stats.forward_passes = max((s.num_steps for s in self.seqs), default=0)
        self.stats.extra.update(extra)
        return Completion(self.request_id, self.prompt, tuple(self.prompt_ids), choices, usage, self.stats)


class VLLMEngine:
    """Request-level engine over vLLM (see module doc); implements ``driver.EngineProtocol``.
    ``running`` lists unfinished samples."""

    token_level = False  # strategies map to vLLM's own features (``vllm_strategies``)

    def __init__(self, backend):
        from vllm.inputs import TokensPrompt

        self._tokens_prompt = TokensPrompt
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.core = backend.llm.llm_engine
        self.requests: dict[str, VLLMRequest] = {}
        self.running: list[_Sample] = []
        self.waiting: list = []  # vLLM queues internally; kept for Engine's surface
        self._by_vllm_id: dict[str, _Sample] = {}
        self.num_steps = 0
        self.peak_running = 0
        self._req_ids = itertools.count()
        self._vllm_ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, strategy: Strategy | None = None,
                    *, prompt: str = "", request_id: str | None = None, stream: bool = True) -> VLLMRequest:
        """Queue a request; ``ValueError`` for an empty or too long prompt or a strategy vLLM cannot run.

        ``stream=False``: only the completion is read, so vLLM returns each sample once, finished
        (speculative requests keep deltas: their forward-pass count comes from the steps)."""
        check_prompt(prompt_ids, self.backend.max_context)
        request_id = request_id or f"req-{next(self._req_ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        final_only = not stream and "speculative_config" not in entry_of(strategy).vllm_forms
        options = [request_options(self.backend, params, strategy, index, final_only=final_only)
                   for index in range(params.n)]
        request = VLLMRequest(request_id, prompt, prompt_ids, params, strategy, self.tokenizer,
                              self.backend.max_context)
        if self.backend.speculative_config is not None:  # a metrics snapshot costs: only when it is reported
            request.metrics_before = self.backend.metrics()
        for index, vparams in enumerate(options):
            sample = _Sample(request, index, f"{request_id}#{next(self._vllm_ids)}", final_only)
            self.core.add_request(sample.vllm_id, self._tokens_prompt(prompt_token_ids=list(prompt_ids)), vparams)
            request.seqs.append(sample)
            self.running.append(sample)
            self._by_vllm_id[sample.vllm_id] = sample
        self.requests[request_id] = request
        return request

    def abort(self, request_id: str) -> None:
        """Finish a request now (client gone); vLLM frees its blocks."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        live = [s for s in request.seqs if not s.finished]
        if live:
            self.core.abort_request([s.vllm_id for s in live])
        for sample in live:
            sample.finish_reason = "abort"
            self._forget(sample)

    def serve_mode(self) -> None:
        """vLLM schedules its own prefill chunks."""

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def get_request(self, request_id: str) -> VLLMRequest | None:
        return self.requests.get(request_id)

    def detach(self, strategy: Strategy) -> None:
        """Nothing is attached here: vLLM maps each request's strategy to its own options."""

    def stats(self) -> dict:
        """The engine protocol's counters as far as a request-level engine knows them."""
        return {"steps": self.num_steps, "main_forwards": self.backend.num_forward_calls, "side_forwards": 0,
                "peak_running": self.peak_running, "preemptions": 0}

    def pop_completion(self, request_id: str) -> Completion:
        request = self.requests.pop(request_id)
        request.stats.wall_time_s = time.perf_counter() - request.start_time
        return request.completion(strategy_stats(self.backend, request))

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """One vLLM engine step; a ``TokenEvent`` per sample that got tokens or finished."""
        if not self.running:
            return []
        self.num_steps += 1
        self.peak_running = max(self.peak_running, len(self.running))
        events = []
        outputs = self.core.step()
        if outputs:
            self.backend.num_forward_calls += 1
        for out in outputs:
            sample = self._by_vllm_id.get(out.request_id)
            if sample is None:
                continue
            event = self._update(sample, out)
            if event is not None:
                events.append(event)
        return events

    def _update(self, sample: _Sample, out) -> TokenEvent | None:
        completion = out.outputs[0]
        new_ids = _without_stop_token(completion, sample.request, out.finished)  # deltas, or all when final-only
        infos = self._token_infos(completion, new_ids, sample.request.params.logprobs)
        sample.output_ids.extend(new_ids)
        sample.logprobs.extend(infos)
        first_output = sample.num_steps == 0
        sample.num_steps += max(1, len(completion.token_ids)) if sample.final_only else 1  # one token per step
        self.backend.num_forward_tokens += len(new_ids)
        if first_output:
            request = sample.request
            request.stats.cached_prompt_tokens = max(request.stats.cached_prompt_tokens, out.num_cached_tokens or 0)
            request.stats.prefill_tokens_computed = len(request.prompt_ids) - request.stats.cached_prompt_tokens
        stopped = sample.text.update(sample.output_ids)
        if stopped and sample.final_only:
            _cut_at_stop(sample)
        if stopped and not out.finished:  # decodekit's decode found a stop string vLLM's detokenizer did not
            self.core.abort_request([sample.vllm_id])
        if out.finished or stopped:
            sample.finish_reason = "stop" if stopped else _finish_reason(completion.finish_reason)
            self._forget(sample)
        text = sample.text.delta(final=sample.finished)
        if not new_ids and not text and not sample.finished:
            return None
        return TokenEvent(sample.request.request_id, sample.index, tuple(new_ids), text, sample.finish_reason,
                          tuple(infos))

    def _token_infos(self, completion, new_ids: list[int], top_n: int | None) -> list[TokenInfo]:
        if top_n is None or not completion.logprobs:
            return []
        name = self.tokenizer.token_str
        infos = []
        for pos, token in enumerate(new_ids):
            entry = completion.logprobs[pos]
            top = sorted(((t, lp.logprob) for t, lp in entry.items()), key=lambda x: -x[1])[:top_n]
            infos.append(TokenInfo(token, name(token), float(entry[token].logprob),
                                   tuple(TopLogprob(t, name(t), float(lp)) for t, lp in top)))
        return infos

    def _forget(self, sample: _Sample) -> None:
        self._by_vllm_id.pop(sample.vllm_id, None)
        if sample in self.running:
            self.running.remove(sample)


def _without_stop_token(completion, request, finished: bool) -> list[int]:
    """This step's new ids without a final EOS / stop token id: decodekit never appends the token that stops it."""
    ids = list(completion.token_ids)
    if finished and ids and completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str):
        if request.stops.before(ids[-1]) is not None:  # the one stop rule (``output.StopRule``)
            ids.pop()
    return ids


def _cut_at_stop(sample: _Sample) -> None:
    """Drop the tokens after the one that completes the stop string decodekit found (its decode can
    differ from vLLM's detokenizer at token boundaries): what a delta-by-delta run would have kept."""
    ids, tokenizer, stop = sample.output_ids, sample.request.tokenizer, sample.request.params.stop
    lo, hi = 1, len(ids)  # the shortest prefix whose text holds a stop string: ids[:hi] always does
    while lo < hi:
        mid = (lo + hi) // 2
        if stop_index(tokenizer.decode(ids[:mid]), stop) >= 0:
            hi = mid
        else:
            lo = mid + 1
    del ids[hi:]
    del sample.logprobs[hi:]


def _finish_reason(reason: str | None) -> str:
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(reason or "", reason or "stop")
