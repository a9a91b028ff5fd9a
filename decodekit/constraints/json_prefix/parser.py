"""The incremental JSON parser: one immutable frame per open value, stepped one character at a time.

A frame holds its parent frame (so a frame is a whole parser state), the alternatives still alive
for its value, and what it has read. ``step(ch)`` returns the next state, or None when no valid
document starts with the text read. Containers keep ``pending``: for each alternative, the
subschemas the value being read must satisfy; when that value closes, each alternative is kept
only if ``jsonschema`` accepts the value under all of them (exact). Frames are never mutated
(a closing step is memoised on the frame), so one state may be shared by many texts.
"""

from __future__ import annotations

import json
import math

from decodekit.constraints.json_prefix import checks, numbers
from decodekit.constraints.json_prefix.schema import Context, union_of_products

WS = frozenset(" \t\n\r")
ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
HEX = frozenset("0123456789abcdefABCDEF")
LITERALS = {"t": ("true", True), "f": ("false", False), "n": ("null", None)}
_UNSET = object()
OPEN, KEY, COLON, VALUE, NEXT = range(5)


class Root:
    """Before the document's value (whitespace, then a value) and after it (whitespace only)."""

    __slots__ = ("ctx", "done")

    def __init__(self, ctx: Context, done: bool = False):
        self.ctx, self.done = ctx, done

    def step(self, ch: str):
        if ch in WS:
            return self
        return None if self.done else start_value(self, ch)

    def child_alts(self) -> tuple:
        return self.ctx.root.expand()

    def accept(self, value):
        try:
            ok = self.ctx.root_validator.is_valid(value)
        except Exception:  # an unresolvable $ref: the document check fails the same way
            ok = False
        return Root(self.ctx, True) if ok else None

    @property
    def complete(self) -> bool:
        return self.done


def start_value(parent, ch: str):
    alts = parent.child_alts()
    if ch == "{":
        kept = tuple(c for c in alts if checks.kind_ok(c, "object"))
        return Obj(parent, kept) if kept else None
    if ch == "[":
        kept = tuple(c for c in alts if checks.kind_ok(c, "array"))
        return Arr(parent, kept) if kept else None
    if ch == '"':
        kept = tuple(c for c in alts if checks.kind_ok(c, "string") and checks.string_ok(c, ""))
        return Str(parent, kept, "", "", False) if kept else None
    if ch == "-" or "0" <= ch <= "9":
        kept = tuple(c for c in alts if checks.kind_ok(c, "number"))
        return Num(parent, kept, "").step(ch) if kept else None
    if ch in LITERALS:
        word, value = LITERALS[ch]
        kept = tuple(c for c in alts if checks.literal_ok(c, value))
        return Lit(parent, kept, word, 1, value) if kept else None
    return None


def union_pending(pending) -> tuple:
    return union_of_products(dict.fromkeys(subs for _, subs in pending))


class Obj:
    __slots__ = ("parent", "alts", "pairs", "phase", "key", "pending", "child", "_closed")

    def __init__(self, parent, alts, pairs=(), phase=OPEN, key=None, pending=(), child=()):
        self.parent, self.alts, self.pairs, self.phase = parent, alts, pairs, phase
        self.key, self.pending, self.child, self._closed = key, pending, child, _UNSET

    def step(self, ch: str):
        if ch in WS:
            return self
        phase = self.phase
        if phase == VALUE:
            return start_value(self, ch)
        if ch == '"' and phase in (OPEN, KEY):
            return self._start_key()
        if ch == "}" and phase in (OPEN, NEXT):
            return self._close()
        if ch == ":" and phase == COLON:
            return Obj(self.parent, self.alts, self.pairs, VALUE, self.key, self.pending, self.child)
        if ch == "," and phase == NEXT:
            return Obj(self.parent, self.alts, self.pairs, KEY)
        return None

    def _start_key(self):
        count = len(self.pairs)
        kept = tuple(c for c in self.alts if checks.key_start_ok(c, count) and checks.key_prefix_ok(c, ""))
        return Str(self, kept, "", "", True) if kept else None

    def accept_key(self, key: str, alts):
        if any(k == key for k, _ in self.pairs):
            return None  # duplicate names: refused (json.loads would keep only the last)
        pending = tuple((c, subs) for c in alts if (subs := checks.key_child(c, key)) is not None)
        child = union_pending(pending)
        if not child:
            return None
        return Obj(self.parent, tuple(c for c, _ in pending), self.pairs, COLON, key, pending, child)

    def child_alts(self) -> tuple:
        return self.child

    def accept(self, value):
        kept = tuple(c for c, subs in self.pending if all(s.valid(value) for s in subs))
        return Obj(self.parent, kept, (*self.pairs, (self.key, value)), NEXT) if kept else None

    def _close(self):
        if self._closed is _UNSET:
            self._closed = self.parent.accept(dict(self.pairs))
        return self._closed


