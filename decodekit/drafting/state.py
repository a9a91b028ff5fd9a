"""Per-sequence state of speculative decoding, shared by ``Speculative`` and its drafters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SpecState:
    """Draft-length rule (``k``, ``pause``, ``backoff``), acceptance counters, calibration
    (``hits`` / ``claimed``), what drafters keep per sequence (``drafter``: draft handles, head K/V)
    and the step in flight (``draft`` and ``head``: the ready next-token logits, if any)."""

    k: int | None = None
    pause: int = 0
    backoff: int = 1
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    hist: list[int] = field(default_factory=list)
    hits: int = 0
    claimed: float = 0.0
    drafter: dict[str, Any] = field(default_factory=dict)
    draft: Any = None
    head: torch.Tensor | None = None
    by_value: bool = False
    own: int = 0  # under a constraint: the drafter's own tokens at the head of ``draft`` (then forced ones)
    num_forced: int = 0  # under a constraint: forced-text tokens after them in ``draft`` (then layout guesses)
    forced: int = 0  # under a constraint: forced-text drafts accepted
    layout: int = 0  # under a constraint: layout-guess drafts accepted
    cut_q: torch.Tensor | None = None  # under a constraint: q of a sampled draft's first forbidden token
    prompt_bytes: bytes | None = None  # under a constraint: the prompt's tail, for layout guesses
