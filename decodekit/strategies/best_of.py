"""Best of n by mean log-probability: the example of a strategy written against the step context.

Each sequence samples ``num_candidates`` continuations side by side, each in its own lane forked from
the prompt (no copy), as rows of the step's shared forward; when every candidate has ended (a stop
token or the length limit), the one with the highest mean token log-probability under the raw model
is the answer. The strategy holds lanes, never KV handles, and has no clean-up code: the engine closes
its lanes when the sequence finishes, is aborted or preempted, and a preempted candidate reopens
through the prefix cache (``lane.closed``). One file and one registry entry (``best_of``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from decodekit.sampling import sample_token
from decodekit.strategies.base import Proposal, Strategy
from decodekit.types import Provenance


@dataclass
class Candidate:
    lane: object
    generator: torch.Generator
    out: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    logits: torch.Tensor | None = None  # (V,) for its next token
    stop: int | None = None  # the stop token that ended it (not output)
    done: bool = False

    @property
    def mean_logp(self) -> float:
        return sum(self.logps) / len(self.logps) if self.logps else float("-inf")


@dataclass
class BestOfState:
    candidates: list[Candidate]


class BestOfN(Strategy):
    """``num_candidates`` samples per sequence; the answer is the one with the best mean log-probability."""

    name = "best_of"

    def __init__(self, num_candidates: int = 4):
        if not isinstance(num_candidates, int) or isinstance(num_candidates, bool) or num_candidates < 1:
            raise ValueError(f"num_candidates must be an integer >= 1, got {num_candidates!r}")
        self.num_candidates = num_candidates

    def lanes_per_sequence(self, request) -> int:
        return 1 + self.num_candidates

    def extra_slots(self, request) -> int:
        return (self.num_candidates - 1) * (request.params.max_new_tokens + 1) + 1

    def step_slots(self, seq) -> int:
        st = seq.state if isinstance(seq.state, BestOfState) else None
        if st is None:
            return super().step_slots(seq)
        return sum(seq.num_prompt + len(c.out) - len(c.lane) for c in st.candidates if not c.done) + 1

    def plan(self, ctx, seqs):
        rows = []
        for seq in seqs:
            st = seq.state if isinstance(seq.state, BestOfState) else self._start(ctx, seq)
            seq.next_logits = None  # a readmission's prefill logits: the candidates have their own
            for c in st.candidates:
                if c.done or c.logits is not None:
                    continue
                ids = seq.ids + c.out
                if c.lane.closed:  # preempted: reopen through the prefix cache
                    c.lane = ctx.open_lane(seq, ids, mirror=False)
                rows.append(ctx.plan_row(seq, ctx.uncomputed(seq, c.lane, ids), lane=c.lane, key=c))
        return rows

    def update(self, ctx, seqs, rows):
        for row in rows:
            row.key.logits = row.logits[-1]
        out = {}
        for seq in seqs:
            st = seq.state
            for c in st.candidates:
                if not c.done and c.logits is not None:
                    self._advance(seq, c)
            if all(c.done for c in st.candidates):
                out[seq.seq_id] = self._answer(st)
        return out

    def stats(self, seqs) -> dict:
        states = [s.state for s in seqs if isinstance(s.state, BestOfState)]
        return {"num_candidates": self.num_candidates,
                "mean_logprobs": [[round(c.mean_logp, 4) for c in st.candidates] for st in states]}

    # ---- internals ------------------------------------------------------------------------------
    def _start(self, ctx, seq) -> BestOfState:
        logits = seq.take_next_logits()
        seeds = torch.randint(0, 2**62, (self.num_candidates,), generator=seq.generator).tolist()
        seq.state = BestOfState([Candidate(ctx.fork_lane(seq), torch.Generator().manual_seed(s), logits=logits)
                                 for s in seeds])
        return seq.state

    def _advance(self, seq, c: Candidate) -> None:
        logits, c.logits = c.logits, None
        token = sample_token(logits, seq.params, c.generator)
        if seq.stops.before(token) is not None:
            c.stop, c.done = token, True
            return
        c.out.append(token)
        c.logps.append(float(torch.log_softmax(logits.float(), -1)[token]))
        c.done = seq.stops.length(len(seq.output_ids) + len(c.out), len(seq.ids) + len(c.out)) is not None

    def _answer(self, st: BestOfState) -> list[Proposal]:
        best = max(range(len(st.candidates)), key=lambda i: st.candidates[i].mean_logp)
        chosen = st.candidates[best]
        tag = Provenance("sampled", {"candidate": best})
        tokens = chosen.out + ([chosen.stop] if chosen.stop is not None else [])
        return [Proposal(t, None, tag) for t in tokens]
