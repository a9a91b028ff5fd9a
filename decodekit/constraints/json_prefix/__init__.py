"""A prefix checker for full JSON Schema: can this text still become a valid document?

``JsonPrefixChecker(schema, format_checker)`` parses the text incrementally (``parser``) and
tracks, for every open value, the schema alternatives still alive (``schema``, ``checks``):
types (lists, none, boolean schemas), ``properties`` / ``patternProperties`` /
``additionalProperties`` / ``propertyNames`` / ``maxProperties``, ``prefixItems`` / ``items`` /
``additionalItems`` / ``maxItems`` / ``uniqueItems``, ``enum`` / ``const`` (compared as values,
so any layout works), numeric bounds (``numbers``: what a number prefix can still reach),
``maxLength`` (code points) and ``pattern`` (the ``regex`` module's partial matching), through
``allOf`` / ``anyOf`` / ``oneOf`` / ``if`` / ``$ref`` expanded into alternatives. Every value that
closes is checked exactly with ``jsonschema`` against each alternative's subschemas, which decides
what a prefix cannot (``required``, ``min*``, ``multipleOf``, ``format``, ``contains``, ``not``,
``oneOf``'s exclusivity, ``if`` conditions, dependencies, ``unevaluated*``); ``$dynamicRef`` /
``$recursiveRef`` schemas are checked exactly only as a whole document.

Contract: never reject a prefix of a valid document (where unsure, an alternative stays alive);
``document_ok`` (strict ``json`` + ``jsonschema``) is the final word. Layout: any JSON whitespace
between tokens, runs of any length (a bound would reject valid documents); duplicate member names
and number literals that overflow or underflow a double are refused, and so are ``NaN`` /
``Infinity`` (which Python's ``json`` reads but JSON does not have).

States are immutable and cached by text, so a check after an accepted text steps only the new
characters (the AWRS sampler checks many candidate tokens after one text).
"""

from __future__ import annotations

import json

from decodekit.constraints.json_prefix.parser import Root, parse_number
from decodekit.constraints.json_prefix.schema import Context

MAX_STATES = 200_000  # cached texts; past it the cache restarts from the empty text
_BACKTRACK = 64  # characters to look back for a cached prefix before trying the last accepted text
_MISSING = object()


class JsonPrefixChecker:
    def __init__(self, schema, format_checker=None):
        self.ctx = Context(schema, format_checker)
        self._root = Root(self.ctx)
        self._states: dict[str, object] = {"": self._root}
        self._last = ""

    def state(self, text: str):
        """The parser state after ``text``; None when no valid document starts with it."""
        hit = self._states.get(text, _MISSING)
        if hit is not _MISSING:
            return hit
        base = self._cached_prefix(text)
        state = self._states[base]  # None: a dead prefix, and so is every extension of it
        for ch in text[len(base):] if state is not None else ():
            state = state.step(ch)
            if state is None:
                break
        if len(self._states) > MAX_STATES:
            self._states, self._last = {"": self._root}, ""
        self._states[text] = state
        if state is not None:
            self._last = text
        return state

    def _cached_prefix(self, text: str) -> str:
        for cut in range(len(text) - 1, max(len(text) - _BACKTRACK, 0), -1):
            if text[:cut] in self._states:
                return text[:cut]
        last = self._last
        if last and len(last) < len(text) and text.startswith(last) and last in self._states:
            return last
        return ""

    def prefix_ok(self, text: str) -> bool:
        return self.state(text) is not None

    def document_ok(self, text: str) -> bool:
        """Strict JSON (see the module docstring) that ``jsonschema`` accepts."""
        return strictly_valid(self.ctx.root_validator, text)


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member name")
    return out


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def _exact_float(text: str) -> float:
    value = parse_number(text)
    if value is None:
        raise ValueError(f"number {text} does not fit a double")
    return value


def strictly_valid(validator, text: str) -> bool:
    """``text`` is strict JSON (``load_strict``) whose value ``validator`` (a ``jsonschema`` validator) accepts."""
    try:
        value = load_strict(text)
    except (ValueError, RecursionError):
        return False
    try:
        return validator.is_valid(value)
    except Exception:  # an unresolvable (remote) $ref, a pattern Python's re cannot compile
        return False


def load_strict(text: str):
    """``json.loads`` refusing duplicate names, NaN / Infinity, and overflowing or underflowing numbers."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant,
                      parse_float=_exact_float)


__all__ = ["JsonPrefixChecker", "load_strict"]
