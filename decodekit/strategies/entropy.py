"""Entropy-adaptive model switching (EAD): a small model writes the easy tokens, a large one the hard ones.

"Entropy Adaptive Decoding: Dynamic Model Switching for Efficient Inference" (2025). At every position
the active model computes its next-token distribution; its entropy in bits (raw logits, before
temperature) joins a rolling window. When the window's mean reaches ``threshold`` the large model
writes, below it the small one; after a switch the new model must write ``min_dwell`` tokens before
the next one (hysteresis against flapping).

Semantics, chosen so the limits are exact: the token at a position is written by the model the rule
picks *after* seeing the active model's entropy there. On a switch the incoming model catches up
(prefills only the tokens it has not seen, through its own cache namespace and handle), computes the
same position, and its entropy replaces the outgoing one in the window. Hence ``threshold=0`` is
exactly the large model's decoding and ``threshold=inf`` exactly the small model's. The first position
uses the engine's model, whose logits admission computed for free.

One of ``small`` / ``large`` is the engine's own model (the one ``LLM(...)`` loaded; by default the
large one); the strategy loads the other. The engine's model keeps ``seq.handle``; the other model's
handle lives in ``seq.state``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from decodekit.sampling import entropy_bits, sample_token
from decodekit.strategies.base import Proposal, Strategy

SMALL, LARGE = "small", "large"


# ---- the switching rule (pure) ---------------------------------------------------------------
def rolling_mean(entropies: list[float], window: int) -> float:
    """Mean of the last ``window`` entropies (of all of them while fewer)."""
    tail = entropies[-window:]
    return sum(tail) / len(tail) if tail else 0.0


def choose_model(*, active: str, mean_entropy: float, threshold: float, since_switch: int, min_dwell: int) -> str:
    """The model that writes the current position.

    ``since_switch`` counts tokens the active model has written since it was switched in. The large
    model writes when the rolling mean entropy is ``>= threshold`` (so threshold 0 always picks it,
    threshold inf never does); no switch happens before ``min_dwell`` tokens.
    """
    if since_switch < min_dwell:
        return active
    return LARGE if mean_entropy >= threshold else SMALL


def param_weighted_cost(num_small: int, num_large: int, params_small: int, params_large: int) -> float:
    """The paper's cost: parameters spent per generated token, relative to the large model alone."""
    total = num_small + num_large
    return (num_small * params_small + num_large * params_large) / (total * params_large) if total else 0.0


# ---- the strategy ----------------------------------------------------------------------------
@dataclass
class _Model:
    """One side of the pair: its backend and whether it is the engine's model (owner of ``seq.handle``)."""

    role: str
    backend: object
    is_main: bool
    forward_tokens: int = 0
    forward_time_s: float = 0.0


