"""Member names already written in the JSON object open at the end of a text, so generation on a mask
engine never repeats one.

llguidance's JSON grammar lets a member name repeat where the schema allows other properties
(``{"a":1,"a":2}``); strict JSON (``json_prefix.load_strict``) refuses duplicates, so such a text can
never end: a dead end, found only once the document closes. Dropping the tokens that would close a
repeated name keeps every canonical document (``json.dumps`` of a dict has no duplicates) and removes
that dead end.

A scan state is ``(mode, stack, partial)``: ``mode`` 0 outside strings, 1 in a string, 2 after a
backslash in one; ``stack`` one frame per open container (``("o", names, expect_name)`` or ``("a",)``);
``partial`` the raw bytes of the member name being written (None outside one).
"""

from __future__ import annotations

import json

EMPTY = (0, (), None)


def scan(state: tuple, data: bytes) -> tuple:
    """The scan state after ``data``, from ``state``."""
    for b in data:
        state = _step(state, b)
    return state


def _step(state: tuple, b: int) -> tuple:
    mode, stack, partial = state
    if mode == 2:
        return 1, stack, None if partial is None else partial + bytes([b])
    if mode == 1:
        if b == 0x22:  # the string closes; a member name joins its object's names
            if partial is None:
                return 0, stack, None
            _, names, _ = stack[-1]
            return 0, (*stack[:-1], ("o", names | {_name(partial)}, False)), None
        return (2 if b == 0x5C else 1), stack, None if partial is None else partial + bytes([b])
    top = stack[-1] if stack else None
    if b == 0x22:
        return 1, stack, b"" if top is not None and top[0] == "o" and top[2] else None
    if b == 0x7B:  # {
        return 0, (*stack, ("o", frozenset(), True)), None
    if b == 0x5B:  # [
        return 0, (*stack, ("a",)), None
    if b in (0x7D, 0x5D):  # } ]
        return 0, stack[:-1], None
    if b == 0x2C and top is not None and top[0] == "o":  # , : the next member's name
        return 0, (*stack[:-1], ("o", top[1], True)), None
    return state


def _name(raw: bytes) -> str:
    try:
        return json.loads(b'"' + raw + b'"')
    except ValueError:  # an escape the grammar would not let close: compare the raw text
        return raw.decode("utf-8", "replace")


def repeats_name(state: tuple, piece: bytes) -> bool:
    """Whether ``piece`` after a text in scan ``state`` closes a member name its object already has."""
    for b in piece:
        mode, stack, partial = state
        if partial is not None and mode == 1 and b == 0x22:
            return _name(partial) in stack[-1][1]
        state = _step(state, b)
    return False


class NameGuard:
    """Drops, from a mask's ids, the tokens that would repeat a member name; scan states memoised by
    text (each draw's text extends the last one's by a token: a few bytes scanned per draw)."""

    MEMO_LIMIT = 50_000

    def __init__(self):
        self._memo: dict[bytes, tuple] = {}
        self._by_closer: dict[bytes, list[int]] = {}
        self._closers_for = None

    def state(self, text: bytes) -> tuple:
        cut = len(text)
        while cut > 0 and len(text) - cut <= 64 and text[:cut] not in self._memo:
            cut -= 1
        start = self._memo.get(text[:cut], EMPTY) if cut > 0 else EMPTY
        state = scan(start, text[cut:])
        if len(self._memo) > self.MEMO_LIMIT:
            self._memo.clear()
        self._memo[text] = state
        return state

    def drop(self, text: bytes, ids, pieces):
        """``ids`` (K,) without the tokens that close a member name already in the open object."""
        import torch

        state = self.state(text)
        mode, stack, partial = state
        if partial is None or not stack[-1][1]:  # not inside a member name, or none to repeat
            return ids
        if mode == 2 or b"\\" in partial:  # an escape under way: token by token (rare)
            cand = [t for t in ids.tolist() if b'"' in (pieces[t] or b"")]
            drop = [t for t in cand if repeats_name(state, pieces[t] or b"")]
        else:  # by name: the tokens whose bytes before their first '"' finish one of the names
            closers = self._closers(pieces)
            drop = []
            for name in stack[-1][1]:
                raw = json.dumps(name, ensure_ascii=False)[1:-1].encode()
                if raw.startswith(partial):
                    drop += closers.get(raw[len(partial):], [])
        return ids[~torch.isin(ids, torch.tensor(drop, dtype=ids.dtype))] if drop else ids

    def _closers(self, pieces) -> dict[bytes, list[int]]:
        """Tokens that close a string begun before them, by their bytes before the closing quote."""
        if self._closers_for is not pieces:
            self._by_closer: dict[bytes, list[int]] = {}
            for t, piece in enumerate(pieces):
                end = _closing_quote(piece or b"")
                if end is not None:
                    self._by_closer.setdefault(piece[:end], []).append(t)
            self._closers_for = pieces
        return self._by_closer


def _closing_quote(piece: bytes) -> int | None:
    """Where ``piece``, written inside a string (no escape under way), closes it; None if it does not."""
    escaped = False
    for i, b in enumerate(piece):
        if escaped:
            escaped = False
        elif b == 0x5C:
            escaped = True
        elif b == 0x22:
            return i
    return None
