"""Speculative drafting under a constraint: drafts checked by the constraint, verified against the
constrained target, forced text drafted with no model.

Each step, per sequence: the drafter proposes tokens (``Speculative``'s draft sources); the draft is
cut at the first token the constraint rejects (no verify row is spent on a forbidden token); then
the text the constraint forces after it (``constraints.forced``: JSON keys, punctuation, regex
literals) is appended, tokenized, with no model. One verify row per sequence carries all of it in
the step's shared forward.

Verification follows the constrained target p~(x) = p(x) c(x) / Z position by position:

- ``awrs`` (and ``masked`` with one-hot drafts: n-gram, forced, greedy model drafts): draw x from
  p~ with the constrained sampler exactly as ``Constrained`` does, emit x, and keep going only if
  x equals the draft. This is the speculative rule for a one-hot draft (keep d with probability
  p~(d), else a draw from p~ without d), so the output is exactly single-particle constrained
  sampling, and with the same seed it is the same text token for token: the sampler consumes the
  request's random stream in the same order. AWRS needs no normaliser Z for this.
- ``masked`` with a model's sampled drafts (distributions q): the full rule min(1, p~(d) / q(d))
  with residual max(0, p~ - q), p~ from the exact mask.
- greedy: the constrained argmax at each position, as without speculation.

Penalties and ``logit_bias`` enter every position with its own history (the output, then the block's
tokens before it), in both rules, so the target is the penalized constrained one and stays exact.

With ``num_particles > 1`` every particle drafts (forced text, plus n-gram lookup on its own
tokens) and verifies in its own row of the same forward; each emitted token carries the same
incremental weight as without speculation (the sampler's unbiased estimate of Z), so a particle's
weight is the same product and the SMC estimate of the marginal likelihood stays unbiased whatever
number of tokens a step advances (resampling between steps of particles of different lengths keeps
E[sum of w V], V the valid-completion mass of a prefix).
"""

from __future__ import annotations

import torch

from decodekit.constraints.awrs import NEG_INF, check_all
from decodekit.constraints.base import ConstraintTimeout
from decodekit.constraints.forced import forced_tokens
from decodekit.constraints.masking import mask_draws
from decodekit.drafting.drafters import MAX_CONFIDENCE, Draft, ngram_lookup
from decodekit.drafting.state import SpecState
from decodekit.sampling import apply_penalties, draw
from decodekit.strategies.base import Proposal, Row
from decodekit.strategies.constrained import Constrained, ConstrainedState, _own_state
from decodekit.strategies.speculative import MAX_DRAFT_TOKENS, Speculative, block_logits, stop_ids, verify_row

SMC_DRAFTS = ("forced", "ngram")
LAYOUT_HISTORY = 512  # prompt tokens whose text layout guesses learn from


