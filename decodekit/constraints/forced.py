"""Forced text: what an automaton constraint allows as the only continuation, as draft tokens.

After a text, the byte automaton of a constraint may allow exactly one next byte (a JSON key,
punctuation, a literal in a regex) and not be able to end there; following such bytes gives the
forced text. Speculative decoding under the constraint drafts it as tokens with no model
(``forced_tokens``): the target still verifies them, so any tokenization of the forced bytes is
exact, and the one the tokenizer itself would choose is the one the model most likely agrees with.
"""

from __future__ import annotations

import itertools
import weakref

from decodekit.constraints.tokens import token_bytes

MAX_FORCED_BYTES = 256
MAX_LAYOUT_CHOICES = 3  # guess only at small branches (optional whitespace, a comma or a brace), never in free text


class ForcedText:
    """Forced bytes after a text, from a ``ByteDFA``; memoised per automaton state."""

    def __init__(self, dfa):
        self.dfa = dfa
        self._by_state: dict[int, bytes] = {}

    def after(self, text: bytes) -> bytes:
        state = self.dfa.state(text)
        return b"" if state is None else self._from(state)

    def forces(self, text: bytes, piece: bytes | None) -> bool:
        """Whether the constraint left no choice of text for a token spelling ``piece`` after ``text``:
        its bytes are all forced (``piece`` None, an end of text: the text is complete and cannot go on)."""
        if piece is None:
            state = self.dfa.state(text)
            return state is not None and self.dfa.index.is_final_state(state) and \
                all(b > 255 for b in self.dfa.index.get_allowed_tokens(state))  # 256: the automaton's EOS
        return bool(piece) and self.after(text).startswith(piece)

    def _from(self, state: int) -> bytes:
        if state not in self._by_state:
            self._by_state[state] = self._walk(state)
        return self._by_state[state]

    def layout_guess(self, text: bytes, history: bytes = b"") -> bytes:
        """At a small branch after ``text`` (e.g. optional whitespace), the allowed byte that last
        followed the same byte in ``history + text`` (the prompt shows a layout too), then the forced
        bytes after it; b"" if none applies. A guess, not forced: verification keeps it only where the
        model agrees."""
        state = self.dfa.state(text)
        if state is None or not text:
            return b""
        index = self.dfa.index
        allowed = index.get_allowed_tokens(state)
        if not 1 < len(allowed) <= MAX_LAYOUT_CHOICES or index.is_final_state(state):
            return b""
        chosen = _last_follower(history + text, text[-1], set(allowed))
        if chosen is None:
            return b""
        nxt = index.get_next_state(state, chosen)
        return b"" if nxt is None else bytes([chosen]) + self._from(nxt)

    def _walk(self, state: int) -> bytes:
        index = self.dfa.index
        out = bytearray()
        while len(out) < MAX_FORCED_BYTES and not index.is_final_state(state):
            allowed = index.get_allowed_tokens(state)
            if len(allowed) != 1 or allowed[0] > 255:
                break
            out.append(allowed[0])
            state = index.get_next_state(state, allowed[0])
            if state is None:
                break
        return bytes(out)


