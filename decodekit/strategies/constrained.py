"""Constrained generation: every output satisfies a constraint (regex, JSON schema, grammar, ...).

``Constrained(constraint, sampler="awrs" | "masked", num_particles=1, ess_threshold=0.5)``.
With one particle each engine step draws one token per sequence (AWRS: a few constraint checks;
masked: the whole vocabulary, or the exact automaton mask; with llguidance the mask, filled on a
worker thread while the step's forward runs: ``ctx.beside_forward``) and streams it. With
``num_particles > 1`` each sequence runs sequential Monte Carlo inside its engine request: the
particles fork the prompt's KV handle (no copy), advance together in one batched forward per
step, resample by ESS, and at the end one particle, drawn by weight, is proposed to the engine
in one go (so SMC output arrives at the end, not streamed). Particles, weights and the log
marginal-likelihood estimate are in ``Completion.stats.extra``.

The engine decides stops; this strategy only ends a sequence itself when no valid continuation
exists: it finishes it with ``finish_reason="constraint_failed"`` (``stats.extra["constraint_error"]``
says why), never presenting invalid text as valid. At the last allowed token a complete text is
ended with EOS (``max_new_tokens`` counts the EOS), so outputs stop by EOS wherever possible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from decodekit.constraints.awrs import NEG_INF, TokenDraw, check_all, masked_sample, recursive_awrs
from decodekit.constraints.base import Constraint, ConstraintTimeout, TokenChecker
from decodekit.constraints.forced import ForcedText, forced_text
from decodekit.constraints.masking import mask_draws, mask_token_draw
from decodekit.constraints.smc import (
    RESAMPLERS,
    Particle,
    ess,
    json_weight,
    log_mean_weight,
    normalized_weights,
    resample,
)
from decodekit.constraints.tokens import constrained_logp
from decodekit.sampling import apply_penalties, process_logits
from decodekit.strategies.base import Proposal, Row, Strategy, next_logits
from decodekit.types import Provenance

SAMPLERS = ("awrs", "masked")


@dataclass
class SmcRun:
    """One sequence's particle population: the first step reads the prefill's logits."""

    particles: list[Particle]
    first_logits: torch.Tensor | None
    resamples: int = 0
    ess_trace: list[float] = field(default_factory=list)
    alive_trace: list[int] = field(default_factory=list)
    log_ml: float | None = None
    results: list[dict] = field(default_factory=list)
    log_weights: list[list[float | None]] = field(default_factory=list)  # per step, per particle slot
    resample_events: list[dict] = field(default_factory=list)  # {"step", "ancestors"} per resampling

    def trace(self) -> dict:
        """The population's history for display: weights per step and slot, and each resampling."""
        return {"log_weights": self.log_weights, "resamples": self.resample_events}


@dataclass
class ConstrainedState:
    """Per-sequence state: the token checker, the automaton (if any), the streamed track, SMC run."""

    checker: TokenChecker
    index: object | None
    track: Particle
    draws: int = 0
    error: str | None = None
    smc: SmcRun | None = None
    num_allowed: int | None = None  # tokens the exact mask allowed at the last draw (None: no exact mask)
    forced_text: ForcedText | None = None  # the constraint's forced continuations (automaton constraints)
    # matcher states after each draft token of the verify block in flight (constrained speculative):
    # their masks fill beside the forward; the verify adopts a state only where it keeps that draft, so a
    # rejected draft's states are dropped and the track's state is the one before it (copy-on-advance)
    draft_states: list = field(default_factory=list)

    def begin_draw(self) -> int:
        """Start a token's provenance bookkeeping: returns the check count so far."""
        self.num_allowed = None
        return self.checker.num_checks

    def provenance(self, checks_before: int, token: int, text: bytes, source: str = "sampled",
                   **detail) -> Provenance:
        """``source`` with the checks spent on ``token`` (drawn after ``text``), or ``forced`` where the
        constraint left no choice: the exact mask allowed one token, or the token's bytes were all forced
        text (real tokenizers spell forced text several ways, so one allowed token id is rare)."""
        checks = self.checker.num_checks - checks_before
        if self.num_allowed == 1 or self._forces(token, text):
            if source != "sampled":
                detail["as"] = source  # e.g. a forced token that was also an accepted draft
            source = "forced"
        return Provenance(source, {**detail, "checks": checks})

    def _forces(self, token: int, text: bytes) -> bool:
        if self.forced_text is None:
            return False
        piece = None if token in self.checker.eos_ids else self.checker.token_bytes[token]
        return self.forced_text.forces(text, piece)
