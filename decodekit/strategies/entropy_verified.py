"""EntropySwitch's verified mode (speculative cascades, Narasimhan et al., ICLR 2025): its steps.

While the entropy rule keeps the small model writing, it drafts a segment one position per engine
step (a row of the small model); the segment ends where the rule hands the position to the large
model, at ``max_segment`` drafts, or after a stop token. The large model then scores the segment in
one row (k drafts: k + 1 logits) and ``cascade.accept_block`` keeps a prefix; the large model writes
the next token itself (the correction, or the bonus after a fully kept segment). Where the rule picks
the large model it writes plain tokens, and after each one the rule picks who writes the next.

Whether a position is drafted depends only on what precedes its draw (the window's entropies so
far and the small model's entropy at that position), so at tolerance 0 the output follows the large
model's distribution exactly. Penalties and ``logit_bias`` enter both sides with each position's own
history (output + the drafts before it), as in ``Speculative``: still lossless.
"""

from __future__ import annotations

import torch

from decodekit.drafting.cascade import accept_block
from decodekit.drafting.drafters import draw_draft
from decodekit.sampling import apply_penalties, entropy_bits, positions_penalized, sample_token
from decodekit.strategies.base import Proposal
from decodekit.strategies.entropy_rule import LARGE, SMALL, choose_model, rolling_mean, segment_budget
from decodekit.strategies.speculative import stop_ids
from decodekit.types import Provenance


class VerifiedMode:
    """The verified-mode half of ``EntropySwitch`` (uses its models, rule parameters and ``_mark``)."""

    def _verified_step(self, ctx, seq, st, block) -> list[Proposal]:
        role, _, num_logits = st.job
        if role == LARGE and st.active == SMALL:
            return self._settle_segment(ctx, seq, st, block)
        if role == SMALL:
            self._draft_one(ctx, seq, st, block[-1])
            return []
        return self._large_writes(seq, st, block[-1])

    def _large_writes(self, seq, st, logits) -> list[Proposal]:
        """The large model writes this position itself; the rule picks who writes the next one."""
        st.entropies.append(float(entropy_bits(logits)))
        mean = rolling_mean(st.entropies, self.window)
        token = sample_token(apply_penalties(logits, seq.params, seq.request.prompt_ids, seq.output_ids),
                             seq.params, seq.generator)
        st.since_switch += 1  # this token counts: the rule picks the writer of the next position
        choice = choose_model(active=LARGE, mean_entropy=mean, threshold=self.threshold,
                              since_switch=st.since_switch, min_dwell=self.min_dwell)
        if choice == SMALL:
            st.active, st.since_switch, st.num_switches = SMALL, 0, st.num_switches + 1
        st.writers.append(LARGE)
        return [Proposal(token, logits, Provenance(LARGE, self._mark(LARGE, mean)))]

    def _draft_one(self, ctx, seq, st, logits) -> None:
        """The small model's next position: draft it while the rule keeps the small model writing,
        else end the segment here (the large model writes this position). Whether a position is
        drafted depends only on what precedes its draw, so verification stays exact."""
        h = float(entropy_bits(logits))
        mean = rolling_mean([*st.entropies, h], self.window)
        choice = choose_model(active=SMALL, mean_entropy=mean, threshold=self.threshold,
                              since_switch=st.since_switch + len(st.draft), min_dwell=self.min_dwell)
        if choice == LARGE:
            st.verify_now, st.end_mean, st.end_by_rule = True, mean, True
            return
        # the draft's q carries the penalties of its own history (output + the segment so far)
        token, q, _ = draw_draft(apply_penalties(logits, seq.params, seq.request.prompt_ids,
                                                 [*seq.output_ids, *st.draft]), seq)
        st.entropies.append(h)
        st.draft.append(token)
        st.draft_q.append(q)
        st.draft_means.append(mean)
        if len(st.draft) >= segment_budget(seq, self.max_segment) or token in stop_ids(ctx, seq):
            st.verify_now, st.end_mean = True, mean

    def _settle_segment(self, ctx, seq, st, block) -> list[Proposal]:
        """Verify the drafted segment against the large model's ``block`` (k+1, V) and roll both models back."""
        draft = st.draft
        q = torch.stack(st.draft_q) if draft and st.draft_q[0] is not None else None
        # position j is verified against the large model with the history output + draft[:j] (lossless)
        target = positions_penalized(block, seq.params, seq.request.prompt_ids, seq.output_ids, draft)
        kept, token = accept_block(draft=draft, q=q, logits=target, params=seq.params, tolerance=self.verify,
                                   generator=seq.generator)
        self._rollback(ctx, seq, st, len(seq.ids) + kept)
        del st.entropies[len(st.entropies) - len(draft) + kept:]
        st.entropies.append(float(entropy_bits(block[kept])))  # the large model wrote this position
        mean = st.draft_means[kept] if kept < len(draft) else st.end_mean
        out = [Proposal(t, block[i], Provenance(SMALL, self._mark(SMALL, st.draft_means[i], verified=True)))
               for i, t in enumerate(draft[:kept])]
        out.append(Proposal(token, block[kept], Provenance(LARGE, self._mark(LARGE, mean))))
        st.writers += [SMALL] * kept + [LARGE]
        st.num_drafted, st.num_kept = st.num_drafted + len(draft), st.num_kept + kept
        st.num_segments += 1
        if st.end_by_rule and kept == len(draft):  # the rule handed this position to the large model
            st.active, st.since_switch, st.num_switches = LARGE, 1, st.num_switches + 1
        else:
            st.since_switch += kept + 1
        st.reset_segment()
        return out

    def _rollback(self, ctx, seq, st, num_verified: int) -> None:
        """Drop K/V past the verified tokens in both models (rejected drafts never reach a prefix cache)."""
        ctx.truncate_lane(seq, None, num_verified)
        if st.lane is not None:
            ctx.truncate_lane(seq, st.lane, num_verified)