class EntropySwitch(Strategy):
    """Entropy-adaptive switching between a ``small`` and a ``large`` model sharing a tokenizer.

    ``small`` / ``large``: a model name, a ``Backend``, or ``None`` for the engine's model. By default
    ``large`` is the engine's model and ``small`` its distilled student ``<alias>-distill-8l``
    (``decodekit distill``). ``threshold`` (bits, >= 0, ``math.inf`` allowed), ``window`` (tokens in the
    rolling mean) and ``min_dwell`` (tokens a model writes after a switch before the next) tune it.
    ``constraint`` (a decodekit ``Constraint``) makes every token go through constrained decoding
    (``Constrained(constraint, sampler)``, one particle) on the writing model's logits.
    """

    name = "entropy"

    def __init__(self, small=None, large=None, *, threshold: float = 1.0, window: int = 5, min_dwell: int = 4,
                 constraint=None, sampler: str = "awrs"):
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold) \
                or threshold < 0:
            raise ValueError(f"threshold must be a number >= 0 (bits; inf allowed), got {threshold!r}")
        for name, value in (("window", window), ("min_dwell", min_dwell)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.spec = {SMALL: small, LARGE: large}
        self.constrained = None
        if constraint is not None:  # the writer's logits go through constrained decoding (one particle)
            from decodekit.strategies.constrained import Constrained

            self.constrained = Constrained(constraint, sampler=sampler)
        self.threshold, self.window, self.min_dwell = float(threshold), window, min_dwell
        self.models: dict[str, _Model] = {}
        self.main_role = LARGE

    # ---- set-up -------------------------------------------------------------------------------
    def attach(self, engine) -> None:
        if self.models:
            raise ValueError("an EntropySwitch instance serves one engine; create one per LLM")
        main = engine.backend
        roles = {role: _is_main(spec, main) for role, spec in self.spec.items()}
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
        other_backend = _load_like(other, main)
        check_same_tokenizer(main, other_backend)
        self.models = {self.main_role: _Model(self.main_role, main, True),
                       other_role: _Model(other_role, other_backend, False)}

    def validate(self, request) -> None:
        if self.constrained is not None:
            self.constrained.validate(request)
        limit = min(m.backend.max_context for m in self.models.values())
        if len(request.prompt_ids) + request.params.max_new_tokens > limit:
            raise ValueError(f"prompt + max_new_tokens exceeds the smaller model's context ({limit})")

    # ---- the step -----------------------------------------------------------------------------
    def step(self, engine, seqs):
        for seq in seqs:
            if not isinstance(seq.state, SwitchState):
                seq.state = SwitchState(self.main_role)
        logits = self._compute(engine, seqs, {s.seq_id: s.state.active for s in seqs})
        switch = {}
        for seq in seqs:
            st = seq.state
            st.entropies.append(float(entropy_bits(logits[seq.seq_id])))
            choice = choose_model(active=st.active, mean_entropy=rolling_mean(st.entropies, self.window),
                                  threshold=self.threshold, since_switch=st.since_switch, min_dwell=self.min_dwell)
            if choice != st.active:
                switch[seq.seq_id] = choice
        if switch:
            switched = [s for s in seqs if s.seq_id in switch]
            logits.update(self._compute(engine, switched, switch))
            for seq in switched:
                st = seq.state
                st.active, st.since_switch, st.num_switches = switch[seq.seq_id], 0, st.num_switches + 1
                st.entropies[-1] = float(entropy_bits(logits[seq.seq_id]))
        out = self._choose_tokens(engine, seqs, logits)
        for seq in seqs:
            seq.state.writers.append(seq.state.active)
            seq.state.since_switch += 1
        return out

    def _choose_tokens(self, engine, seqs, logits: dict) -> dict:
        if self.constrained is None:
            return {s.seq_id: [Proposal(sample_token(logits[s.seq_id], s.params, s.generator), logits[s.seq_id])]
                    for s in seqs}
        # Constrained takes ready ``seq.next_logits`` as they are (it computes only missing ones)
        for seq in seqs:
            seq.next_logits = logits[seq.seq_id]
        out = self.constrained.update(engine, seqs, [])
        for seq in seqs:
            seq.next_logits = None  # never leave one model's logits where the main model's are expected
        return out

    def _compute(self, engine, seqs, role_of: dict) -> dict:
        """Next-token logits (V,) of each sequence under the model ``role_of[seq_id]``, catching it up."""
        out = {}
        for role, model in self.models.items():
            group = [s for s in seqs if role_of[s.seq_id] == role]
            if not group:
                continue
            started = time.perf_counter()
            rows = self._main_logits(engine, group, model) if model.is_main else self._other_logits(group, model)
            took = time.perf_counter() - started
            model.forward_time_s += took
            for seq, row in zip(group, rows):
                out[seq.seq_id] = row
                seq.state.forward_time_s[role] += took / len(group)  # a batched call's time, split evenly
        return out

    def _main_logits(self, engine, seqs, model: _Model) -> list:
        need = [s for s in seqs if s.next_logits is None]
        tails = [s.ids[len(s.handle):] for s in need]
        for seq, tail in zip(need, tails):
            _count(seq, model, len(tail))
        if need:
            for seq, row in zip(need, engine.forward(need, tails)):
                seq.next_logits = row[-1]
        return [s.take_next_logits() for s in seqs]

    def _other_logits(self, seqs, model: _Model) -> list:
        cache = model.backend.cache
        for seq in seqs:
            if seq.state.handle is None:
                seq.state.handle = model.backend.open(seq.ids)
        handles = [s.state.handle for s in seqs]
        tails = [s.ids[len(h):] for s, h in zip(seqs, handles)]
        for seq, tail in zip(seqs, tails):
            _count(seq, model, len(tail))
        rows = model.backend.forward(handles, tails)
        for seq, handle in zip(seqs, handles):
            if seq.state.other_forwards == 0:
                cache.commit(handle, seq.ids)  # verified tokens (the prompt) enter this namespace for siblings
            seq.state.other_forwards += 1
        return [r[-1] for r in rows]

    def on_finish(self, engine, seq) -> None:
        if not isinstance(seq.state, SwitchState) or seq.state.handle is None:
            return
        handle, seq.state.handle = seq.state.handle, None
        cache = next(m for m in self.models.values() if not m.is_main).backend.cache
        cache.truncate(handle, min(len(handle), len(seq.ids)))
        cache.commit(handle, seq.ids)
        cache.release(handle)

    # ---- provenance and cost ------------------------------------------------------------------
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
            "provenance": writers,  # per choice, one letter per generated token: S small, L large
            "tokens_by_model": {SMALL: num_small, LARGE: num_large},
            "large_share": num_large / total if total else 0.0,
            "num_switches": sum(st.num_switches for st in states),
            "cost_param_weighted": param_weighted_cost(num_small, num_large, params[SMALL], params[LARGE]),
            "forward_tokens": fwd,  # decode + catch-up prefill, the engine's prompt prefill excluded
            "cost_measured_param_weighted": measured,
            "forward_time_s": {role: sum(st.forward_time_s[role] for st in states) for role in (SMALL, LARGE)},
            "mean_entropy_bits": sum(sum(st.entropies) for st in states)
            / max(1, sum(len(st.entropies) for st in states)),
        }

    def model_times(self) -> dict:
        """Seconds spent in each model's forwards since this strategy was attached (all requests)."""
        return {role: m.forward_time_s for role, m in self.models.items()}


