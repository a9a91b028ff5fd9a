"""The Strategy interface: strategies decide, the engine computes.

Each step has two strategy phases around one forward per model: ``plan`` states the rows a
strategy needs computed (a sequence or one of its forks, the new token ids, how many logits, on
which model), the engine runs every running request's rows together, and ``update`` turns the
logits into proposed tokens. A strategy never decides when a request ends: the engine appends
proposals one at a time, checking stop conditions (EOS, stop strings, length) after each.

Strategies see the engine only through a ``StepContext`` (``decodekit.context``): the lanes they
fork, open, truncate and close, the rows they plan, ``finish``, and read-only facts about the step.
The engine owns every lane: it releases a sequence's lanes when it finishes, is aborted or is
preempted, so a strategy keeps no clean-up code and is correct under preemption by construction
(``on_preempt`` / ``on_finish`` are for state of its own, never for KV).

Strategies written against the older one-call interface (``step(ctx, seqs)``, which runs its own
forward through ``ctx.forward``) still work; they just do not share the step's forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from decodekit.types import SAMPLED, Provenance

if TYPE_CHECKING:
    from decodekit.context import Lane, StepContext
    from decodekit.sequence import Request, Sequence


class Proposal(NamedTuple):
    token_id: int
    logits: torch.Tensor | None = None  # raw model logits (V,) the token was drawn under, for logprobs
    provenance: Provenance = SAMPLED  # who produced it (``types.Provenance``)


@dataclass(eq=False)
class Row:
    """One row of a step's forward: ``new_ids`` appended to ``lane`` (default: the sequence's main KV).

    The lane's backend computes it (the engine's model for the main KV). ``key`` is the strategy's
    own tag (a particle, a draft); ``logits`` (num_logits, V) is filled in by the engine after the forward."""

    seq: Sequence
    new_ids: list[int]
    num_logits: int = 1
    lane: Lane | None = None
    key: Any = None
    logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def backend(self):
        """The lane's backend; None for the main KV (the engine's model)."""
        return self.lane.backend if self.lane is not None else None

    @property
    def kv(self):
        return self.lane.handle if self.lane is not None else self.seq.handle


class Strategy:
    name = "strategy"
    preemptible = True  # False: admission reserves the worst case and the scheduler never preempts it
    # True: ``update(ctx, seqs, [])`` turns ready next-token logits into the first token, so the engine
    # calls it in the step a prefill completes (plain sampling, one-particle constrained decoding)
    first_token_from_prefill = False

    def attach(self, ctx: StepContext) -> None:
        """Called once per engine before the first request: load extra models, check tokenizers."""

    def validate(self, request: Request) -> None:
        """Raise ``ValueError`` if this strategy cannot serve ``request``."""

    def extra_slots(self, request: Request) -> int:
        """Main-model KV slots a sequence may hold beyond its verified tokens at worst (drafts, particles)."""
        return 0

    def lanes_per_sequence(self, request: Request) -> int:
        """KV lanes on the engine's model a sequence may hold at once, at worst: its main KV plus
        forks (particles, candidates, tree leaves). Backends with few lanes (llama.cpp's sequence ids)
        admit requests by it, so a request waits rather than running out of lanes mid-step."""
        return 1

    def step_slots(self, seq: Sequence) -> int:
        """Main-model KV slots ``seq`` may allocate in its next step (the scheduler keeps them free)."""
        return max(1, len(seq.ids) - seq.num_cached) if seq.handle is not None else len(seq.ids)

    # ---- the two phases --------------------------------------------------------------------
    def plan(self, ctx: StepContext, seqs: list[Sequence]) -> list[Row]:
        """The rows ``seqs`` need computed this step (default: the uncomputed tail of each sequence
        whose next-token logits are not ready).

        On entry a sequence's cache holds all its tokens but possibly the last few; after a prefill
        ``seq.next_logits`` holds the logits for the next token."""
        return tail_rows(ctx, seqs)

    def update(self, ctx: StepContext, seqs: list[Sequence], rows: list[Row]) -> dict[int, list[Proposal]]:
        """Turn the computed ``rows`` (``row.logits`` filled) into proposals by ``seq.seq_id``."""
        raise NotImplementedError(f"{type(self).__name__} implements neither update() nor step()")

    def step(self, ctx: StepContext, seqs: list[Sequence]) -> dict[int, list[Proposal]]:
        """One-call interface (own forward through ``ctx.forward``); overriding it opts out of
        the shared forward."""
        raise NotImplementedError

    @property
    def shares_forward(self) -> bool:
        """Whether this strategy uses ``plan`` / ``update`` (True) or the one-call ``step``."""
        return type(self).step is Strategy.step

    # ---- life cycle ------------------------------------------------------------------------
    def on_preempt(self, ctx: StepContext, seq: Sequence) -> None:
        """``seq`` was preempted: the engine has released its lanes (closed: reopen them through the
        prefix cache when it runs again); reset state of the strategy's own that assumed its KV."""

    def on_finish(self, ctx: StepContext, seq: Sequence) -> None:
        """``seq`` finished (its lanes are already released): drop state of the strategy's own."""

    def stats(self, seqs: list[Sequence]) -> dict:
        """Strategy counters for one request's sequences, merged into ``RequestStats.extra``."""
        return {}

    def choices(self, request: Request):
        """The completion's choices when they are not the request's sequences (tree rollouts: the
        trajectories); None keeps one choice per sequence."""
        return None


def tail_rows(ctx: StepContext, seqs: list[Sequence]) -> list[Row]:
    """A one-logit row over each sequence's uncomputed tail, for those without ready logits."""
    return [Row(s, ctx.uncomputed(s)) for s in seqs if s.next_logits is None]


def next_logits(seqs: list[Sequence], rows: list[Row]) -> dict[int, torch.Tensor]:
    """Each sequence's next-token logits (V,): ready ones, or the last logit of its own row."""
    out = {r.seq.seq_id: r.logits[-1] for r in rows if r.lane is None}
    for seq in seqs:
        if seq.seq_id not in out:
            out[seq.seq_id] = seq.take_next_logits()
        seq.next_logits = None
    return out
