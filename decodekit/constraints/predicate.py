"""Predicate: any user Python functions on the output text."""

from __future__ import annotations

from collections.abc import Callable

from decodekit.constraints.base import Constraint


class Predicate(Constraint):
    """``Predicate(prefix_ok, complete_ok=None)``: functions ``str -> bool``.

    Without ``complete_ok`` every text accepted by ``prefix_ok`` counts as complete.
    """

    name = "predicate"

    def __init__(self, prefix_ok: Callable[[str], bool], complete_ok: Callable[[str], bool] | None = None):
        super().__init__()
        if not callable(prefix_ok):
            raise ValueError(f"prefix_ok must be a callable str -> bool, got {prefix_ok!r}")
        if complete_ok is not None and not callable(complete_ok):
            raise ValueError(f"complete_ok must be a callable str -> bool or None, got {complete_ok!r}")
        self._prefix = prefix_ok
        self._complete = complete_ok or prefix_ok

    def prefix_ok_text(self, text: str) -> bool:
        return bool(self._prefix(text))

    def complete_ok_text(self, text: str) -> bool:
        return bool(self._complete(text)) and bool(self._prefix(text))
