"""Speculative drafting: draft k tokens cheaply, verify them in one target forward, lossless.

Each step, per sequence: the drafter proposes up to k tokens; the target scores the uncomputed
tail (normally the last sampled token) plus every draft in ONE row of the step's shared forward
(rows may have different k); ``verify_sampled`` / ``verify_greedy`` keep a prefix of the
drafts and pick the next token; the main KV is truncated to the verified tokens, so the
shared prefix cache only ever sees verified tokens. The engine appends the proposals one by one
and stops on EOS / stop strings / length inside the block, dropping the rest.
"""

from __future__ import annotations

import torch

from decodekit.drafting.acceptance import verify_greedy, verify_sampled
from decodekit.drafting.drafters import (
    MATCH_CAPS,
    Draft,
    Drafter,
    HeadDrafter,
    LookupThenModel,
    ModelDrafter,
    NgramDrafter,
    NoDrafter,
    best_length,
    calibrated,
    check_same_tokenizer,
    common_draft_length,
    int8_backend,
)
from decodekit.drafting.state import SpecState
from decodekit.profiles import SpeculationProfile, load_profile
from decodekit.sampling import positions_penalized, probs_from_logits
from decodekit.strategies.base import Proposal, Row, Strategy
from decodekit.types import SAMPLED, Provenance

MAX_DRAFT_TOKENS = 16
ADAPTIVE_START = 4
MAX_PAUSE = 16  # plain steps at most between two drafting attempts after repeated misses


