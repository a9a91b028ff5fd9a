"""Pure heuristics of tree rollouts: branch budget, its split over live leaves, fallback, early stops.

Every function here is deterministic and model-free, so it is tested on hand-made inputs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SPLIT_MODES = ("even", "logprob", "entropy")

# ---- branch budget ----------------------------------------------------------------------------


def next_width(*, remaining: int, num_live: int, num_finished_step: int, branch_factor: int) -> int:
    """Leaves of the next depth: ``min(remaining, b * (finished_this_step + live))``, at least one per live leaf.

    Finished leaves hand their branch budget to live ones (TreePO's dynamic width); ``remaining`` is
    the prompt's width budget left after its finished trajectories, so the tree never exceeds it.
    """
    if num_live <= 0:
        return 0
    return max(num_live, min(remaining, branch_factor * (num_finished_step + num_live)))


def split_budget(width: int, weights: list[float]) -> list[int]:
    """Children per leaf: at least one each, the ``width - len(weights)`` extra ones proportional to
    ``weights`` (largest remainder, ties to the earlier leaf). Sums to ``max(width, len(weights))``."""
    n = len(weights)
    extra = max(0, width - n)
    total = sum(weights)
    if extra == 0 or n == 0:
        return [1] * n
    quotas = [extra * w / total for w in weights] if total > 0 else [extra / n] * n
    counts = [int(math.floor(q)) for q in quotas]
    order = sorted(range(n), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: extra - sum(counts)]:
        counts[i] += 1
    return [1 + c for c in counts]


def branch_weights(mode: str, *, mean_logprobs: list[float], mean_entropies: list[float]) -> list[float]:
    """Weights of live leaves for the extra children.

    ``logprob``: a lower mean token log-probability along the path (a less certain path) branches more;
    ``entropy``: a higher mean entropy over the last segment branches more. Scores are standardised
    before the softmax so the split does not depend on their scale (nats vs bits, path length).
    """
    if mode == "even":
        return [1.0] * len(mean_logprobs)
    if mode == "logprob":
        return _softmax_standardised([-x for x in mean_logprobs])
    if mode == "entropy":
        return _softmax_standardised(list(mean_entropies))
    raise ValueError(f"budget_split must be one of {SPLIT_MODES}, got {mode!r}")


def _softmax_standardised(scores: list[float]) -> list[float]:
    n = len(scores)
    if n == 0:
        return []
    mean = sum(scores) / n
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / n)
    if std < 1e-12:
        return [1.0] * n
    z = [(s - mean) / std for s in scores]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def fallback_plan(spare: int, weights: list[float], branch_factor: int) -> list[int]:
    """New children per re-branch candidate when a prompt has no live path: ``min(spare, b * candidates)``
    in all; with fewer than one per candidate, the heaviest candidates (ties: earlier) get one each."""
    n = len(weights)
    width = min(spare, branch_factor * n)
    if width <= 0 or n == 0:
        return [0] * n
    if width < n:
        chosen = set(sorted(range(n), key=lambda i: (-weights[i], i))[:width])
        return [1 if i in chosen else 0 for i in range(n)]
    return split_budget(width, weights)


# ---- early stops ------------------------------------------------------------------------------

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
ANSWER_PATTERNS = {
    # "#### 42" is complete once something follows the number that cannot extend it
    "gsm8k": re.compile(r"####\s*(" + _NUMBER + r")(?:[^\d.,]|[.,][^\d])"),
    "answer_is": re.compile(r"[Tt]he (?:final )?answer is:?\s*(" + _NUMBER + r")(?:[^\d.,]|[.,][^\d])"),
}


def find_answer(text: str, patterns: tuple[str, ...]) -> str | None:
    """The first complete final answer in ``text`` for the named ``patterns`` or None.

    ``boxed``: ``\\boxed{...}`` with balanced braces; ``gsm8k``: ``#### <number>`` followed by a
    character that ends the number; ``answer_is``: "The answer is <number>"; any other string is a
    regular expression whose first group (or whole match) is the answer.
    """
    for name in patterns:
        if name == "boxed":
            found = _boxed(text)
        elif name in ANSWER_PATTERNS:
            m = ANSWER_PATTERNS[name].search(text)
            found = m.group(1) if m else None
        else:
            m = re.search(name, text)
            found = (m.group(1) if m.groups() else m.group(0)) if m else None
        if found is not None:
            return found
    return None


def _boxed(text: str) -> str | None:
    start = text.find("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def is_repetitive(text: str, *, min_repeats: int, min_chars: int, max_unit: int) -> bool:
    """True when ``text`` ends in a unit of 1..``max_unit`` characters repeated at least ``min_repeats``
    times back to back, spanning at least ``min_chars`` characters (a degenerate loop)."""
    for unit in range(1, max_unit + 1):
        span = unit * max(min_repeats, -(-min_chars // unit))
        if span > len(text):
            break
        tail = text[-span:]
        if tail == tail[:unit] * (span // unit):
            return True
    return False


@dataclass(frozen=True)
class EarlyStop:
    """When a path stops before EOS / max tokens.

    ``answer``: answer patterns ("boxed", "gsm8k", "answer_is" or regexes) that end a path once a
    final answer is written (``finish_reason="answer"``). ``repeat_min_repeats`` / ``repeat_min_chars``
    / ``repeat_max_unit``: a unit repeated that often at the end of the text ends it
    (``finish_reason="repetition"``); ``repeat_min_repeats=0`` turns the check off.
    """

    answer: tuple[str, ...] = ("boxed", "gsm8k")
    repeat_min_repeats: int = 4
    repeat_min_chars: int = 48
    repeat_max_unit: int = 64

    def __post_init__(self):
        if isinstance(self.answer, str):
            object.__setattr__(self, "answer", (self.answer,))
        object.__setattr__(self, "answer", tuple(self.answer))
        for name in self.answer:
            if not isinstance(name, str) or not name:
                raise ValueError(f"answer must be pattern names or regexes, got {self.answer!r}")
            if name not in ANSWER_PATTERNS and name != "boxed":
                try:
                    re.compile(name)
                except re.error as e:
                    raise ValueError(f"answer pattern {name!r} is not a valid regex: {e}") from None
        for field in ("repeat_min_repeats", "repeat_min_chars", "repeat_max_unit"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{field} must be an integer >= 0, got {value!r}")
        if self.repeat_min_repeats == 1:
            raise ValueError("repeat_min_repeats must be 0 (off) or >= 2")

    def reason(self, text: str) -> str | None:
        """``"answer"``, ``"repetition"`` or None for a path's output text so far."""
        if self.answer and find_answer(text, self.answer) is not None:
            return "answer"
        if self.repeat_min_repeats and is_repetitive(text, min_repeats=self.repeat_min_repeats,
                                                     min_chars=self.repeat_min_chars,
                                                     max_unit=self.repeat_max_unit):
            return "repetition"
        return None


NO_EARLY_STOP = EarlyStop(answer=(), repeat_min_repeats=0)
