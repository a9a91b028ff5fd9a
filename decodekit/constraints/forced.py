"""Forced text: what an automaton constraint allows as the only continuation, as draft tokens.

After a text, the byte automaton of a constraint may allow exactly one next byte (a JSON key,
punctuation, a literal in a regex) and not be able to end there; following such bytes gives the
forced text. Speculative decoding under the constraint drafts it as tokens with no model
(``forced_tokens``): the target still verifies them, so any tokenization of the forced bytes is
exact, and the one the tokenizer itself would choose is the one the model most likely agrees with.
"""

from __future__ import annotations

from decodekit.constraints.tokens import token_bytes

MAX_FORCED_BYTES = 256


class ForcedText:
    """Forced bytes after a text, from a ``ByteDFA``; memoised per automaton state."""

    def __init__(self, dfa):
        self._dfa = dfa
        self._by_state: dict[int, bytes] = {}

    def after(self, text: bytes) -> bytes:
        state = self._dfa.state(text)
        if state is None:
            return b""
        if state not in self._by_state:
            self._by_state[state] = self._walk(state)
        return self._by_state[state]

    def _walk(self, state: int) -> bytes:
        index = self._dfa._index
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

    def after(self, text: bytes, limit: int) -> list[int]:
        """Up to ``limit`` tokens spelling (a prefix of) the forced text after ``text``; whole tokens only."""
        data = self.forced.after(text)
        if not data or limit <= 0:
            return []
        if data not in self._tokenized:
            self._tokenized[data] = self._tokenize(data)
        return self._tokenized[data][:limit]

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


def forced_tokens(constraint, tokenizer) -> ForcedTokens | None:
    """The forced-token drafter of ``constraint`` for ``tokenizer``, or None without a byte automaton."""
    dfa = constraint.byte_dfa()
    if dfa is None:
        return None
    cache = constraint.__dict__.setdefault("_forced", {})
    key = id(tokenizer)
    if key not in cache:
        cache[key] = ForcedTokens(ForcedText(dfa), tokenizer)
    return cache[key]
