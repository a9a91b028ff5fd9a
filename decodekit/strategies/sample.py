"""Plain ancestral / greedy decoding: the reference every other strategy is tested against."""

from __future__ import annotations

from decodekit.sampling import sample_token
from decodekit.strategies.base import Proposal, Strategy


class Sample(Strategy):
    name = "sample"

    def step(self, engine, seqs):
        engine.compute_next_logits(seqs)
        out = {}
        for seq in seqs:
            logits = seq.take_next_logits()
            token = sample_token(logits, seq.params, seq.generator)
            out[seq.seq_id] = [Proposal(token, logits)]
        return out
