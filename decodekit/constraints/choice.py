"""OneOf: the output is exactly one of a fixed list of strings."""

from __future__ import annotations

import bisect

from decodekit.constraints.base import Constraint
from decodekit.constraints.regex import escape


class OneOf(Constraint):
    """``OneOf(["yes", "no"])``: one of fixed strings (exported as ``decodekit.OneOf``)."""

    name = "one_of"

    def __init__(self, options):
        super().__init__()
        if isinstance(options, str) or not options or not all(isinstance(o, str) for o in options):
            raise ValueError(f"options must be a non-empty list of strings, got {options!r}")
        self.options = tuple(dict.fromkeys(options))
        self._sorted = sorted(self.options)  # a prefix check is one binary search, however many options
        self._set = frozenset(self.options)

    def prefix_ok_text(self, text: str) -> bool:
        i = bisect.bisect_left(self._sorted, text)
        return i < len(self._sorted) and self._sorted[i].startswith(text)

    def complete_ok_text(self, text: str) -> bool:
        return text in self._set

    def automaton(self) -> str:
        return "|".join(escape(o) for o in self.options)
