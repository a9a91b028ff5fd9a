"""Engine records: a ``Request`` and its ``Sequence``s (one per sample), with their status.

A sequence is WAITING (queued, or preempted: its tokens are kept, its KV is not), PREFILLING
(its handle is being filled chunk by chunk), RUNNING (its strategy advances it each step) or
FINISHED. Everything a strategy keeps per sequence lives in ``seq.state``, an object the strategy
creates (a dataclass per strategy), never string keys shared between modules; a composed strategy's
parts keep theirs side by side in ``seq.parts`` (by type: a constraint's state beside the drafts').
"""

from __future__ import annotations

import enum
import time
from typing import Any

import torch

from decodekit.output import StopRule, TextState
from decodekit.types import Choice, Completion, Provenance, RequestStats, TokenInfo, Usage


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One sample of a request: prompt + output ids, its KV (main handle and lanes), generator and output text."""

    def __init__(self, seq_id: int, request: Request, index: int, generator: torch.Generator):
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.ids = list(request.prompt_ids)
        self.num_prompt = len(request.prompt_ids)
        self.params = request.params
        self.generator = generator
        self.handle = None  # the main KV handle: the engine's and the scheduler's, never a strategy's
        self.lanes: list = []  # every other KV lane (``decodekit.context.Lane``), released by the engine
        self.status = SeqStatus.WAITING
        self.next_logits: torch.Tensor | None = None
        self.finish_reason: str | None = None
        self.logprobs: list[TokenInfo] = []
        self.provenance: list[Provenance] = []  # one per output token
        self.text = TextState(request.tokenizer, request.params.stop)
        self.num_forwards = 0
        self.num_preemptions = 0
        self.state: Any = None  # strategy-owned (a dataclass per strategy)
        # states of composed parts side by side, by type (the constraint's beside the drafts' or the switch's)
        self.parts: dict[type, Any] = {}

    @property
    def output_ids(self) -> list[int]:
        return self.ids[self.num_prompt :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def stops(self) -> StopRule:
        return self.request.stops

    @property
    def num_cached(self) -> int:
        """Tokens of ``ids`` (or drafts after them) the main KV holds (0 while waiting)."""
        return len(self.handle) if self.handle is not None else 0

    def take_next_logits(self) -> torch.Tensor:
        logits, self.next_logits = self.next_logits, None
        return logits

    def state_as(self, cls):
        """This sequence's strategy state, created as ``cls()`` on first use."""
        if not isinstance(self.state, cls):
            self.state = cls()
        return self.state


class Request:
    def __init__(self, request_id, prompt, prompt_ids, params, strategy, tokenizer, max_context: int | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.strategy = strategy
        self.tokenizer = tokenizer
        # the one stop rule (``output.StopRule``), shared by the request's samples
        self.stops = StopRule(params, tokenizer.eos_token_ids, max_context if max_context is not None else 1 << 62)
        self.seqs: list[Sequence] = []
        self.stats = RequestStats()
        self.start_time = time.perf_counter()
        self.admit_order = -1  # set on each admission: the scheduler preempts the most recent first

    @property
    def finished(self) -> bool:
        return bool(self.seqs) and all(s.finished for s in self.seqs)

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.finished]

    def completion(self) -> Completion:
        choices = self.strategy.choices(self) or tuple(
            Choice(s.index, s.text.text, tuple(s.output_ids), s.finish_reason,
                   tuple(s.logprobs) if self.params.logprobs is not None else None, tuple(s.provenance))
            for s in self.seqs
        )
        usage = Usage(len(self.prompt_ids), sum(len(c.token_ids) for c in choices))
        self.stats.forward_passes = max((s.num_forwards for s in self.seqs), default=0)
        preempted = sum(s.num_preemptions for s in self.seqs)
        if preempted:
            self.stats.extra["preemptions"] = preempted
        self.stats.extra.update(self.strategy.stats(self.seqs))
        return Completion(self.request_id, self.prompt, tuple(self.prompt_ids), choices, usage, self.stats)
