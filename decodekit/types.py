"""Frozen configuration and result records shared by the engine, strategies and API."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples tokens and when it stops.

    temperature 0 means greedy. Bad values raise ``ValueError`` naming the parameter.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already generated, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output, in [-2, 2]
    repetition_penalty: float = 1.0  # vLLM / HF: logits of prompt and output tokens / r (positive) or * r
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logit, clipped to +-100

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("top_k", self.top_k, minimum=0)
        _check_int("n", self.n, minimum=1)
        if not _is_number(self.temperature) or self.temperature < 0 or math.isnan(self.temperature):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0, maximum=20)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """Whether a distribution of this request depends on its history or a bias (``sampling.apply_penalties``)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


def _bias_pairs(bias) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted (token id, bias) pairs, biases clipped to [-100, 100] as OpenAI does."""
    items = bias.items() if isinstance(bias, dict) else bias
    out = {}
    for pair in items:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}")
        token, value = pair
        if isinstance(token, str) and token.isdigit():
            token = int(token)
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {token!r}")
        if not _is_number(value) or math.isnan(value):
            raise ValueError(f"logit_bias values must be numbers, got {value!r}")
        out[token] = float(min(100.0, max(-100.0, value)))
    return tuple(sorted(out.items()))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(name: str, value, *, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


SOURCES = ("sampled", "draft_accepted", "bonus", "forced", "small", "large")


@dataclass(frozen=True)
class Provenance:
    """Who produced one output token.

    ``source``: ``sampled`` (drawn from the model's distribution, constrained or not),
    ``draft_accepted`` (a draft token the verifier kept; ``detail["draft"]`` names the draft source),
    ``bonus`` (the verifier's own draw after the accepted drafts), ``forced`` (the constraint allowed
    only this token), ``small`` / ``large`` (entropy switching: which model wrote it; ``detail["entropy"]``
    is the window's mean entropy). ``detail["checks"]``: constraint checks spent on this token.
    """

    source: str = "sampled"
    detail: dict = field(default_factory=dict, hash=False)

    def as_dict(self) -> dict:
        return {"source": self.source, **self.detail}


SAMPLED = Provenance()


@dataclass(frozen=True)
class TokenInfo:
    """One generated token with its log-probability under the model (before temperature) and its provenance."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()
    provenance: Provenance = SAMPLED

    @property
    def source(self) -> str:
        return self.provenance.source


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestStats:
    """Per-request counters; strategies add their own under ``extra``."""

    cached_prompt_tokens: int = 0
    prefill_tokens_computed: int = 0
    forward_passes: int = 0
    wall_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    logprobs: tuple[TokenInfo, ...] | None = None
    provenance: tuple[Provenance, ...] = ()  # one per token of ``token_ids``


@dataclass(frozen=True)
class Completion:
    """Result of one prompt: ``n`` choices, token usage and per-request stats."""

    request_id: str
    prompt: str
    prompt_token_ids: tuple[int, ...]
    choices: tuple[Choice, ...]
    usage: Usage
    stats: RequestStats

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.choices[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason


@dataclass(frozen=True)
class TokenEvent:
    """A streaming event: new text for one choice, or its end (``finish_reason`` set)."""

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    logprobs: tuple[TokenInfo, ...] = ()
    provenance: tuple[Provenance, ...] = ()  # one per token of ``token_ids``
