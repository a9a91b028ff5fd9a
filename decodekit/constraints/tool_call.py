"""Tool calls as a constraint: free text (optionally), then one call block whose JSON is checked exactly.

The output language, with ``calls`` a constraint on one JSON document (a ``JsonSchema`` of the list
of calls, ``anyOf`` over the tools):

- ``text_allowed=False`` (``tool_choice`` required / a named function): ``OPEN json CLOSE`` (up to
  two spaces or newlines after ``OPEN`` and before ``CLOSE``);
- ``text_allowed=True`` (``auto``): ``text`` with no ``OPEN`` in it, optionally followed by
  ``OPEN json CLOSE``. The text is free; once the opening marker appears, the rest is the call
  block, checked by ``calls`` (a lazy grammar, triggered by the marker).

Nothing may follow ``CLOSE`` (the sampler then only allows EOS). ``parse_calls`` splits a finished
output into its text and its calls, and returns no calls for a block that does not validate.
"""

from __future__ import annotations

import json
import re

from decodekit.constraints.base import Constraint, as_bytes, split_utf8

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
PAD = " \n"  # whitespace allowed after the opening marker and before the closing one (models write a newline)
MAX_PAD = 2


def _unpad(text: str) -> tuple[str, bool]:
    """(``text`` without its leading pad, whether that pad is within ``MAX_PAD`` characters)."""
    rest = text.lstrip(PAD)
    return rest, len(text) - len(rest) <= MAX_PAD


def json_end(text: str) -> int | None:
    """The index just past the first JSON array or object ``text`` starts with, or None while it is open
    (string-aware bracket depth; the content itself is the ``calls`` constraint's to check)."""
    depth, in_string, escaped = 0, False, False
    for i, c in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth <= 0:
                return i + 1
        elif depth == 0 and not c.isspace():
            return None  # not an array or object: never closes, the calls constraint rejects it
    return None


class ToolCall(Constraint):
    """``ToolCall(calls, text_allowed=...)``: see the module docstring. ``calls`` checks the JSON
    between the markers (prefixes while it is open, the whole document once it closes)."""

    name = "tool_call"

    def __init__(self, calls: Constraint, *, text_allowed: bool, open_marker: str = OPEN,
                 close_marker: str = CLOSE):
        super().__init__()
        if not open_marker or not close_marker:
            raise ValueError("tool call markers must be non-empty")
        self.calls = calls
        self.text_allowed = text_allowed
        self.open = open_marker
        self.close = close_marker

    def _split(self, text: str) -> tuple[str, str] | None:
        """(text before the call block, the block after the opening marker), or None before the marker."""
        i = text.find(self.open)
        if i < 0:
            return None
        return text[:i], text[i + len(self.open):]

    def prefix_ok_text(self, text: str) -> bool:
        return self._prefix_ok(text, self.calls.prefix_ok_text)

    def generation_prefix_ok(self, text: bytes | str) -> bool:
        """``prefix_ok`` with the calls' JSON in its generation layout (``JsonSchema``: compact by default),
        so a sampler never wanders into whitespace a call does not need; validation stays ``prefix_ok``."""
        if not self.prefix_ok(text):
            return False
        s, _ = split_utf8(as_bytes(text))
        return self._prefix_ok(s, self.calls.generation_prefix_ok)

    def _prefix_ok(self, text: str, calls_prefix_ok) -> bool:
        block = self._block(text)
        if block is None:
            return self.text_allowed or self.open.startswith(text)
        if block is False:
            return False
        block, end = block
        if end is None:
            return calls_prefix_ok(block)
        tail, padded = _unpad(block[end:])
        return padded and self.calls.complete_ok_text(block[:end]) and self.close.startswith(tail)

    def complete_ok_text(self, text: str) -> bool:
        block = self._block(text)
        if block is None:
            return self.text_allowed
        if block is False or block[1] is None:
            return False
        block, end = block
        tail, padded = _unpad(block[end:])
        return padded and tail == self.close and self.calls.complete_ok_text(block[:end])

    def _block(self, text: str):
        """None before the opening marker; False where the text around it is not allowed (text before
        it without ``text_allowed``, too much pad); else (the block after the marker and its pad, where
        the block's JSON ends or None while it is open)."""
        parts = self._split(text)
        if parts is None:
            return None
        before, block = parts
        block, padded = _unpad(block)
        if (before and not self.text_allowed) or not padded:
            return False
        return block, json_end(block)

    def mask_grammar(self) -> str | None:
        """llguidance's grammar of the output (exact masks, forced tokens in the call block), built once:
        the markers around the calls' JSON schema; with free text (``auto``) a lazy grammar: any text, or
        text up to the first opening marker (a lazy lexeme: the marker triggers the call) and then the
        call block, so once a call starts the rest is masked exactly and text never goes on past a marker."""
        if "_mask" not in self.__dict__:
            schema = getattr(self.calls, "schema", None)
            self._mask = None
            if schema is not None and self.calls.mask_grammar() is not None:
                from decodekit.constraints.guidance import lark_grammar

                block = f"PAD calls PAD {json.dumps(self.close)}"
                if self.text_allowed:
                    head = ("%llguidance {}\nstart: TEXT | call\n"
                            f"call_trigger[lazy]: TEXT {json.dumps(self.open)}\ncall: call_trigger {block}\n"
                            "TEXT: /(.|\\n)*/\n")
                else:
                    head = f"start: {json.dumps(self.open)} {block}\n"
                lark = head + f"PAD: /[ \\n]{{0,{MAX_PAD}}}/\ncalls: %json {json.dumps(schema)}\n"
                self._mask = lark_grammar(lark)
        return self._mask

    def automaton(self) -> str | None:
        """Without free text: the markers around the calls' own automaton (exact masks, forced drafts)."""
        inner = self.calls.automaton()
        if self.text_allowed or inner is None:
            return None
        pad = "[ \\n]{0," + str(MAX_PAD) + "}"
        return f"{re.escape(self.open)}{pad}({inner}){pad}{re.escape(self.close)}"


def parse_calls(text: str, open_marker: str = OPEN, close_marker: str = CLOSE) -> tuple[str, list | None]:
    """(text before the call block, the parsed JSON list of calls) of a finished output; calls None when
    there is no complete block or its JSON does not parse as a list (the caller validates the calls)."""
    i = text.find(open_marker)
    if i < 0:
        return text, None
    block = text[i + len(open_marker):]
    end = json_end(block)
    if end is None or block[end:].strip() != close_marker:
        return text[:i], None
    try:
        calls = json.loads(block[:end])
    except json.JSONDecodeError:
        return text[:i], None
    return text[:i], calls if isinstance(calls, list) else None