class ForcedTokens:
    """Token ids spelling the forced text after a text, for one constraint and one tokenizer."""

    def __init__(self, forced: ForcedText, tokenizer):
        self.forced = forced
        self.tokenizer = tokenizer
        pieces = token_bytes(tokenizer)
        self._by_bytes = {}
        for token, piece in enumerate(pieces):
            if piece and piece not in self._by_bytes:
                self._by_bytes[piece] = token
        self._longest = max((len(p) for p in self._by_bytes), default=1)
        self._pieces = pieces
        self._tokenized: dict[bytes, list[int]] = {}
        self._extensions: dict[bytes, list[bytes]] | None = None
        self._merge_memo: dict[tuple[int, bytes], bool] = {}

    def after(self, text: bytes, limit: int) -> list[int]:
        """Up to ``limit`` tokens spelling (a prefix of) the forced text after ``text``; whole tokens only."""
        return self._tokens(self.forced.after(text))[: max(limit, 0)]

    def draft(self, text: bytes, limit: int, history: bytes = b"", layout: bool = True) -> tuple[list[int], int]:
        """(tokens, how many are forced): the forced text after ``text``, then, with ``layout``, up to
        two layout guesses (``ForcedText.layout_guess`` over ``history`` and the text), each followed
        by what it forces; tokenized together. The last token is left out where a longer token could
        continue it (``{`` before ``"``: the model writes ``{"``, and a draft ``{`` would be rejected)."""
        forced = self.forced.after(text)
        data = forced
        for _ in range(2 if layout else 0):
            guess = self.forced.layout_guess(text + data, history)
            if not guess:
                break
            data += guess
        tokens = self._tokens(data)
        if tokens and self._merges(text + data, self._pieces[tokens[-1]]):
            tokens = tokens[:-1]
        tokens = tokens[: max(limit, 0)]
        ends = itertools.accumulate(len(self._pieces[t]) for t in tokens)
        return tokens, sum(1 for end in ends if end <= len(forced))

    def _merges(self, text: bytes, piece: bytes) -> bool:
        """Whether a longer token starting with ``piece`` (which ends ``text``) is allowed there too and
        the text after it is structure (a small branch), so the model likely writes the longer token.
        Before free text (a string's content) the piece stays: models end a token there."""
        dfa = self.forced.dfa
        state = dfa.state(text)
        if state is None:
            return False
        key = (state, piece)
        if key not in self._merge_memo:
            small = len(dfa.index.get_allowed_tokens(state)) <= MAX_LAYOUT_CHOICES
            self._merge_memo[key] = small and any(dfa.advance(state, longer[len(piece):]) is not None
                                                  for longer in self._longer(piece))
        return self._merge_memo[key]

    def _longer(self, piece: bytes) -> list[bytes]:
        """Token byte strings that start with ``piece`` and are longer (built once per tokenizer)."""
        if self._extensions is None:
            self._extensions = {}
            for p in self._by_bytes:
                for i in range(1, len(p)):
                    self._extensions.setdefault(p[:i], []).append(p)
        return self._extensions.get(piece, [])

    def _tokens(self, data: bytes) -> list[int]:
        if not data:
            return []
        if data not in self._tokenized:
            self._tokenized[data] = self._tokenize(data)
        return self._tokenized[data]

    def _tokenize(self, data: bytes) -> list[int]:
        """The tokenizer's own split where it spells ``data`` exactly; else greedy longest match."""
        ids = self._encode(data)
        if ids is not None and b"".join(self._pieces[i] or b"\0" for i in ids) == data:
            return ids
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                token = self._by_bytes.get(data[i : i + n])
                if token is not None:
                    out.append(token)
                    i += n
                    break
            else:
                break  # a byte no token spells on its own: stop the draft here
        return out

    def _encode(self, data: bytes) -> list[int] | None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        hf = getattr(self.tokenizer, "hf", None)
        if hf is not None:
            return list(hf(text, add_special_tokens=False).input_ids)
        try:
            return list(self.tokenizer.encode(text))
        except ValueError:
            return None


def _last_follower(text: bytes, byte: int, allowed: set[int], tries: int = 16) -> int | None:
    """The allowed byte that followed the latest earlier occurrence of ``byte`` in ``text`` (the last
    ``tries`` occurrences looked at)."""
    end = len(text) - 1
    for _ in range(tries):
        at = text.rfind(bytes([byte]), 0, end)
        if at < 0:
            return None
        if text[at + 1] in allowed:
            return text[at + 1]
        end = at
    return None


_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # constraint -> {tokenizer: ForcedTokens}
_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # constraint -> ForcedText


def forced_text(constraint) -> ForcedText | None:
    """The forced-text reader of ``constraint``'s byte automaton (None without one); built once."""
    dfa = constraint.byte_dfa()
    if dfa is None:
        return None
    if constraint not in _TEXTS:
        _TEXTS[constraint] = ForcedText(dfa)
    return _TEXTS[constraint]


def forced_tokens(constraint, tokenizer) -> ForcedTokens | None:
    """The forced-token drafter of ``constraint`` for ``tokenizer``, or None without a byte automaton;
    built once per pair (like ``Constraint.index``)."""
    dfa = constraint.byte_dfa()
    if dfa is None:
        return None
    per_tokenizer = _BUILT.setdefault(constraint, weakref.WeakKeyDictionary())
    if tokenizer not in per_tokenizer:
        per_tokenizer[tokenizer] = ForcedTokens(forced_text(constraint), tokenizer)
    return per_tokenizer[tokenizer]