class Speculative(Strategy):
    """Lossless speculative decoding.

    ``draft``: ``"ngram"`` (prompt lookup), ``"int8"`` (int8 copy of the target), a model name or
    a ``Backend`` (same tokenizer), ``"ngram+<any of those>"`` (lookup where the context recurs,
    the model elsewhere) or a ready ``Drafter``. ``num_draft_tokens``: k in 1..16, or ``"adaptive"``.
    Adaptive, for a single sequence and a drafter that estimates how likely each draft is accepted (all
    built-in ones: the draft's own probability, or n-gram hit rates by match length): each step keeps the draft prefix
    with the most expected tokens per unit of verify cost, under ``verify_cost`` (the cost of an
    m-token target forward against a 1-token one, entry m - 1). In a batch, or with a drafter that
    does not: start at 4, +2 after a fully accepted block, -1 after a rejection, and a single draft
    token rejected outright pauses drafting for 1, 2, 4, ... up to 16 plain steps. ``max_ngram`` /
    ``min_ngram``: the suffix sizes n-gram lookup tries; ``match_caps``: at most ``match_caps[n - 1]``
    lookup drafts after an n-token match (default the profile's, (1, 3): short matches predict poorly;
    ``()`` drafts k after any match).

    ``profile``: the economics these decisions use (``decodekit.profiles.SpeculationProfile`` or the
    path of a saved one); default: the profile ``decodekit profile`` saved for the target's model and
    device, else the measured CPU table on CPU and a near-flat one on CUDA. ``verify_cost`` /
    ``width_cost`` override its tables.
    """

    name = "speculative"

    def __init__(self, draft="ngram", num_draft_tokens: int | str = "adaptive", *, max_ngram: int = 3,
                 min_ngram: int = 1, match_caps: tuple[int, ...] | None = None, verify_cost=None,
                 width_cost=None, profile: SpeculationProfile | str | None = None):
        _check_draft(draft)
        self.profile = None if profile is None else load_profile(profile)
        self.verify_cost = None if verify_cost is None else _check_verify_cost(verify_cost)
        self.width_cost = None if width_cost is None else _check_width_cost(width_cost)
        adaptive = num_draft_tokens == "adaptive"
        if not adaptive and (not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool)
                             or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS):
            raise ValueError(f"num_draft_tokens must be an integer in 1..{MAX_DRAFT_TOKENS} or 'adaptive', "
                             f"got {num_draft_tokens!r}")
        if not isinstance(max_ngram, int) or isinstance(max_ngram, bool) or max_ngram < 1:
            raise ValueError(f"max_ngram must be an integer >= 1, got {max_ngram!r}")
        if not isinstance(min_ngram, int) or isinstance(min_ngram, bool) or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"min_ngram must be an integer in 1..max_ngram ({max_ngram}), got {min_ngram!r}")
        if match_caps is not None and (not isinstance(match_caps, (tuple, list)) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in match_caps)):
            raise ValueError(f"match_caps must be a tuple of integers >= 1, got {match_caps!r}")
        self.match_caps = None if match_caps is None else tuple(match_caps)
        self.draft = draft
        self.adaptive = adaptive
        self.max_k = MAX_DRAFT_TOKENS if adaptive else num_draft_tokens
        self.start_k = min(ADAPTIVE_START, self.max_k) if adaptive else num_draft_tokens
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._drafters: dict[int, object] = {}  # per engine (a strategy may serve several)
        self._batch_pause: dict[int, tuple[int, int]] = {}  # per engine: (steps to skip, next backoff)

    # ---- Strategy hooks ---------------------------------------------------------------------
    def attach(self, ctx):
        profile = self.profile_of(ctx)
        drafter = make_drafter(self.draft, ctx.backend, ngram=(self.min_ngram, self.max_ngram),
                               match_caps=self.lookup_caps(ctx))
        drafter.use_profile(profile, self.verify_cost, self.width_cost)
        self._drafters[ctx.engine_key] = drafter

    def profile_of(self, ctx) -> SpeculationProfile:
        return self.profile or ctx.profile()

    def lookup_caps(self, ctx) -> tuple[int, ...]:
        return self.match_caps if self.match_caps is not None else self.profile_of(ctx).match_caps

    def extra_slots(self, request):
        return self.max_k + 1

    def step_slots(self, seq):
        return len(seq.ids) - seq.num_cached + self.max_k + 1

    def plan(self, ctx, seqs):
        """Draft for every sequence, then one verify row each: the uncomputed tail plus the drafts."""
        drafts = self.choose_drafts(ctx, seqs)
        return [row for seq, draft in zip(seqs, drafts) if (row := verify_row(ctx, seq, draft)) is not None]

    def choose_drafts(self, ctx, seqs, cut=None) -> list[Draft]:
        """Each sequence's draft for this step (``cut(draft, seq)``: a draft filter applied before the
        length is chosen, e.g. a constraint's); sets ``state.by_value``."""
        drafter = self._drafters[ctx.engine_key]
        states = [seq.state_as(SpecState) for seq in seqs]
        # Alone, a sequence keeps the draft prefix with the most tokens per verify cost; in a batch (rows
        # of every strategy share the step) the rows share one width, worth it only when their drafts
        # together pay for widening the whole step.
        by_value = self.adaptive and drafter.estimates_confidence
        batch = max(len(seqs), ctx.batch_size)
        batched = by_value and batch > 1
        skip = batched and self._batch_pause.get(ctx.engine_key, (0, 1))[0] > 0 and _drafting_cost(drafter) > 0
        drafts = drafter.propose(ctx, seqs, [0 if skip else self._budget(ctx, s, by_value) for s in seqs])
        drafts = [_clip(d, s, ctx) for d, s in zip(drafts, seqs)]
        if cut is not None:
            drafts = [cut(d, s) for d, s in zip(drafts, seqs)]
        if by_value and batch == 1:
            drafts = [d.prefix(best_length(calibrated(d.confidence, s), drafter.verify_cost,
                                           sequential=d.q is not None)[0]) for d, s in zip(drafts, seqs)]
        elif batched:
            confidences = [calibrated(d.confidence, s) for d, s in zip(drafts, seqs)]
            k = common_draft_length(confidences, batch, drafter.width_cost, _critical_rows(ctx, seqs),
                                    sequential=any(d.q is not None for d in drafts))
            self._pause_model_drafts(ctx, skip, k, any(d.tokens for d in drafts))
            drafts = [d.prefix(min(k, len(d.tokens))) for d in drafts]
        for state in states:
            state.by_value = by_value
        return drafts

    @property
    def draft_name(self) -> str:
        return self.draft if isinstance(self.draft, str) else getattr(self.draft, "name", "backend")

    def update(self, ctx, seqs, rows):
        out = {}
        for seq, logits in block_logits(seqs, rows):
            draft = seq.state.draft
            seq.state.draft = None
            accepted, token = _accept(seq, draft, logits)
            self.settle(ctx, seq, draft, accepted)
            out[seq.seq_id] = verified_proposals(draft.tokens, accepted, token, logits, self.draft_name)
        return out

    def settle(self, ctx, seq, draft: Draft, accepted: int, drafted: int | None = None) -> None:
        """After a verify that kept ``accepted`` drafts: drop rejected K/V (target and drafter), count
        and calibrate (over the first ``drafted`` tokens: the drafter's own, not forced ones)."""
        num_verified = len(seq.ids) + accepted
        ctx.truncate_lane(seq, None, num_verified)  # drop rejected drafts' K/V
        self._drafters[ctx.engine_key].rollback(ctx, seq, num_verified)
        # an accepted stop token ends the text without being output: not counted as an accepted token
        output = accepted - (accepted > 0 and draft.tokens[accepted - 1] in stop_ids(ctx, seq))
        self._record(seq, len(draft.tokens), accepted, output, adapt_k=self.adaptive and not seq.state.by_value)
        own = len(draft.tokens) if drafted is None else drafted
        if draft.confidence and own:
            _calibrate(seq, draft.confidence[:own], min(accepted, own))

    def stats(self, seqs):
        states = [s.state for s in seqs if isinstance(s.state, SpecState)]
        drafted = sum(st.drafted for st in states)
        accepted = sum(st.accepted for st in states)
        steps = sum(st.steps for st in states)
        hist = [sum(st.hist[i] if i < len(st.hist) else 0 for st in states) for i in range(self.max_k + 1)]
        return {
            "draft": self.draft_name,
            "tokens_drafted": drafted,
            "tokens_accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "verify_steps": steps,
            "mean_accepted": accepted / steps if steps else 0.0,  # accepted drafts per verify step
            "mean_tokens_per_step": (accepted + steps) / steps if steps else 0.0,  # + the target's own token
            "acceptance_histogram": hist,  # hist[a] = verify steps that kept exactly a drafts
            "target_forward_passes": sum(s.num_forwards for s in seqs),  # prefill included
        }

    # ---- internals ----------------------------------------------------------------------------
    def _pause_model_drafts(self, ctx, skipped: bool, k: int, drafted: bool) -> None:
        """A model drafter's drafts cost target-step fractions even when the batch then verifies none:
        after a batched step that drafted and kept none, skip drafting for 1, 2, 4 ... 16 steps."""
        pause, backoff = self._batch_pause.get(ctx.engine_key, (0, 1))
        if skipped:
            pause -= 1
        elif k > 0:
            backoff = 1
        elif drafted:
            pause, backoff = backoff, min(MAX_PAUSE, 2 * backoff)
        self._batch_pause[ctx.engine_key] = (pause, backoff)

    def _budget(self, ctx, seq, by_value: bool = False) -> int:
        """Draft length for this step: the adaptive k (or, drafting by value, the most allowed),
        capped so no draft lands past max_new_tokens (accepted + 1 tokens must fit) or the model's context."""
        state = seq.state_as(SpecState)
        if state.k is None:
            state.k = self.start_k
        k = self.max_k if by_value else state.k
        if state.pause > 0:
            state.pause -= 1
            return 0
        left = seq.params.max_new_tokens - len(seq.output_ids) - 1
        room = ctx.max_context - len(seq.ids) - 1
        return max(0, min(k, left, room))

    def _record(self, seq, drafted: int, accepted: int, output: int | None = None, adapt_k: bool = True) -> None:
        """Count a verify step: ``accepted`` drafts kept, ``output`` of them output (default all: none
        was a stop token)."""
        state = seq.state_as(SpecState)
        state.drafted += drafted
        if drafted == 0:
            return  # a plain step (no proposal): not a verify step
        state.accepted += accepted if output is None else output
        state.steps += 1
        if len(state.hist) <= accepted:
            state.hist += [0] * (accepted + 1 - len(state.hist))
        state.hist[accepted] += 1
        if adapt_k and self.adaptive:
            k = state.k if state.k is not None else self.start_k
            state.k = min(self.max_k, k + 2) if accepted == drafted else max(1, k - 1)
            if accepted:
                state.backoff = 1
            elif drafted == 1:
                state.pause, state.backoff = state.backoff, min(MAX_PAUSE, 2 * state.backoff)