class Arr:
    __slots__ = ("parent", "alts", "items", "phase", "pending", "child", "_closed")

    def __init__(self, parent, alts, items=(), phase=OPEN, pending=(), child=()):
        self.parent, self.alts, self.items, self.phase = parent, alts, items, phase
        self.pending, self.child, self._closed = pending, child, _UNSET

    def step(self, ch: str):
        if ch in WS:
            return self
        phase = self.phase
        if ch == "]" and phase in (OPEN, NEXT):
            return self._close()
        if phase == VALUE:
            return start_value(self, ch)
        if ch == "," and phase == NEXT:
            return self._expect()
        if phase == OPEN:
            ready = self._expect()
            return start_value(ready, ch) if ready is not None else None
        return None

    def _expect(self):
        """This array, waiting for item ``len(items)``; None when no alternative allows that item."""
        index = len(self.items)
        pending = tuple((c, subs) for c in self.alts if (subs := checks.item_child(c, index)) is not None)
        child = union_pending(pending)
        if not child:
            return None
        return Arr(self.parent, tuple(c for c, _ in pending), self.items, VALUE, pending, child)

    def child_alts(self) -> tuple:
        return self.child

    def accept(self, value):
        kept = tuple(c for c, subs in self.pending
                     if checks.unique_ok(c, value, self.items) and all(s.valid(value) for s in subs))
        return Arr(self.parent, kept, (*self.items, value), NEXT) if kept else None

    def _close(self):
        if self._closed is _UNSET:
            self._closed = self.parent.accept(list(self.items))
        return self._closed


class Str:
    """A string value or member name; ``chars``: decoded so far, ``esc``: an escape under way."""

    __slots__ = ("parent", "alts", "chars", "esc", "is_key")

    def __init__(self, parent, alts, chars, esc, is_key):
        self.parent, self.alts, self.chars, self.esc, self.is_key = parent, alts, chars, esc, is_key

    def step(self, ch: str):
        if self.esc:
            return self._escape(ch)
        if ch == '"':
            return self.parent.accept_key(self.chars, self.alts) if self.is_key else self.parent.accept(self.chars)
        if ch == "\\":
            return Str(self.parent, self.alts, self.chars, "\\", self.is_key)
        if ch < " ":
            return None
        return self._extend(self.chars + ch)

    def _escape(self, ch: str):
        if self.esc == "\\":
            if ch in ESCAPES:
                return self._extend(self.chars + ESCAPES[ch])
            return Str(self.parent, self.alts, self.chars, "\\u", self.is_key) if ch == "u" else None
        if ch not in HEX:
            return None
        esc = self.esc + ch
        if len(esc) < 6:
            return Str(self.parent, self.alts, self.chars, esc, self.is_key)
        return self._extend(_join_surrogates(self.chars, chr(int(esc[2:], 16))))

    def _extend(self, chars: str):
        # a trailing high surrogate may still merge with a \uDCxx escape: check the text before it
        visible = chars[:-1] if chars and "\ud800" <= chars[-1] <= "\udbff" else chars
        check = checks.key_prefix_ok if self.is_key else checks.string_ok
        kept = tuple(c for c in self.alts if check(c, visible))
        return Str(self.parent, kept, chars, "", self.is_key) if kept else None


def _join_surrogates(chars: str, c: str) -> str:
    """``json`` joins an escaped high surrogate and an escaped low surrogate into one character."""
    if chars and "\ud800" <= chars[-1] <= "\udbff" and "\udc00" <= c <= "\udfff":
        pair = 0x10000 + ((ord(chars[-1]) - 0xD800) << 10) + (ord(c) - 0xDC00)
        return chars[:-1] + chr(pair)
    return chars + c


class Num:
    __slots__ = ("parent", "alts", "text", "_closed")

    def __init__(self, parent, alts, text):
        self.parent, self.alts, self.text, self._closed = parent, alts, text, _UNSET

    def step(self, ch: str):
        text = self.text + ch
        if numbers.prefix_ok(text):
            reach = numbers.reach(text)
            if reach.lo is None and not reach.zero:
                return None  # every completion overflows a double
            kept = tuple(c for c in self.alts if checks.number_ok(c, reach))
            return Num(self.parent, kept, text) if kept else None
        after = self.close()
        return after.step(ch) if after is not None else None

    def close(self):
        """The parent after this number ends (None: not a complete number, or not allowed)."""
        if self._closed is _UNSET:
            value = parse_number(self.text) if numbers.complete(self.text) else None
            self._closed = None if value is None else self.parent.accept(value)
        return self._closed

    @property
    def complete(self) -> bool:
        return isinstance(self.parent, Root) and self.close() is not None


def parse_number(text: str):
    """The number ``json`` reads from ``text``; None for a literal that overflows or underflows a double."""
    if not any(c in text for c in ".eE"):
        try:
            return json.loads(text)
        except ValueError:  # past Python's limit on digits in an int
            return None
    value = float(text)
    if not math.isfinite(value):
        return None
    mantissa = text.lower().split("e")[0]
    if value == 0 and any(c in mantissa for c in "123456789"):
        return None
    return value


class Lit:
    __slots__ = ("parent", "alts", "word", "pos", "value")

    def __init__(self, parent, alts, word, pos, value):
        self.parent, self.alts, self.word, self.pos, self.value = parent, alts, word, pos, value

    def step(self, ch: str):
        if ch != self.word[self.pos]:
            return None
        if self.pos + 1 == len(self.word):
            return self.parent.accept(self.value)
        return Lit(self.parent, self.alts, self.word, self.pos + 1, self.value)
