"""Regex constraints: ``regex``-module partial matching for checks, outlines-core for exact masks.

The check path uses Python's ``regex`` module: ``fullmatch(text, partial=True)`` tells whether
``text`` is a prefix of some match, and it supports look-around, back-references and recursion
(the non-regular patterns of the pattern-matching benchmark). For patterns outlines-core can
compile, ``AutomatonIndex`` gives the exact set of allowed tokens in each automaton state.
"""

from __future__ import annotations

import regex as re
import torch

from decodekit.constraints.base import Constraint, ConstraintTimeout
from decodekit.constraints.tokens import token_bytes

_RUST_META = set("\\.+*?()|[]{}^$#&-~")
CHECK_TIMEOUT = 1.0  # seconds per match: far above any sane pattern (microseconds), bounds the pathological


def escape(text: str) -> str:
    """Escape ``text`` for both Rust's regex syntax (outlines-core) and Python's ``regex``."""
    return "".join("\\" + c if c in _RUST_META else c for c in text)


class TimedPattern:
    """A compiled ``regex`` pattern whose matches stop after ``timeout`` seconds with
    ``ConstraintTimeout`` (``what`` names the check in its message); other attributes pass through."""

    def __init__(self, pattern, timeout: float | None, what: str):
        self._pattern, self._timeout, self._what = pattern, timeout, what

    def match(self, text, pos=0, endpos=None):
        return self._call("match", text, pos, len(text) if endpos is None else endpos)

    def fullmatch(self, text, pos=0, endpos=None, partial=False):
        return self._call("fullmatch", text, pos, len(text) if endpos is None else endpos, partial=partial)

    def _call(self, name, text, pos, endpos, **kw):
        try:
            return getattr(self._pattern, name)(text, pos, endpos, timeout=self._timeout, **kw)
        except TimeoutError:
            raise ConstraintTimeout(f"{self._what} took over {self._timeout} s on {endpos - pos} characters "
                                    "(the pattern backtracks catastrophically)") from None

    def __getattr__(self, name):
        return getattr(self._pattern, name)