def verify_row(ctx, seq, draft: Draft) -> Row | None:
    """The verify row of ``seq``: its uncomputed tail plus the drafts, or None when its next-token
    logits are ready and it has no drafts (``state.head`` keeps them)."""
    state = seq.state
    state.draft = draft
    state.head = seq.take_next_logits()
    tail = seq.ids[seq.num_cached:]
    if not tail and state.head is None:  # nothing cached for the next position: recompute the last token
        tail = ctx.uncomputed(seq)
    if tail:
        state.head = None
    if tail or draft.tokens:
        return Row(seq, tail + draft.tokens, len(draft.tokens) + (1 if tail else 0))
    return None


def block_logits(seqs, rows):
    """(seq, logits (k + 1, V)) per sequence: the ready head logits and / or its verify row's."""
    computed = {r.seq.seq_id: r.logits for r in rows}
    for seq in seqs:
        state = seq.state
        parts = [p for p in (state.head[None] if state.head is not None else None,
                             computed.get(seq.seq_id)) if p is not None]
        state.head = None
        yield seq, parts[0] if len(parts) == 1 else torch.cat(parts)


def make_drafter(draft, target, *, ngram: tuple[int, int] = (1, 3), match_caps: tuple[int, ...] = MATCH_CAPS):
    """The drafter for a ``draft`` spec, checked against the ``target`` backend."""
    if isinstance(draft, Drafter):
        return draft
    if isinstance(draft, str) and draft.startswith("ngram+"):
        model = make_drafter(draft.removeprefix("ngram+"), target, ngram=ngram)
        if not isinstance(model, (ModelDrafter, HeadDrafter)):
            raise ValueError(f"draft {draft!r}: after 'ngram+' name a model source ('int8', 'head' or a model)")
        return LookupThenModel(NgramDrafter(ngram[1], ngram[0], match_caps), model)
    if draft == "ngram":
        return NgramDrafter(ngram[1], ngram[0], match_caps)
    if draft == "forced":
        return NoDrafter()
    if draft == "int8":
        return ModelDrafter(int8_backend(target))
    if draft == "head" or (isinstance(draft, str) and draft.startswith("head:")):
        from decodekit.drafting.head import load_head

        return HeadDrafter(target, load_head(target, draft.removeprefix("head:") if ":" in draft else None))
    if isinstance(draft, str):
        from decodekit.models import load_backend

        draft = load_backend(draft, device=str(getattr(target, "device", "cpu")),
                             cache_tokens=target.cache.capacity)
    check_same_tokenizer(target, draft)
    return ModelDrafter(draft)


