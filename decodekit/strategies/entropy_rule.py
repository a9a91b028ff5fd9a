"""EntropySwitch's pure switching rule, per-sequence state and the pairing of its two models."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
class ModelSide:
    """One side of the pair: its backend and whether it is the engine's model (the sequence's main KV)."""

    role: str
    backend: object
    is_main: bool
    forward_tokens: int = 0


def segment_budget(seq, max_segment: int) -> int:
    """Drafts the next segment may hold: the kept ones plus the large model's token must fit the length
    limit and the context."""
    left = seq.params.max_new_tokens - len(seq.output_ids) - 1
    return max(0, min(max_segment, left))


@dataclass
class SwitchState:
    """Per-sequence state: the writing model, the entropy window, who wrote each token, per-model cost,
    the other model's KV lane (the engine's model uses the main KV) and, in verified mode, the
    segment being drafted."""

    active: str
    since_switch: int = 1 << 30  # the first position may go to either model at once
    entropies: list[float] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)
    num_switches: int = 0
    forward_tokens: dict[str, int] = field(default_factory=lambda: {SMALL: 0, LARGE: 0})
    lane: object = None  # the other model's mirror lane (``decodekit.context.Lane``)
    committed: bool = False  # the other model's prompt entered its prefix cache
    switching: bool = False  # plain mode: the incoming model computes the current position next step
    decision_mean: float = 0.0  # the window's mean the current writer was chosen by
    job: tuple = ()  # this step's (model, drafts in the row, logits)
    head: torch.Tensor | None = None  # the engine's ready next-token logits, used as this step's first row
    draft: list[int] = field(default_factory=list)
    draft_q: list = field(default_factory=list)  # per draft: the distribution it was drawn from (None: greedy)
    draft_means: list[float] = field(default_factory=list)  # per draft: the window mean that let it be drafted
    verify_now: bool = False
    end_mean: float = 0.0
    end_by_rule: bool = False  # the segment ended because the rule picked the large model
    num_drafted: int = 0
    num_kept: int = 0
    num_segments: int = 0

    def reset_segment(self) -> None:
        self.draft, self.draft_q, self.draft_means = [], [], []
        self.verify_now, self.end_by_rule = False, False

    def drop_segment(self) -> None:
        """Forget an unverified segment and its entropies (preemption)."""
        if self.draft:
            del self.entropies[len(self.entropies) - len(self.draft):]
        self.reset_segment()



def is_main_spec(spec, main) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return spec == main.name or spec == main.name.rsplit(":", 1)[0]
    return spec is main


def default_small(main_name: str) -> str:
    """The distilled student of the engine's model alias (built by ``decodekit distill``)."""
    from decodekit.models import model_name_of, student_name

    return student_name(model_name_of(main_name))


def load_like(spec, main):
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
