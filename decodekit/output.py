"""The output processor: incremental detokenization, stop strings, safe streaming deltas, logprobs.

One per sequence, shared by the transformers and vLLM engines. Detokenization is incremental
with prefix / read offsets (as in vLLM and text-generation-inference): each update decodes only
the tokens since the last emitted piece, with the piece before it as left context, so a long answer is
never re-decoded per token, and a piece ending in an incomplete UTF-8 character waits for the
next token.
"""

from __future__ import annotations

import torch

from decodekit.sampling import token_logprobs
from decodekit.types import SAMPLED, Provenance, TokenInfo, TopLogprob


class TextState:
    """Tracks a sequence's output text, finds stop strings and yields safe-to-stream deltas."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._ids: list[int] = []
        self._prefix = 0  # token offset where the context of the next decode starts
        self._read = 0  # token offset up to which ``text`` holds the decoded output

    def update(self, output_ids: list[int]) -> bool:
        """Fold in new output tokens; True when a stop string appeared (text is cut before it)."""
        if self.stopped:
            return True
        self._ids = list(output_ids)
        self._decode_new(flush=False)
        return self._find_stop()

    def delta(self, final: bool) -> str:
        """Text not yet streamed, holding back an incomplete character or a possible stop-string start."""
        if final and not self.stopped:
            self._decode_new(flush=True)
            self._find_stop()
        end = len(self.text)
        if not final:
            end -= self._stop_prefix_len(self.text[:end])
        if end <= self.sent:
            return ""
        piece = self.text[self.sent : end]
        self.sent = end
        return piece

    def _decode_new(self, flush: bool) -> None:
        if self._read >= len(self._ids):
            return
        decode = self.tokenizer.decode
        before = decode(self._ids[self._prefix : self._read])
        after = decode(self._ids[self._prefix :])
        if len(after) > len(before) and (flush or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        elif flush:
            self._read = len(self._ids)

    def _find_stop(self) -> bool:
        if not self.stop:
            return False
        window = max(len(s) for s in self.stop) + 16
        cut = stop_index(self.text, self.stop, max(0, self.sent - window))
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
        return self.stopped

    def _stop_prefix_len(self, text: str) -> int:
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best


class StopRule:
    """The one stop rule of every engine and of tree leaves: a stop token (``stop_token_ids``, or EOS
    unless ``ignore_eos``) ends a sequence before it is appended ("stop", not output); after a token,
    a stop string ("stop", the text cut before it), then the length limit ("length": ``max_tokens``
    output tokens, or the model's context) end it."""

    def __init__(self, params, eos_ids, max_context: int, max_tokens: int | None = None):
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_ids))
        self.max_context = max_context
        self.max_tokens = params.max_new_tokens if max_tokens is None else max_tokens

    def before(self, token: int) -> str | None:
        """"stop" when ``token`` is a stop token (it ends the sequence without being output)."""
        return "stop" if token in self.stop_ids else None

    def after(self, text: TextState | None, output_ids: list[int], num_ids: int) -> str | None:
        """After a token: a stop string in ``text`` (updated with ``output_ids``), then the length limit."""
        if text is not None and text.update(output_ids):
            return "stop"
        return self.length(len(output_ids), num_ids)

    def length(self, num_output: int, num_ids: int) -> str | None:
        """"length" once ``num_output`` tokens are out or ``num_ids`` fill the model's context."""
        return "length" if num_output >= self.max_tokens or num_ids >= self.max_context else None


def stop_index(text: str, stop: tuple[str, ...], search_from: int = 0) -> int:
    """Where the first stop string starts in ``text`` (from ``search_from`` on), or -1."""
    cuts = [i for s in stop if (i := text.find(s, search_from)) >= 0]
    return min(cuts) if cuts else -1


def token_info(tokenizer, token: int, logits: torch.Tensor, top_n: int,
               provenance: Provenance = SAMPLED) -> TokenInfo:
    """The ``TokenInfo`` (log-probability under the raw model distribution, top alternatives) of ``token``."""
    logp, top = token_logprobs(logits, token, top_n)
    name = tokenizer.token_str
    return TokenInfo(token, name(token), logp, tuple(TopLogprob(t, name(t), lp) for t, lp in top), provenance)