def _check_draft(draft) -> None:
    from decodekit.backends.base import Backend

    if isinstance(draft, (Backend, Drafter)) or (isinstance(draft, str) and draft and draft != "ngram+"):
        return
    raise ValueError(f"draft must be 'ngram', 'int8', a model name, a Backend, 'ngram+<source>' or a Drafter, "
                     f"got {draft!r}")


def _calibrate(seq, confidence: list[float], accepted: int) -> None:
    """Fold this verify into the sequence's calibration (``drafters.calibrated``): each draft that was
    tested (all before it accepted) adds its claimed confidence to ``claimed``, and 1 to ``hits`` if accepted."""
    state = seq.state
    tested = min(accepted + 1, len(confidence))
    state.claimed += sum(confidence[:tested])
    state.hits += accepted


def _drafting_cost(drafter) -> float:
    """Target steps one draft token costs (a lookup drafts for free; ``ngram+<model>`` pays the model's)."""
    inner = getattr(drafter, "model", None)
    return max(float(getattr(drafter, "token_cost", 0.0)), float(getattr(inner, "token_cost", 0.0) or 0.0))


def _critical_rows(ctx, seqs) -> list[bool] | None:
    """With requests waiting, every row that finishes sooner admits the next: None (all rows count).
    With none, the batch lasts as long as its longest rows: those with the most tokens left."""
    if ctx.num_waiting:
        return None
    left = [s.params.max_new_tokens - len(s.output_ids) for s in seqs]
    most = max(left, default=0)
    return [n == most for n in left]


