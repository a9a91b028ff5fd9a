"""OneOf: the output is exactly one of a fixed list of strings."""

from __future__ import annotations

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

    def prefix_ok_text(self, text: str) -> bool:
        return any(o.startswith(text) for o in self.options)

    def complete_ok_text(self, text: str) -> bool:
        return text in self.options

    def automaton(self) -> str:
        return "|".join(escape(o) for o in self.options)
