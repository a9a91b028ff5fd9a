"""Plain ancestral / greedy decoding: the reference every other strategy is tested against."""

from __future__ import annotations

import torch

from decodekit.sampling import penalize_rows, sample_batch
from decodekit.strategies.base import Proposal, Strategy, next_logits


class Sample(Strategy):
    """One token per sequence per step, all rows drawn by one batched sampler call on the model's device."""

    name = "sample"
    first_token_from_prefill = True

    def update(self, ctx, seqs, rows):
        logits = next_logits(seqs, rows)
        batch = torch.stack([logits[s.seq_id] for s in seqs])  # (B, V)
        params = [s.params for s in seqs]
        penalized = penalize_rows(batch, params, [(s.request.prompt_ids, s.output_ids) if p.has_penalties else None
                                                  for s, p in zip(seqs, params)])
        tokens = sample_batch(penalized, params, [s.generator for s in seqs])
        return {s.seq_id: [Proposal(t, batch[i])] for i, (s, t) in enumerate(zip(seqs, tokens))}