def _check_width_cost(table) -> tuple[float, ...]:
    """A width-cost table (entry B - 1: widening a step of B rows by one token, against the plain step);
    a single number applies to every batch size."""
    try:
        values = (float(table),) if isinstance(table, (int, float)) and not isinstance(table, bool) else tuple(
            float(c) for c in table)
    except (TypeError, ValueError):
        values = ()
    if not values or any(not c >= 0 for c in values):
        raise ValueError(f"width_cost must be a number >= 0 or a sequence of them by batch size, got {table!r}")
    return values


def _check_verify_cost(table) -> tuple[float, ...]:
    try:
        values = tuple(float(c) for c in table)
    except (TypeError, ValueError):
        values = ()
    rising = all(b >= a for a, b in zip(values, values[1:]))
    if not values or values[0] != 1.0 or not rising:
        raise ValueError("verify_cost must be a non-decreasing sequence of positive costs starting at 1.0 "
                         f"(a 1-token forward), got {table!r}")
    return values


def stop_ids(ctx, seq) -> set[int]:
    """Token ids that end ``seq``: its stop tokens, and EOS unless it ignores EOS."""
    stops = set(seq.params.stop_token_ids)
    if not seq.params.ignore_eos:
        stops |= set(ctx.tokenizer.eos_token_ids)
    return stops


def _clip(draft: Draft, seq, ctx) -> Draft:
    """Cut drafts after a stop token (nothing past EOS is worth scoring) and ids the target lacks."""
    vocab = ctx.vocab_size
    stops = stop_ids(ctx, seq)
    n = len(draft.tokens)
    for i, t in enumerate(draft.tokens):
        if t >= vocab:
            n = i
            break
        if t in stops:
            n = i + 1
            break
    cut = draft.prefix(n)
    q = cut.q
    if q is not None and q.shape[1] != vocab:  # same tokenizer, padded differently: align the draft's vocab
        q = q[:, :vocab] if q.shape[1] > vocab else _pad(q, vocab)
    return cut._replace(q=q)


def _accept(seq, draft: Draft, logits) -> tuple[int, int]:
    # penalties: verify position j against the target with the history output + drafts[:j] (lossless)
    logits = positions_penalized(logits, seq.params, seq.request.prompt_ids, seq.output_ids, draft.tokens)
    if seq.params.greedy:
        return verify_greedy(draft=draft.tokens, target=logits.argmax(-1).tolist())
    p = probs_from_logits(logits, seq.params)  # (k + 1, V), the request's processed distributions
    return verify_sampled(draft=draft.tokens, p=p, q=draft.q, generator=seq.generator)


def _pad(q, vocab: int):
    return torch.nn.functional.pad(q, (0, vocab - q.shape[1]))


def verified_proposals(drafted: list[int], accepted: int, token: int, logits, draft_name: str) -> list[Proposal]:
    """The ``accepted`` drafts, then the verifier's own token: a ``bonus`` after a draft (all of it
    accepted or not), plainly ``sampled`` when there was no draft this step."""
    kept = Provenance("draft_accepted", {"draft": draft_name})
    last = Provenance("bonus", {"draft": draft_name}) if drafted else SAMPLED
    return [*(Proposal(t, logits[i], kept) for i, t in enumerate(drafted[:accepted])),
            Proposal(token, logits[accepted], last)]
