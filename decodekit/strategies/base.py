"""The Strategy interface: an algorithm that proposes the next tokens of a batch of sequences.

A strategy never decides when a request ends: it returns proposed tokens, and the engine
appends them one at a time, checking stop conditions (EOS, stop strings, length) after each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from decodekit.engine import Engine, Request, Sequence


class Proposal(NamedTuple):
    token_id: int
    logits: torch.Tensor | None = None  # raw model logits (V,) the token was drawn under, for logprobs


class Strategy(ABC):
    name = "strategy"

    def attach(self, engine: Engine) -> None:
        """Called once per engine before the first request: load extra models, check tokenizers."""

    def validate(self, request: Request) -> None:
        """Raise ``ValueError`` if this strategy cannot serve ``request``."""

    def extra_slots(self, request: Request) -> int:
        """Main-model KV slots a sequence may hold beyond its verified tokens (e.g. draft tokens)."""
        return 0

    @abstractmethod
    def step(self, engine: Engine, seqs: list[Sequence]) -> dict[int, list[Proposal]]:
        """Advance each sequence; returns proposed tokens by ``seq.seq_id``.

        On entry every sequence's cache holds all its tokens but possibly the last few; after a
        prefill ``seq.next_logits`` holds the logits for the next token.
        """

    def on_finish(self, engine: Engine, seq: Sequence) -> None:
        """Release what the strategy holds for ``seq`` (draft caches, state)."""

    def stats(self, seqs: list[Sequence]) -> dict:
        """Strategy counters for one request's sequences, merged into ``RequestStats.extra``."""
        return {}
