"""OneOf: the output is exactly one of a fixed list of strings."""

from __future__ import annotations

import bisect

from decodekit.constraints.base import Constraint
from decodekit.constraints.regex import escape, mask_engine, regex_grammar_of


class OneOf(Constraint):
    """``OneOf(["yes", "no"])``: one of fixed strings (exported as ``decodekit.OneOf``); masked by
    llguidance (``engine="auto"``), or outlines-core / checks only (``engine="outlines"`` / ``"checker"``)."""

    name = "one_of"

    def __init__(self, options, *, engine: str = "auto"):
        super().__init__()
        from decodekit.constraints.guidance import check_engine

        engine = check_engine(engine)
        if isinstance(options, str) or not options or not all(isinstance(o, str) for o in options):
            raise ValueError(f"options must be a non-empty list of strings, got {options!r}")
        self.options = tuple(dict.fromkeys(options))
        self._sorted = sorted(self.options)  # a prefix check is one binary search, however many options
        self._set = frozenset(self.options)
        self.engine, self._grammar, self.engine_error = mask_engine(engine, regex_grammar_of, self.automaton())

    def mask_grammar(self) -> str | None:
        return self._grammar if self.engine == "llguidance" else None

    def prefix_ok_text(self, text: str) -> bool:
        i = bisect.bisect_left(self._sorted, text)
        return i < len(self._sorted) and self._sorted[i].startswith(text)

    def complete_ok_text(self, text: str) -> bool:
        return text in self._set

    def automaton(self) -> str:
        return "|".join(escape(o) for o in self.options)