FINAL_CHECKS = 256  # one-particle last token: tokens tried before declaring the text incompletable


class Constrained(Strategy):
    name = "constrained"

    def __init__(self, constraint: Constraint, sampler: str = "awrs", num_particles: int = 1,
                 ess_threshold: float = 0.5, *, resampling: str = "systematic", critic=None,
                 exact_weights: str | bool = "auto"):
        if not isinstance(constraint, Constraint):
            raise ValueError(f"constraint must be a decodekit Constraint (Regex, JsonSchema, ...), got {constraint!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        if not isinstance(ess_threshold, (int, float)) or not 0 <= ess_threshold <= 1:
            raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold!r}")
        if resampling not in RESAMPLERS:
            raise ValueError(f"resampling must be one of {sorted(RESAMPLERS)}, got {resampling!r}")
        if critic is not None and not callable(critic):
            raise ValueError("critic must be a callable str -> log score (float), or None")
        if exact_weights not in ("auto", True, False):
            raise ValueError(f"exact_weights must be 'auto', True or False, got {exact_weights!r}")
        self.constraint = constraint
        self.sampler = sampler
        self.num_particles = num_particles
        self.ess_threshold = float(ess_threshold)
        self.resampling = resampling
        self.critic = critic
        self.exact_weights = exact_weights

    # ---- engine hooks ---------------------------------------------------------------------
    @property
    def first_token_from_prefill(self) -> bool:
        return self.num_particles == 1

    def validate(self, request) -> None:
        if not request.tokenizer.eos_token_ids:
            raise ValueError("constrained decoding needs a tokenizer with an EOS token")

    def lanes_per_sequence(self, request) -> int:
        # one particle decodes on the main KV; SMC's resampling forks the new particles before it closes the old
        return 1 + 2 * self.num_particles if self.num_particles > 1 else 1

    def extra_slots(self, request) -> int:
        # every particle may grow its own max_new_tokens beyond the shared prompt
        return (self.num_particles - 1) * (request.params.max_new_tokens + 1) + 1 if self.num_particles > 1 else 0

    def step_slots(self, seq) -> int:
        run = st.smc if (st := _own_state(seq)) is not None else None
        if self.num_particles == 1 or run is None:
            return super().step_slots(seq)
        prompt = seq.request.prompt_ids
        return sum(len(prompt) + len(p.out) - len(p.lane) for p in run.particles if p.alive) + 1

    def plan(self, ctx, seqs):
        if self.num_particles == 1:
            rows = super().plan(ctx, seqs)
            self._masks_beside_forward(ctx, seqs)
            return rows
        rows = []
        for seq in seqs:
            run = self._state(ctx, seq).smc or self._start_smc(ctx, seq)
            if run.first_logits is not None:
                continue
            for p in run.particles:
                if p.alive:
                    ids = seq.request.prompt_ids + p.out
                    if p.lane.closed:  # released by a preemption: reopen through the prefix cache
                        p.lane = ctx.open_lane(seq, ids, mirror=False)
                    rows.append(Row(seq, ids[len(p.lane):], lane=p.lane, key=p))
        self._masks_beside_forward(ctx, seqs)
        return rows

    def _masks_beside_forward(self, ctx, seqs) -> None:
        """Queue the next draw's masks (llguidance: the streamed track's state, or every live particle's)
        to be filled on a worker thread while the step's forward runs; the draws then find their allowed
        ids computed (the same ids: a state not prefetched computes them when the draw asks)."""
        by_index: dict[int, tuple] = {}
        for seq in seqs:
            st = self._state(ctx, seq)
            tracks = [p for p in st.smc.particles if p.alive] if st.smc is not None else [st.track]
            states = [t.fsa_state for t in tracks if mask_draws(st.index, t.fsa_state)]
            if states:
                by_index.setdefault(id(st.index), (st.index, []))[1].extend(states)
        for index, states in by_index.values():
            ctx.beside_forward(lambda index=index, states=states: index.prefetch(states))

    def update(self, ctx, seqs, rows):
        if self.num_particles == 1:
            return self._update_single(ctx, seqs, next_logits(seqs, rows))
        for row in rows:
            row.key.next_logits = row.logits[-1]
        return self._update_smc(ctx, seqs)

    def stats(self, seqs) -> dict:
        states = [st for s in seqs if (st := _own_state(s)) is not None]
        checks = sum(st.checker.num_checks for st in states)
        draws = sum(st.draws for st in states)
        out = {"sampler": self.sampler, "num_particles": self.num_particles, "constraint": self.constraint.name,
               "constraint_checks": checks, "token_draws": draws,
               "checks_per_token": checks / draws if draws else 0.0}
        errors = [st.error for st in states if st.error]
        if errors:
            out["constraint_error"] = errors[0]
        runs = [st.smc for st in states if st.smc is not None]
        if runs:
            out["resampling_events"] = sum(r.resamples for r in runs)
            out["ess_trace"] = runs[0].ess_trace
            out["particles_alive"] = runs[0].alive_trace
            out["log_ml"] = runs[0].log_ml
            out["log_ml_per_choice"] = [r.log_ml for r in runs]
            out["particles"] = runs[0].results
            out["smc_trace"] = runs[0].trace()
        return out

    # ---- one particle: a token per step, streamed ------------------------------------------
    def _update_single(self, ctx, seqs, logits_of: dict):
        out = {}
        for seq in seqs:
            st = self._state(ctx, seq)
            try:
                proposals = self._single_step(ctx, seq, st, logits_of[seq.seq_id])
            except ConstraintTimeout as e:
                self._fail(ctx, seq, st, str(e))
                continue
            if proposals is not None:
                out[seq.seq_id] = proposals
        return out

    def _single_step(self, ctx, seq, st, logits) -> list[Proposal] | None:
        """One token for one sequence, or None when it ends ``constraint_failed``."""
        track = st.track
        final = len(seq.output_ids) >= seq.params.max_new_tokens - 1
        before = st.begin_draw()
        if final and self.constraint.complete_ok(track.text):  # complete: end it while we may
            eos = st.checker.eos_token()
            return [Proposal(eos, logits, st.provenance(before, eos, track.text, "forced"))]
        # the last token must complete the text (the engine then ends it with "length")
        draw = self._draw(ctx, seq, st, track, logits, final=final)
        if draw.logw == NEG_INF:
            why = ("max_new_tokens reached before the text could be completed" if final
                   else "no token can continue the text under the constraint (dead end)")
            self._fail(ctx, seq, st, why)
            return None
        provenance = st.provenance(before, draw.token, track.text)
        self._advance(ctx, st, track, draw.token)
        return [Proposal(draw.token, logits, provenance)]

    # ---- SMC: particles inside the request, one answer at the end ---------------------------
    def _update_smc(self, ctx, seqs):
        out = {}
        for seq in seqs:
            run = _own_state(seq).smc
            try:
                self._smc_advance(ctx, seq, run)
            except ConstraintTimeout as e:
                self._fail(ctx, seq, _own_state(seq), str(e))
                continue
            if all(not p.alive for p in run.particles):
                proposals = self._smc_finish(ctx, seq, run)
                if proposals:
                    out[seq.seq_id] = proposals
        return out

    def _start_smc(self, ctx, seq) -> SmcRun:
        st = self._state(ctx, seq)
        particles = [Particle(ctx.fork_lane(seq), [], b"", fsa_state=st.track.fsa_state)
                     for _ in range(self.num_particles)]
        st.smc = SmcRun(particles, seq.take_next_logits())
        return st.smc

    def _smc_advance(self, ctx, seq, run) -> None:
        st = _own_state(seq)
        first, run.first_logits = run.first_logits, None
        for p in run.particles:
            if not p.alive:
                continue
            logits, p.next_logits = (first if first is not None else p.next_logits), None
            if len(p.out) >= seq.params.max_new_tokens - 1:
                self._force_eos(ctx, seq, st, p, logits)
            else:
                draw = self._draw(ctx, seq, st, p, logits)
                p.logw += draw.logw
                if draw.logw == NEG_INF:
                    self._drop(ctx, seq, p)
                elif draw.token in st.checker.eos_ids:
                    p.eos, p.done = draw.token, True
                    self._drop(ctx, seq, p)
                else:
                    self._advance(ctx, st, p, draw.token)
                    if seq.params.logprobs is not None:
                        p.logits.append(logits)
            self._apply_critic(p)
        self._maybe_resample(ctx, seq, run)

    def _force_eos(self, ctx, seq, st, p: Particle, logits) -> None:
        """EOS at the length limit: proposal prob 1, so the weight gains p(EOS) c(complete)."""
        eos = st.checker.eos_token()
        logp = self._logp(ctx, seq, apply_penalties(logits, seq.params, seq.request.prompt_ids, p.out))
        ok = self.constraint.complete_ok(p.text)
        p.logw += float(logp[eos]) if ok else NEG_INF
        p.eos, p.done = eos, True
        self._drop(ctx, seq, p)

    def _apply_critic(self, p: Particle) -> None:
        if self.critic is None or p.logw == NEG_INF:
            return
        score = float(self.critic(p.text.decode("utf-8", "replace")))
        p.logw += score - p.critic  # twist: only the change of the critic's score enters each step
        p.critic = score

    def _maybe_resample(self, ctx, seq, run) -> None:
        particles = run.particles
        logw = torch.tensor([p.logw for p in particles], dtype=torch.float64)
        value = ess(logw)
        run.ess_trace.append(round(value, 3))
        run.alive_trace.append(sum(p.alive for p in particles))
        run.log_weights.append([json_weight(p.logw) for p in particles])
        for p in particles:
            p.weight_trace.append(json_weight(p.logw))
        if any(p.alive for p in particles) and value < self.ess_threshold * len(particles) and value > 0:
            ancestors = RESAMPLERS[self.resampling](logw=logw, generator=seq.generator)
            run.particles = resample(particles, ancestors, fork=lambda lane: ctx.fork_lane(seq, lane),
                                     close=lambda lane: ctx.close_lane(seq, lane))
            run.resamples += 1
            run.resample_events.append({"step": len(run.log_weights) - 1, "ancestors": ancestors})

    def _smc_finish(self, ctx, seq, run):
        particles = run.particles
        logw = torch.tensor([p.logw for p in particles], dtype=torch.float64)
        w = normalized_weights(logw)
        run.log_ml = log_mean_weight(logw)
        run.results = [{"text": p.text.decode("utf-8", "replace"), "weight": float(wi),
                        "log_weight": json_weight(p.logw), "weight_trace": p.weight_trace}
                       for p, wi in zip(particles, w)]
        if float(w.sum()) == 0.0:
            self._fail(ctx, seq, _own_state(seq), "every particle reached a dead end or the length limit")
            return None
        pick = int(w.argmax()) if seq.params.greedy else int(torch.multinomial(w, 1, generator=seq.generator))
        chosen = particles[pick]
        logits = chosen.logits + [None] * (len(chosen.out) + 1 - len(chosen.logits))
        chosen_from = Provenance("sampled", {"particle": pick})
        return [Proposal(t, lg, chosen_from) for t, lg in zip(chosen.out + [chosen.eos], logits)]

    # ---- shared pieces -----------------------------------------------------------------------
    def _state(self, ctx, seq) -> ConstrainedState:
        st = _own_state(seq)
        if st is None:
            index = self.constraint.index(ctx.tokenizer) if self._uses_index() else None
            track = Particle(None, [], b"", fsa_state=index.initial() if index else None)
            st = ConstrainedState(TokenChecker(self.constraint, ctx.tokenizer), index, track,
                                  forced_text=forced_text(self.constraint))
            seq.parts[ConstrainedState] = st  # beside a composing strategy's own state, never inside it
        return st

    def _uses_index(self) -> bool:
        if self.sampler == "masked" or self.constraint.mask_grammar() is not None:  # llguidance: always mask
            return True
        return self.exact_weights is True or (self.exact_weights == "auto" and self.num_particles > 1)

    def _logp(self, ctx, seq, logits) -> torch.Tensor:
        """Log-probabilities (V,) the request samples from; tokens with no bytes (specials) get -inf."""
        return constrained_logp(logits, seq.params, ctx.tokenizer)

    def _draw(self, ctx, seq, st, track: Particle, logits, final: bool = False) -> TokenDraw:
        logits = apply_penalties(logits, seq.params, seq.request.prompt_ids, track.out)  # this particle's history
        checker = st.checker
        accept = checker.accept_fn(track.text, final=final)
        gen = None if seq.params.greedy else seq.generator
        st.draws += 1
        if mask_draws(st.index, track.fsa_state):  # an exact mask engine: no walk over the vocabulary
            return self._mask_draw(seq, st, track, logits, accept, final, gen)
        logp = self._logp(ctx, seq, logits)
        index = None if final else st.index
        if self.sampler == "masked":
            allowed = self._exact_mask(st, track, logp) if index else check_all(logp=logp, accept=accept)
            return masked_sample(logp=logp, allowed=allowed, generator=gen)
        # the last token must complete the text: often impossible, so search only the likely tokens
        draw = recursive_awrs(logp=logp, accept=accept, generator=gen, max_checks=FINAL_CHECKS if final else None)
        if index and track.fsa_state is not None and draw.logw > NEG_INF:
            # an exact automaton mask exists: use the exact local normaliser as the weight
            log_z = float(torch.logsumexp(logp.masked_fill(~self._exact_mask(st, track, logp), NEG_INF), 0))
            draw = TokenDraw(draw.token, log_z, draw.num_checks)
        return draw

    def _mask_draw(self, seq, st, track: Particle, logits, accept, final: bool, gen) -> TokenDraw:
        """A draw on llguidance's mask: over the K allowed tokens only (EOS where the text is complete)."""
        st.checker.num_checks += 1  # the EOS decision
        draw, st.num_allowed = mask_token_draw(
            st.index, track.fsa_state, self.constraint, track.text, process_logits(logits, seq.params),
            eos_ids=st.checker.eos_ids, pieces=st.checker.token_bytes, accept=accept, final=final, generator=gen,
            max_checks=FINAL_CHECKS)
        return draw

    def _exact_mask(self, st, track: Particle, logp) -> torch.Tensor:
        allowed = st.index.allowed(track.fsa_state)[: logp.shape[-1]]
        if allowed.shape[-1] < logp.shape[-1]:
            allowed = torch.cat([allowed, torch.zeros(logp.shape[-1] - allowed.shape[-1], dtype=torch.bool)])
        complete = self.constraint.complete_ok(track.text)
        st.checker.num_checks += 1
        for eos in st.checker.eos_ids:
            if eos < len(allowed):
                allowed[eos] = complete
        st.num_allowed = int(allowed.sum())
        return allowed

    def _advance(self, ctx, st, track: Particle, token: int, state=None) -> None:
        """Append ``token`` to ``track``; ``state``: its matcher state after ``token`` if already computed."""
        track.out.append(token)
        piece = st.checker.token_bytes[token]
        track.text += piece or b""
        if st.index is not None:
            track.fsa_state = state if state is not None else st.index.next(track.fsa_state, token)

    def _drop(self, ctx, seq, p: Particle) -> None:
        """A finished or dead particle needs no more KV: free its slots now."""
        ctx.close_lane(seq, p.lane)

    def _fail(self, ctx, seq, st, message: str) -> None:
        st.error = message
        ctx.finish(seq, "constraint_failed")


def _own_state(seq) -> ConstrainedState | None:
    """This strategy's state of ``seq`` (alone or composed: always its own part, ``seq.parts``)."""
    return seq.parts.get(ConstrainedState)
