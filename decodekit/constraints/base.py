"""The Constraint interface: checks on the text (bytes) of a candidate output.

A constraint says whether a byte string can still be completed (``prefix_ok``) and whether it
is a full valid output (``complete_ok``). Samplers lift these checks to tokens through each
token's exact byte string (``tokens.token_bytes``). Automaton constraints (regular expressions,
JSON schemas) may also give an exact full-vocabulary mask through ``automaton``.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable

from decodekit.constraints.tokens import token_bytes


def as_bytes(text: bytes | str) -> bytes:
    return text.encode() if isinstance(text, str) else bytes(text)


def split_utf8(text: bytes) -> tuple[str | None, bytes]:
    """(complete characters, trailing bytes of a character cut short); (None, b"") if not UTF-8."""
    try:
        return text.decode("utf-8"), b""
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data":  # invalid bytes, not just a character cut short
            return None, b""
        try:
            return text[: e.start].decode("utf-8"), text[e.start :]
        except UnicodeDecodeError:
            return None, b""


def completions_of(partial: bytes) -> list[str]:
    """Characters that start with the bytes ``partial`` (a token may end inside a character).

    Exact (all 64) when one continuation byte is missing; a spread sample (every next byte, the
    lowest and highest last bytes) when more are missing, so a check stays cheap (<= 128 checks).
    """
    need = {0xC: 2, 0xD: 2, 0xE: 3, 0xF: 4}.get(partial[0] >> 4, 0) - len(partial)
    if need <= 0:
        return []
    tails = [bytes([b]) + pad * (need - 1) for b in range(0x80, 0xC0) for pad in ((b"\x80", b"\xbf") if need > 1
                                                                                 else (b"",))]
    out = []
    for tail in tails:
        try:
            out.append((partial + tail).decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return out


def decode_complete(text: bytes) -> str | None:
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        return None


class ConstraintTimeout(ValueError):
    """One constraint check ran past its time limit (a catastrophically backtracking pattern): the
    request ends with ``constraint_failed`` instead of stalling every other request."""


class Constraint(ABC):
    """Checks on output text. Subclasses implement ``prefix_ok_text`` / ``complete_ok_text`` on str.

    Contract: every string accepted by ``complete_ok`` has all its prefixes accepted by
    ``prefix_ok`` (so a sampler never cuts off a valid output); ``prefix_ok`` may be optimistic
    (a dead end is found later and gets weight zero).
    """

    name = "constraint"

    def __init__(self):
        self._indexes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def prefix_ok(self, text: bytes | str) -> bool:
        """Text ending inside a character passes if it does with some character those bytes can start."""
        s, partial = split_utf8(as_bytes(text))
        if s is None:
            return False
        if not self.prefix_ok_text(s):  # cheap first: the complete characters must pass already
            return False
        return not partial or any(self.prefix_ok_text(s + c) for c in completions_of(partial))

    def complete_ok(self, text: bytes | str) -> bool:
        s = decode_complete(as_bytes(text))
        return s is not None and self.complete_ok_text(s)

    @abstractmethod
    def prefix_ok_text(self, text: str) -> bool:
        """Can ``text`` be extended into a valid output?"""

    @abstractmethod
    def complete_ok_text(self, text: str) -> bool:
        """Is ``text`` a valid output?"""

    def automaton(self) -> str | None:
        """A regular expression (outlines-core syntax) whose language equals ``prefix_ok``'s, or None."""
        return None

    def mask_grammar(self) -> str | None:
        """The llguidance grammar of this constraint where llguidance models it exactly (the default
        mask engine, ``constraints.guidance``), or None (checks, AWRS)."""
        return None

    @property
    def has_mask(self) -> bool:
        """Whether an exact token mask exists (llguidance, or an explicitly chosen outlines automaton)."""
        if self.mask_grammar() is not None:
            return True
        return getattr(self, "engine", "outlines") == "outlines" and self.automaton() is not None

    def mask_filter(self, text: bytes, ids, pieces):
        """The mask's allowed ids (K,) after ``text``, narrowed to the generation layout (identity here)."""
        return ids

    def generation_prefix_ok(self, text: bytes | str) -> bool:
        """``prefix_ok`` plus the layout generation keeps to (compact JSON, say); samplers use this,
        validation uses ``prefix_ok`` / ``complete_ok``."""
        return self.prefix_ok(text)

    def byte_dfa(self):
        """The byte automaton of ``automaton()`` (forced-text drafting), or None; built once."""
        if "_byte_dfa" not in self.__dict__:
            pattern = self.automaton()
            dfa = None
            if pattern is not None:
                from decodekit.constraints.regex import ByteDFA

                try:
                    dfa = ByteDFA(pattern)
                except ValueError:
                    dfa = None
            self._byte_dfa = dfa
        return self._byte_dfa

    def index(self, tokenizer):
        """The exact token mask for ``tokenizer``, or None; built once per tokenizer: llguidance's
        ``GuidanceIndex`` where ``mask_grammar`` exists, else outlines-core's ``AutomatonIndex``."""
        if tokenizer not in self._indexes:
            self._indexes[tokenizer] = self._build_index(tokenizer)
        return self._indexes[tokenizer]

    def _build_index(self, tokenizer):
        grammar = self.mask_grammar()
        if grammar is not None:
            from decodekit.constraints.guidance import GuidanceIndex

            return GuidanceIndex(grammar, tokenizer)
        pattern = self.automaton()
        if pattern is None or getattr(self, "engine", "outlines") != "outlines":  # outlines: an explicit choice
            return None
        from decodekit.constraints.regex import AutomatonIndex

        return AutomatonIndex.build(pattern, tokenizer)


class TokenChecker:
    """Lifts a constraint to token ids for one tokenizer, counting every check.

    EOS is accepted only where the text so far is complete; special tokens never are.
    """

    def __init__(self, constraint: Constraint, tokenizer):
        self.constraint = constraint
        self.token_bytes = token_bytes(tokenizer)
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.num_checks = 0

    def accept_fn(self, text: bytes, *, final: bool = False) -> Callable[[int], bool]:
        """``accept(token)`` after ``text``; with ``final`` a non-EOS token must complete the text."""
        check = self.constraint.complete_ok if final else self.constraint.generation_prefix_ok

        def accept(token: int) -> bool:
            self.num_checks += 1
            if token in self.eos_ids:
                return self.constraint.complete_ok(text)
            piece = self.token_bytes[token] if token < len(self.token_bytes) else None
            return piece is not None and check(text + piece)

        return accept

    def eos_token(self) -> int:
        return min(self.eos_ids)