@dataclass
class SwitchState:
    """Per-sequence state: the writing model, the entropy window, provenance, per-model cost, and
    the other model's KV handle (the engine's model keeps ``seq.handle``)."""

    active: str
    since_switch: int = 1 << 30  # the first position may go to either model at once
    entropies: list[float] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)
    num_switches: int = 0
    forward_tokens: dict[str, int] = field(default_factory=lambda: {SMALL: 0, LARGE: 0})
    forward_time_s: dict[str, float] = field(default_factory=lambda: {SMALL: 0.0, LARGE: 0.0})
    other_forwards: int = 0
    handle: object = None
    inner: object = None  # the composed Constrained strategy's state, when a constraint is given


def _count(seq, model: _Model, n: int) -> None:
    seq.state.forward_tokens[model.role] += n
    model.forward_tokens += n


def _is_main(spec, main) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return spec == main.name or spec == main.name.rsplit(":", 1)[0]
    return spec is main


def default_small(main_name: str) -> str:
    """The distilled student of the engine's model alias (built by ``decodekit distill``)."""
    from decodekit.distill import DistillConfig, student_name

    return student_name(main_name.rsplit(":", 1)[0], DistillConfig.layers)


def _load_like(spec, main):
    """A backend for ``spec``: itself when it is one, else loaded with the engine model's dtype and device."""
    if not isinstance(spec, str):
        return spec
    from decodekit.models import load_backend

    dtype = main.name.rsplit(":", 1)[1] if ":" in main.name else "float32"
    device = str(getattr(main, "device", "cpu"))
    return load_backend(spec, dtype=dtype, device=device, cache_tokens=main.cache.capacity)


def check_same_tokenizer(a, b) -> None:
    """Raise ``ValueError`` unless backends ``a`` and ``b`` share vocabulary, special tokens and width."""
    ta, tb = a.tokenizer, b.tokenizer
    problems = []
    if a.vocab_size != b.vocab_size:
        problems.append(f"logit width {a.vocab_size} vs {b.vocab_size}")
    if set(ta.eos_token_ids) != set(tb.eos_token_ids):
        problems.append(f"EOS ids {sorted(ta.eos_token_ids)} vs {sorted(tb.eos_token_ids)}")
    if getattr(ta, "prepend_bos", False) != getattr(tb, "prepend_bos", False):
        problems.append("BOS handling differs")
    if _vocab(ta) != _vocab(tb):
        problems.append("token vocabularies differ")
    if problems:
        raise ValueError(f"EntropySwitch: {a.name!r} and {b.name!r} do not share a tokenizer: " + "; ".join(problems))


def _vocab(tokenizer):
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        return hf.get_vocab()
    return [tokenizer.token_str(i) for i in range(tokenizer.vocab_size)]
