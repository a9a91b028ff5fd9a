"""Entropy-adaptive model switching (EAD): a small model writes the easy tokens, a large one the hard ones.

"Entropy Adaptive Decoding: Dynamic Model Switching for Efficient Inference" (2025). At every position
the active model computes its next-token distribution; its entropy in bits (raw logits, before
temperature) joins a rolling window. When the window's mean reaches ``threshold`` the large model
writes, below it the small one; after a switch the new model must write ``min_dwell`` tokens before
the next one (hysteresis against flapping).

Semantics, chosen so the limits are exact: the token at a position is written by the model the rule
picks *after* seeing the active model's entropy there. On a switch the incoming model catches up
(prefills only the tokens it has not seen, through its own cache namespace and lane), computes the
same position, and its entropy replaces the outgoing one in the window. Hence ``threshold=0`` is
exactly the large model's decoding and ``threshold=inf`` exactly the small model's. The first position
uses the engine's model, whose logits admission computed for free.

On the one-step engine each sequence plans one row per step on the model that computes its next
position (``Row(..., lane=<the other model's lane>)`` for the model the engine did
not load), so both models' rows of every running request share the step's one forward per model. A
switch costs one step without a token: the step that saw the outgoing model's entropy proposes
nothing, and the next one computes the position on the incoming model. Every token carries
``Provenance("small" | "large", {"entropy": <the window mean that chose its writer>})``.
``verify=`` (``entropy_verified``) has the large model check the small one's segments.

One of ``small`` / ``large`` is the engine's own model (the one ``LLM(...)`` loaded; by default the
large one); the strategy loads the other. The engine's model uses the sequence's main KV; the other
model's lane (a mirror lane, released by the engine with the sequence) lives in ``seq.state``.
"""

from __future__ import annotations

import math

import torch

from decodekit.drafting.cascade import check_tolerance
from decodekit.sampling import apply_penalties, entropy_bits, sample_token
from decodekit.strategies.base import Proposal, Row, Strategy
from decodekit.strategies.entropy_rule import (
    LARGE,
    SMALL,
    ModelSide,
    SwitchState,
    check_same_tokenizer,
    choose_model,
    default_small,
    is_main_spec,
    load_like,
    param_weighted_cost,
    rolling_mean,
    segment_budget,
)
from decodekit.strategies.entropy_verified import VerifiedMode
from decodekit.types import Provenance

__all__ = ["LARGE", "SMALL", "EntropySwitch", "SwitchState", "check_same_tokenizer", "choose_model",
           "param_weighted_cost", "rolling_mean"]