class Regex(Constraint):
    """``Regex(pattern)``: the whole output fully matches ``pattern`` (Python ``regex`` syntax).

    ``engine``: ``"auto"`` (default) masks with llguidance where it compiles the pattern (its Rust
    regex syntax: no look-around or back-references) and checks with ``regex`` elsewhere;
    ``"llguidance"`` requires it (``ValueError`` otherwise); ``"outlines"`` uses outlines-core's
    automaton index (the older mask path); ``"checker"`` (or ``automaton=False``) only checks.
    ``complete_ok`` is always ``regex.fullmatch``, whatever masks generation.
    ``timeout``: seconds one match may take (``regex``'s own timeout); past it the check raises
    ``ConstraintTimeout`` and the request ends ``constraint_failed`` (nested quantifiers such as
    ``(a|a)+b`` backtrack exponentially in the text length).
    """

    name = "regex"

    def __init__(self, pattern: str, *, automaton: bool = True, timeout: float | None = CHECK_TIMEOUT,
                 engine: str = "auto"):
        super().__init__()
        from decodekit.constraints.guidance import check_engine

        engine = check_engine(engine, automaton)
        if not isinstance(pattern, str):
            raise ValueError(f"pattern must be a string, got {pattern!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
        try:
            self._re = TimedPattern(re.compile(pattern), timeout, "a regex check")
        except re.error as e:
            raise ValueError(f"pattern {pattern!r} does not compile: {e}") from None
        self.pattern = pattern
        self.timeout = timeout
        self._automaton = engine != "checker"
        inexact = _rust_reads_differently(pattern) if engine in ("auto", "llguidance") else None
        if inexact and engine == "auto":
            self.engine, self._grammar, self.engine_error = "checker", None, inexact
        elif inexact:
            raise ValueError(f"llguidance cannot model this constraint exactly: {inexact}")
        else:
            self.engine, self._grammar, self.engine_error = mask_engine(engine, regex_grammar_of, pattern)

    def mask_grammar(self) -> str | None:
        return self._grammar if self.engine == "llguidance" else None

    def prefix_ok_text(self, text: str) -> bool:
        return self._re.fullmatch(text, partial=True) is not None

    def complete_ok_text(self, text: str) -> bool:
        return self._re.fullmatch(text) is not None

    def automaton(self) -> str | None:
        return self.pattern if self._automaton else None


_SET_OPERATIONS = re.compile(r"(?<!\\)(?:&&|--|~~|\|\|)")
_POSSESSIVE = re.compile(r"(?<!\\)[*+?}]\+")
_RECURSION = re.compile(r"\(\?(?:R|[0-9]|[+-][0-9]|&|P>|>)")


def _rust_reads_differently(pattern: str) -> str | None:
    """Why Rust's regex syntax (llguidance) would read ``pattern`` otherwise than Python's ``regex``
    (its default V0 mode), or None. Character-class set operations (``[\\w--\\d]``, ``[a-z&&[^c]]``)
    are intersections and differences in Rust but literal characters in V0: 38 of the 132
    pattern-matching patterns llguidance compiles disagreed with ``regex.fullmatch`` this way, 3 more
    through possessive quantifiers and recursion (random token walks on SmolLM2's vocabulary)."""
    if _SET_OPERATIONS.search(pattern):
        return "character-class set operations (&&, --, ~~, ||) mean another set in Rust's syntax"
    if _POSSESSIVE.search(pattern):
        return "possessive quantifiers (a++, a?+, a{3}+) are repetitions of repetitions in Rust's syntax"
    if _RECURSION.search(pattern):
        return "recursion and atomic groups ((?R), (?1), (?&name), (?>...)) are Python regex only"
    return None


def regex_grammar_of(pattern: str) -> str:
    from decodekit.constraints.guidance import regex_grammar

    return regex_grammar(pattern)


def mask_engine(engine: str, grammar_of, source) -> tuple[str, str | None, str | None]:
    """(the engine that masks, its llguidance grammar, why llguidance does not) for an ``engine``
    choice; ``auto`` takes llguidance where its grammar validates with no warning, else the checker."""
    if engine in ("outlines", "checker"):
        return engine, None, f"engine={engine!r}"
    from decodekit.constraints.guidance import grammar_problems

    grammar = grammar_of(source)
    problem = grammar_problems(grammar)
    if problem is None:
        return "llguidance", grammar, None
    if engine == "llguidance":
        raise ValueError(f"llguidance cannot model this constraint exactly: {problem}")
    return "checker", None, problem


class ByteDFA:
    """An outlines-core automaton over single bytes: exact prefix / complete checks, cached by prefix.

    Compiling a large regex (JSON schemas give 20-600 kB patterns) is far faster in outlines-core's
    Rust DFA builder than in Python's ``regex`` module, and the check then follows the same automaton
    as the full-vocabulary mask.
    """

    def __init__(self, pattern: str):
        from outlines_core import Index, Vocabulary

        try:
            self._index = Index(pattern, Vocabulary(256, {bytes([b]): [b] for b in range(256)}))
        except Exception as e:  # outlines-core's own error types
            raise ValueError(f"regex does not compile to an automaton: {e}") from None
        self._states: dict[bytes, int | None] = {b"": self._index.get_initial_state()}

    def state(self, text: bytes) -> int | None:
        """The automaton state after ``text``; None for a dead end. Prefix states are memoised."""
        if text in self._states:
            return self._states[text]
        cut = len(text)
        while text[:cut] not in self._states:
            cut -= 1
        state = self.advance(self._states[text[:cut]], text[cut:])
        if len(self._states) > 200_000:  # bound the memo: keep the start state only
            self._states = {b"": self._index.get_initial_state()}
        self._states[text] = state
        return state

    def advance(self, state: int | None, data: bytes) -> int | None:
        """The state after ``data`` from ``state``; None once a byte has no transition."""
        for b in data:
            if state is None:
                return None
            state = self._index.get_next_state(state, b)
        return state

    @property
    def index(self):
        """outlines-core's ``Index`` over bytes (allowed bytes, transitions, final states)."""
        return self._index

    def prefix_ok(self, text: bytes) -> bool:
        return self.state(text) is not None

    def complete_ok(self, text: bytes) -> bool:
        state = self.state(text)
        return state is not None and self._index.is_final_state(state)


class AutomatonIndex:
    """outlines-core's ``Index`` over one tokenizer's vocabulary: exact allowed tokens per state.

    EOS is not taken from the index: the sampler allows it where ``complete_ok`` holds.
    """

    def __init__(self, index, vocab_size: int):
        self._index = index
        self.vocab_size = vocab_size

    @classmethod
    def build(cls, pattern: str, tokenizer) -> AutomatonIndex | None:
        """The index, or None where outlines-core cannot compile ``pattern`` (e.g. look-around)."""
        from outlines_core import Index, Vocabulary

        pieces = token_bytes(tokenizer)
        by_bytes: dict[bytes, list[int]] = {}
        for token, piece in enumerate(pieces):
            if piece:
                by_bytes.setdefault(piece, []).append(token)
        try:
            vocab = Vocabulary(min(tokenizer.eos_token_ids), by_bytes)
            return cls(Index(pattern, vocab), len(pieces))
        except Exception:  # outlines-core raises its own error types for unsupported syntax
            return None

    def initial(self) -> int:
        return self._index.get_initial_state()

    def next(self, state: int | None, token: int) -> int | None:
        """The state after ``token``; None once the automaton has no transition (a dead end)."""
        if state is None:
            return None
        return self._index.get_next_state(state, token)

    def allowed(self, state: int | None) -> torch.Tensor:
        """Bool mask (V,) of non-EOS tokens allowed in ``state``."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        if state is None:
            return mask
        tokens = self._index.get_allowed_tokens(state)
        if tokens:
            mask[torch.tensor(tokens, dtype=torch.long)] = True
        return mask