class ConstrainedSpeculative(Constrained):
    """``Constrained`` whose steps draft and verify with ``speculative``'s draft source; built by
    ``generate(..., strategy=Speculative(...), constraint=...)``."""

    name = "constrained_speculative"
    first_token_from_prefill = False  # its steps plan a verify row (drafts, forced text) even with logits ready

    def __init__(self, constraint, speculative: Speculative, sampler: str = "awrs", num_particles: int = 1,
                 ess_threshold: float = 0.5, **options):
        super().__init__(constraint, sampler, num_particles, ess_threshold, **options)
        if not isinstance(speculative, Speculative):
            raise ValueError(f"speculative must be a Speculative strategy, got {speculative!r}")
        if num_particles > 1 and speculative.draft not in SMC_DRAFTS:
            raise ValueError(f"SMC particles (num_particles > 1) draft with {SMC_DRAFTS} only (a draft model or "
                             f"head would need a cache per particle), got draft={speculative.draft!r}")
        self.spec = speculative

    def attach(self, ctx) -> None:
        self.spec.attach(ctx)

    def extra_slots(self, request) -> int:
        if self.num_particles > 1:  # a particle's drafts stay within its max_new_tokens, already counted
            return super().extra_slots(request)
        return min(MAX_DRAFT_TOKENS, request.params.max_new_tokens) + 1

    def step_slots(self, seq) -> int:
        run = st.smc if (st := _own_state(seq)) is not None else None
        alive = sum(p.alive for p in run.particles) if run is not None else 1
        return super().step_slots(seq) + alive * MAX_DRAFT_TOKENS

    def stats(self, seqs) -> dict:
        out = super().stats(seqs)
        spec = self.spec.stats(seqs)
        states = [st for s in seqs if isinstance(st := s.state, SpecState)]
        return out | {k: v for k, v in spec.items() if k != "target_forward_passes"} | {
            "forced_tokens": sum(st.forced for st in states), "layout_tokens": sum(st.layout for st in states),
            "target_forward_passes": spec["target_forward_passes"]}

    def _state(self, ctx, seq) -> ConstrainedState:
        seq.state_as(SpecState)  # the drafters' state; the constraint's lives beside it (``seq.parts``)
        return super()._state(ctx, seq)

    # ---- one particle -------------------------------------------------------------------------
    def plan(self, ctx, seqs):
        if self.num_particles > 1:
            return self._plan_particles(ctx, seqs)
        for seq in seqs:
            self._state(ctx, seq)
            seq.state.cut_q = None
        # A sampled draft verified by the q rule must not be cut before its length is chosen (the cut
        # depends on the drafted token itself): it is cut after, and its first forbidden token counts
        # as rejected, the residual drawn against its q.
        drafts = self.spec.choose_drafts(ctx, seqs, cut=lambda d, s: d if self._q_rule(s, d.q)
                                         else self._admissible_draft(ctx, s, d))
        drafts = [self._cut_sampled(s, d) if self._q_rule(s, d.q) else d for s, d in zip(seqs, drafts)]
        self._masks_beside_forward(ctx, seqs)  # the block's first position
        self._draft_masks_beside_forward(ctx, seqs, drafts)  # the positions after each draft token
        return [row for seq, draft in zip(seqs, drafts) if (row := verify_row(ctx, seq, draft)) is not None]

    def _draft_masks_beside_forward(self, ctx, seqs, drafts) -> None:
        """The matcher state after each draft token (llguidance: a copy per token, the track's own state
        untouched), kept for the verify and their masks queued beside the forward: every verify position
        then draws on a prefetched mask, not only the first."""
        by_index: dict[int, tuple] = {}
        for seq, draft in zip(seqs, drafts):
            st = _own_state(seq)
            st.draft_states = []
            if not draft.tokens or not mask_draws(st.index, st.track.fsa_state):
                continue
            state = st.track.fsa_state
            for token in draft.tokens:
                state = None if token in st.checker.eos_ids else st.index.next(state, token)
                if state is None:
                    break
                st.draft_states.append(state)
            by_index.setdefault(id(st.index), (st.index, []))[1].extend(st.draft_states)
        for index, states in by_index.values():
            if states:
                ctx.beside_forward(lambda index=index, states=states: index.prefetch(states))

    def _q_rule(self, seq, q) -> bool:
        """Drafts sampled from ``q`` are verified by the full rule (masked sampler, sampling)."""
        return self.sampler == "masked" and q is not None and not seq.params.greedy

    def _cut_sampled(self, seq, draft: Draft) -> Draft:
        st = _own_state(seq)
        try:
            kept = self._admissible(st, st.track.text, st.track.fsa_state, draft.tokens, seq)[0]
        except ConstraintTimeout:
            kept = 0
        seq.state.own = kept
        if kept < len(draft.tokens):
            seq.state.cut_q = draft.q[kept]
        return draft.prefix(kept)

    def update(self, ctx, seqs, rows):
        if self.num_particles > 1:
            return self._update_particles(ctx, seqs, rows)
        out = {}
        for seq, logits in block_logits(seqs, rows):
            state = seq.state
            draft, state.draft = state.draft, None
            st = _own_state(seq)
            try:
                proposals, accepted, error = self._verify(ctx, seq, st, draft, logits)
            except ConstraintTimeout as e:
                proposals, accepted, error = [], 0, str(e)
            self.spec.settle(ctx, seq, draft, accepted, drafted=min(state.own, len(draft.tokens)))
            structural = max(0, min(accepted, len(draft.tokens)) - state.own)
            state.forced += min(structural, state.num_forced)
            state.layout += structural - min(structural, state.num_forced)
            if error is not None and not proposals:
                self._fail(ctx, seq, st, error)
            else:  # a dead end after some kept tokens: they are output; the next step meets it again and fails
                out[seq.seq_id] = proposals
        return out

    def _admissible_draft(self, ctx, seq, draft: Draft) -> Draft:
        """The draft cut at the first token the constraint rejects, then the forced text after it (no draft
        where a check runs out of time: the step's own draw meets it and ends the request)."""
        try:
            return self._cut_and_force(ctx, seq, draft)
        except ConstraintTimeout:
            seq.state.own = seq.state.num_forced = 0
            return draft.prefix(0)

    def _cut_and_force(self, ctx, seq, draft: Draft) -> Draft:
        st = _own_state(seq)
        kept, text, fsa = self._admissible(st, st.track.text, st.track.fsa_state, draft.tokens, seq)
        draft = draft.prefix(kept)
        seq.state.own = kept
        room = min(MAX_DRAFT_TOKENS - kept, seq.params.max_new_tokens - len(seq.output_ids) - 1 - kept,
                   ctx.max_context - len(seq.ids) - 1 - kept)
        ended = any(t in stop_ids(ctx, seq) for t in draft.tokens)
        extra, seq.state.num_forced = ([], 0) if ended else self._forced(ctx, seq, text, room, fsa)
        return _extend(draft, extra)

    def _admissible(self, st, text: bytes, fsa, tokens: list[int], seq) -> tuple[int, bytes, object]:
        """How many of ``tokens`` the constraint allows in a row after ``text`` (and the text and
        automaton state after them)."""
        kept = 0
        for token in tokens:
            if token in st.checker.eos_ids:
                if not self.constraint.complete_ok(text):
                    break
            elif st.index is not None and fsa is not None:
                nxt = st.index.next(fsa, token)
                if nxt is None:
                    break
                fsa = nxt
            elif not st.checker.accept_fn(text)(token):
                break
            text += st.checker.token_bytes[token] or b""
            kept += 1
        return kept, text, fsa

    def _forced(self, ctx, seq, text: bytes, limit: int, fsa=None) -> tuple[list[int], int]:
        """(tokens, how many are strictly forced): the forced text after ``text``, then layout guesses
        (learnt from the prompt's and the text's own layout); with no byte automaton (a JSON schema on
        llguidance), llguidance's forced tokens."""
        forced = forced_tokens(self.constraint, ctx.tokenizer)
        index = _own_state(seq).index
        if forced is None and mask_draws(index, fsa):
            tokens = index.forced(fsa, limit)
            return tokens, len(tokens)
        if forced is None or limit <= 0:
            return [], 0
        state = seq.state
        if state.prompt_bytes is None:
            pieces = _own_state(seq).checker.token_bytes
            state.prompt_bytes = b"".join(pieces[t] or b"" for t in seq.request.prompt_ids[-LAYOUT_HISTORY:])
        return forced.draft(text, limit, state.prompt_bytes)

    def _verify(self, ctx, seq, st, draft: Draft, logits) -> tuple[list[Proposal], int, str | None]:
        """(proposals, drafts kept, dead-end message) for one verify block: each position emits what
        the constrained sampler draws there; the block goes on while that equals the draft."""
        track, tokens, out = st.track, draft.tokens, []
        stops = stop_ids(ctx, seq)
        for i in range(len(tokens) + 1):
            row = logits[i]
            final = len(seq.output_ids) + i >= seq.params.max_new_tokens - 1
            before = st.begin_draw()
            if final and self.constraint.complete_ok(track.text):
                eos = st.checker.eos_token()
                return [*out, Proposal(eos, row, st.provenance(before, eos, track.text, "forced"))], i, None
            d = tokens[i] if i < len(tokens) else None
            q = draft.q[i] if d is not None and draft.q is not None else None
            cut_q = seq.state.cut_q if d is None and not final else None
            token = (self._masked_rule(ctx, seq, st, row, None, cut_q) if cut_q is not None
                     else self._position(ctx, seq, st, row, d, q, final))
            if token is None:
                return out, i, ("max_new_tokens reached before the text could be completed" if final
                                else "no token can continue the text under the constraint (dead end)")
            source, detail = ("draft_accepted", {"draft": self._draft_kind(seq, i)}) if token == d else (
                ("bonus", {"draft": self.spec.draft_name}) if tokens else ("sampled", {}))
            provenance = st.provenance(before, token, track.text, source, **detail)
            kept = st.draft_states[i] if token == d and i < len(st.draft_states) else None
            self._advance(ctx, st, track, token, kept)
            out.append(Proposal(token, row, provenance))
            if token != d or token in stops:
                return out, i + (token == d), None
        raise AssertionError("unreachable: the bonus position always returns")

    def _draft_kind(self, seq, i: int) -> str:
        """Where draft position ``i`` came from: the draft source's own tokens, forced text, a layout guess."""
        state = seq.state
        if i < state.own:
            return self.spec.draft_name
        return "forced_text" if i < state.own + state.num_forced else "layout"

    def _position(self, ctx, seq, st, row, d: int | None, q, final: bool) -> int | None:
        """The token emitted at one position (None: dead end)."""
        if d is not None and self._q_rule(seq, q):
            return self._masked_rule(ctx, seq, st, row, d, q)
        token_draw = self._draw(ctx, seq, st, st.track, row, final=final)
        return None if token_draw.logw == NEG_INF else token_draw.token

    def _masked_rule(self, ctx, seq, st, row, d: int | None, q: torch.Tensor) -> int | None:
        """Speculative acceptance of a sampled draft d ~ q against the exactly masked target; d None:
        the draft there was a token the constraint forbids (rejected for sure), so only the residual."""
        track = st.track
        logp = self._logp(ctx, seq, apply_penalties(row, seq.params, seq.request.prompt_ids, track.out))
        allowed = (self._exact_mask(st, track, logp) if st.index is not None and track.fsa_state is not None
                   else check_all(logp=logp, accept=st.checker.accept_fn(track.text)))
        st.draws += 1
        masked = logp.masked_fill(~allowed, NEG_INF)
        log_z = float(torch.logsumexp(masked, 0))
        if log_z == NEG_INF:
            return None
        p = (masked - log_z).exp().float()
        q = q.float().cpu()
        if d is not None and float(torch.rand((), generator=seq.generator)) < float(p[d] / q[d].clamp_min(1e-30)):
            return d
        residual = (p - q).clamp_min(0.0)
        return draw(residual if float(residual.sum()) > 0 else p, seq.generator)

    # ---- SMC particles --------------------------------------------------------------------------
    def _plan_particles(self, ctx, seqs):
        rows = []
        for seq in seqs:
            st = self._state(ctx, seq)
            run = st.smc or self._start_smc(ctx, seq)
            if run.first_logits is not None:
                continue
            prompt = seq.request.prompt_ids
            for p in run.particles:
                if not p.alive:
                    continue
                ids = prompt + p.out
                if p.lane.closed:  # released by a preemption: reopen through the prefix cache
                    p.lane = ctx.open_lane(seq, ids, mirror=False)
                drafts = self._particle_draft(ctx, seq, st, p, ids)
                rows.append(Row(seq, ids[len(p.lane):] + drafts, len(drafts) + 1, lane=p.lane,
                                key=(p, drafts)))
        self._masks_beside_forward(ctx, seqs)
        return rows

    def _particle_draft(self, ctx, seq, st, p, ids: list[int]) -> list[int]:
        try:
            return self._particle_tokens(ctx, seq, st, p, ids)
        except ConstraintTimeout:
            return []

    def _particle_tokens(self, ctx, seq, st, p, ids: list[int]) -> list[int]:
        room = min(MAX_DRAFT_TOKENS, seq.params.max_new_tokens - len(p.out) - 1)
        if room <= 0:
            return []
        tokens = []
        if self.spec.draft == "ngram":
            tokens = ngram_lookup(ids, num_tokens=room, max_ngram=self.spec.max_ngram, min_ngram=self.spec.min_ngram,
                                  match_caps=self.spec.lookup_caps(ctx))[1]
        kept, text, fsa = self._admissible(st, p.text, p.fsa_state, tokens, seq)
        tokens = tokens[:kept]
        if any(t in st.checker.eos_ids for t in tokens):
            return tokens
        return tokens + self._forced(ctx, seq, text, room - kept, fsa)[0]

    def _update_particles(self, ctx, seqs, rows):
        for row in rows:
            particle, drafts = row.key
            particle.block = (row.logits, drafts)
        return self._update_smc(ctx, seqs)

    def _smc_advance(self, ctx, seq, run) -> None:
        st = _own_state(seq)
        first, run.first_logits = run.first_logits, None
        for p in run.particles:
            if p.alive:
                logits, drafts = (first[None], []) if first is not None else p.block
                p.block = None
                self._advance_particle(ctx, seq, st, p, logits, drafts)
            self._apply_critic(p)
        self._maybe_resample(ctx, seq, run)

    def _advance_particle(self, ctx, seq, st, p, logits, drafts: list[int]) -> None:
        """Emit the sampler's draws along the block while they equal the drafts; each draw's weight
        joins the particle's as without speculation."""
        spec_state = seq.state
        spec_state.drafted += len(drafts)
        spec_state.steps += bool(drafts)
        for i in range(len(drafts) + 1):
            row = logits[i]
            if len(p.out) >= seq.params.max_new_tokens - 1:
                self._force_eos(ctx, seq, st, p, row)
                return
            token_draw = self._draw(ctx, seq, st, p, row)
            p.logw += token_draw.logw
            if token_draw.logw == NEG_INF:
                self._drop(ctx, seq, p)
                return
            if token_draw.token in st.checker.eos_ids:
                p.eos, p.done = token_draw.token, True
                self._drop(ctx, seq, p)
                return
            self._advance(ctx, st, p, token_draw.token)
            if seq.params.logprobs is not None:
                p.logits.append(row)
            if i == len(drafts) or token_draw.token != drafts[i]:
                break
            spec_state.accepted += 1
        # keep only K/V of tokens the particle kept
        ctx.truncate_lane(seq, p.lane, min(len(p.lane), len(seq.request.prompt_ids) + len(p.out) - 1))


def _extend(draft: Draft, extra: list[int]) -> Draft:
    if not extra:
        return draft
    confidence = None if draft.confidence is None else [*draft.confidence, *[MAX_CONFIDENCE] * len(extra)]
    q = draft.q
    if q is not None:  # forced tokens are one-hot proposals
        one_hot = torch.zeros((len(extra), q.shape[1]), dtype=q.dtype)
        one_hot[torch.arange(len(extra)), torch.tensor(extra)] = 1.0
        q = torch.cat([q, one_hot.to(q.device)])
    return Draft([*draft.tokens, *extra], q, confidence)