class EntropySwitch(VerifiedMode, Strategy):
    """Entropy-adaptive switching between a ``small`` and a ``large`` model sharing a tokenizer.

    ``small`` / ``large``: a model name, a ``Backend``, or ``None`` for the engine's model. By default
    ``large`` is the engine's model and ``small`` its distilled student ``<alias>-distill-8l``
    (``decodekit distill``). ``threshold`` (bits, >= 0, ``math.inf`` allowed), ``window`` (tokens in the
    rolling mean) and ``min_dwell`` (tokens a model writes after a switch before the next) tune it.
    ``constraint`` (a decodekit ``Constrained``) makes every token go through constrained decoding
    (``Constrained(constraint, sampler)``, one particle) on the writing model's logits.

    ``verify`` (speculative cascades): ``None`` lets the small model's tokens stand; a tolerance in
    [0, 1] has the large model score each segment the small one wrote (up to ``max_segment`` tokens,
    while the entropy rule keeps it writing) in one forward and keep the longest prefix that passes
    ``cascade.accept_block``: 0 is lossless (exactly the large model's output distribution; greedy:
    its tokens), larger tolerances keep more of the small model's tokens.
    """

    name = "entropy"

    def __init__(self, small=None, large=None, *, threshold: float = 1.0, window: int = 5, min_dwell: int = 4,
                 constraint=None, sampler: str = "awrs", verify: float | None = None, max_segment: int = 8):
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold) \
                or threshold < 0:
            raise ValueError(f"threshold must be a number >= 0 (bits; inf allowed), got {threshold!r}")
        for name, value in (("window", window), ("min_dwell", min_dwell), ("max_segment", max_segment)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.verify = check_tolerance(verify)
        if self.verify is not None and constraint is not None:
            raise ValueError("EntropySwitch: verify and constraint do not compose yet; give one of them")
        self.spec = {SMALL: small, LARGE: large}
        self.constrained = None
        if constraint is not None:  # the writer's logits go through constrained decoding (one particle)
            from decodekit.strategies.constrained import Constrained

            self.constrained = Constrained(constraint, sampler=sampler)
        self.threshold, self.window, self.min_dwell = float(threshold), window, min_dwell
        self.max_segment = max_segment
        self.models: dict[str, ModelSide] = {}
        self.main_role = LARGE

    # ---- set-up -------------------------------------------------------------------------------
    def attach(self, ctx) -> None:
        if self.models:
            raise ValueError("an EntropySwitch instance serves one engine; create one per LLM")
        main = ctx.backend
        roles = {role: is_main_spec(spec, main) for role, spec in self.spec.items()}
        if roles[SMALL] and roles[LARGE]:
            raise ValueError("EntropySwitch: small and large are both the engine's model; give two models")
        if not roles[SMALL] and not roles[LARGE]:
            if self.spec[LARGE] is not None and self.spec[SMALL] is not None:
                raise ValueError(f"EntropySwitch: one of small/large must be the engine's model {main.name!r} "
                                 "(LLM(...) loads it); pass the other one")
            roles[LARGE if self.spec[LARGE] is None else SMALL] = True
        self.main_role = SMALL if roles[SMALL] else LARGE
        other_role = LARGE if self.main_role == SMALL else SMALL
        other = self.spec[other_role]
        if other is None:
            other = default_small(main.name)
        other_backend = load_like(other, main)
        check_same_tokenizer(main, other_backend)
        self.models = {self.main_role: ModelSide(self.main_role, main, True),
                       other_role: ModelSide(other_role, other_backend, False)}

    def validate(self, request) -> None:
        if self.constrained is not None:
            self.constrained.validate(request)
        limit = min(m.backend.max_context for m in self.models.values())
        if len(request.prompt_ids) + request.params.max_new_tokens > limit:
            raise ValueError(f"prompt + max_new_tokens exceeds the smaller model's context ({limit})")

    def extra_slots(self, request) -> int:
        return 0 if self.verify is None else self.max_segment + 1  # a drafted segment in the main handle

    def step_slots(self, seq) -> int:
        return super().step_slots(seq) + self.extra_slots(None)

    # ---- plan: one row per sequence, on the model that computes its next position(s) ----------
    def plan(self, ctx, seqs):
        rows = []
        for seq in seqs:
            st = seq.state if isinstance(seq.state, SwitchState) else self._new_state(seq)
            role, extra, num_logits = self._next_job(seq, st)
            st.job = (role, len(extra), num_logits)
            row = self._row(ctx, seq, st, role, seq.ids + extra, num_logits)
            if row is not None:
                rows.append(row)
        return rows

    def _new_state(self, seq) -> SwitchState:
        seq.state = SwitchState(self.main_role)
        return seq.state

    def _next_job(self, seq, st) -> tuple[str, list[int], int]:
        """(model, ids after ``seq.ids``, logits wanted) for this step: plain switching computes the
        writer's next position; verified mode drafts with the small model, then has the large one
        score the segment (k drafts: k + 1 logits) or write on its own."""
        if self.verify is None or st.active == LARGE:
            return st.active, [], 1
        if not st.verify_now and not st.draft and segment_budget(seq, self.max_segment) == 0:
            st.verify_now, st.end_mean = True, rolling_mean(st.entropies, self.window)
        if st.verify_now:
            return LARGE, st.draft, len(st.draft) + 1
        return SMALL, st.draft, 1

    def _row(self, ctx, seq, st, role, ids, num_logits):
        """The row computing ``role``'s logits after each of the last ``num_logits`` tokens of ``ids``
        (catching the model up on tokens it has not seen); None when ready logits cover it. The
        engine's ready next-token logits are used when they fit, else dropped (never left for the
        other model's position)."""
        ready = seq.take_next_logits()
        model = self.models[role]
        lane = self._lane(ctx, seq, st, role)
        computed = seq.num_cached if lane is None else len(lane)
        st.head = None
        if model.is_main and ready is not None and num_logits == len(ids) - len(seq.ids) + 1 \
                and computed == len(seq.ids):
            st.head, num_logits = ready, num_logits - 1
            if num_logits == 0:
                return None
        keep = len(ids) - num_logits
        if computed > keep:
            ctx.truncate_lane(seq, lane, keep)  # recompute what a full prefix hit left without logits
            computed = keep
        new_ids = ids[computed:]
        st.forward_tokens[role] += len(new_ids)
        model.forward_tokens += len(new_ids)
        return Row(seq, new_ids, num_logits, lane=lane)

    def _lane(self, ctx, seq, st, role):
        """``role``'s lane for ``seq``: None for the engine's model (the main KV), else the other
        model's mirror lane, opened on first use (and after a preemption closed it)."""
        model = self.models[role]
        if model.is_main:
            return None
        if st.lane is None or st.lane.closed:
            st.lane, st.committed = ctx.open_lane(seq, seq.ids, model.backend), False
        return st.lane

    # ---- update: entropy, the rule, tokens ------------------------------------------------------
    def update(self, ctx, seqs, rows):
        by_seq = {r.seq.seq_id: r.logits for r in rows}
        writing, out = [], {}
        for seq in seqs:
            st = seq.state
            parts = [x for x in (None if st.head is None else st.head[None], by_seq.get(seq.seq_id)) if x is not None]
            block = parts[0] if len(parts) == 1 else torch.cat(parts)  # (num_logits, V)
            st.head = None
            self._commit_other(ctx, seq, st)
            if self.verify is None:
                if self._switch_rule(seq, st, block[-1]):
                    writing.append((seq, block[-1]))
            else:
                out[seq.seq_id] = self._verified_step(ctx, seq, st, block)
        out.update(self._write(ctx, writing))
        return out

    def _commit_other(self, ctx, seq, st) -> None:
        """Once the other model has computed the prompt, it enters that model's prefix cache (siblings reuse it)."""
        if st.lane is not None and not st.lane.closed and not st.committed and len(st.lane) <= len(seq.ids):
            ctx.commit_lane(seq, st.lane)
            st.committed = True

    def choose(self, seq, st) -> str:
        """The model that writes ``seq``'s current position (plain mode): the entropy rule. Benchmark
        baselines override it (random or fixed schedules at the same large-model share)."""
        return choose_model(active=st.active, mean_entropy=st.decision_mean, threshold=self.threshold,
                            since_switch=st.since_switch, min_dwell=self.min_dwell)

    def _switch_rule(self, seq, st, logits) -> bool:
        """Plain switching: fold this position's entropy into the window and decide its writer.
        True: the active model writes it now; False: a switch, the incoming model computes it next step."""
        h = float(entropy_bits(logits))
        if st.switching:  # the switched-in model's entropy replaces the outgoing one's
            st.entropies[-1], st.switching = h, False
            return True
        st.entropies.append(h)
        st.decision_mean = rolling_mean(st.entropies, self.window)
        choice = self.choose(seq, st)
        if choice == st.active:
            return True
        st.active, st.since_switch, st.num_switches, st.switching = choice, 0, st.num_switches + 1, True
        return False

    def _write(self, ctx, writing) -> dict:
        """Each writer's token from its logits (through constrained decoding when a constraint is set)."""
        if not writing:
            return {}
        seqs = [s for s, _ in writing]
        if self.constrained is None:
            drawn = {s.seq_id: [Proposal(sample_token(apply_penalties(lg, s.params, s.request.prompt_ids, s.output_ids),
                                                      s.params, s.generator), lg)] for s, lg in writing}
        else:  # Constrained takes ready ``seq.next_logits`` as they are (and applies the penalties itself)
            for seq, logits in writing:
                seq.next_logits = logits
            drawn = self.constrained.update(ctx, seqs, [])
            for seq in seqs:
                seq.next_logits = None  # never leave one model's logits where the main model's are expected
        out = {}
        for seq in seqs:
            st = seq.state
            mark = self._mark(st.active, st.decision_mean)
            out[seq.seq_id] = [Proposal(p.token_id, p.logits, Provenance(st.active, {**p.provenance.detail, **mark}))
                               for p in drawn.get(seq.seq_id, [])]
            st.writers.extend([st.active] * len(out[seq.seq_id]))
            st.since_switch += 1
        return out

    @staticmethod
    def _mark(role: str, mean: float, verified: bool = False) -> dict:
        detail = {"entropy": round(mean, 4)}
        return {**detail, "verified": True} if verified else detail

    # ---- life cycle and stats -------------------------------------------------------------------
    def on_preempt(self, ctx, seq) -> None:
        if isinstance(seq.state, SwitchState):
            seq.state.drop_segment()  # its K/V went with the released lanes; the segment is drafted again

    def stats(self, seqs) -> dict:
        states = [s.state for s in seqs if isinstance(s.state, SwitchState)]
        writers = ["".join("L" if w == LARGE else "S" for w in s.state.writers[: len(s.output_ids)])
                   for s in seqs if isinstance(s.state, SwitchState)]
        num_large = sum(w.count("L") for w in writers)
        num_small = sum(w.count("S") for w in writers)
        total = num_small + num_large
        params = {role: m.backend.num_params for role, m in self.models.items()}
        fwd = {role: sum(st.forward_tokens[role] for st in states) for role in (SMALL, LARGE)}
        measured = (fwd[SMALL] * params[SMALL] + fwd[LARGE] * params[LARGE]) / (total * params[LARGE]) if total else 0.0
        extra = self.constrained.stats(seqs) if self.constrained is not None else {}
        return {
            **extra,
            **(self._verify_stats(states) if self.verify is not None else {}),
            "provenance": writers,  # per choice, one letter per generated token: S small, L large
            "tokens_by_model": {SMALL: num_small, LARGE: num_large},
            "large_share": num_large / total if total else 0.0,
            "num_switches": sum(st.num_switches for st in states),
            "cost_param_weighted": param_weighted_cost(num_small, num_large, params[SMALL], params[LARGE]),
            "forward_tokens": fwd,  # decode, catch-up prefill and verify rows; the engine's prompt prefill excluded
            "cost_measured_param_weighted": measured,
            "mean_entropy_bits": sum(sum(st.entropies) for st in states)
            / max(1, sum(len(st.entropies) for st in states)),
        }

    def _verify_stats(self, states) -> dict:
        drafted, kept = sum(st.num_drafted for st in states), sum(st.num_kept for st in states)
        return {"verify_tolerance": self.verify, "tokens_drafted": drafted, "tokens_kept": kept,
                "acceptance_rate": kept / drafted if drafted else 0.0,
                "segments": sum(st.num_segments for st in states)}

