"""Exact byte strings of every token id, built once per tokenizer.

Constraints act on the bytes of the text, so each token is lifted through its exact byte string:
byte-level BPE tokens (GPT-2 / SmolLM2: ``Ġ`` is a space) map back through the byte decoder;
SentencePiece tokens (Gemma) turn ``▁`` into a space and ``<0xAB>`` byte-fallback tokens into
that one byte. Special tokens (BOS, chat markers, ...) have no bytes (``None``): a constraint
never accepts them, and EOS is handled apart, as the end of the text.
"""

from __future__ import annotations

import re
from functools import lru_cache

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_ATTR = "_decodekit_token_bytes"
_MASK_ATTR = "_decodekit_unsampleable"


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` table (printable stand-ins for the 256 bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer) -> list[bytes | None]:
    """Byte string per token id (``None`` for special tokens); cached on the tokenizer object."""
    cached = getattr(tokenizer, _ATTR, None)
    if cached is None:
        cached = _build(tokenizer)
        try:
            setattr(tokenizer, _ATTR, cached)
        except AttributeError:  # a tokenizer with __slots__: rebuild each time (rare)
            pass
    return cached


def unsampleable_mask(tokenizer, vocab: int):
    """(vocab,) bool: token ids a constraint can never accept (no bytes: special tokens other than EOS),
    masked before any constrained draw; cached on the tokenizer object per vocabulary size."""
    import torch

    masks = getattr(tokenizer, _MASK_ATTR, None)
    if masks is None:
        masks = {}
        try:
            setattr(tokenizer, _MASK_ATTR, masks)
        except AttributeError:  # a tokenizer that takes no attributes: build each time
            pass
    if vocab not in masks:
        pieces, eos = token_bytes(tokenizer)[:vocab], set(tokenizer.eos_token_ids)
        ok = [i for i, b in enumerate(pieces) if b is not None or i in eos]
        mask = torch.ones(vocab, dtype=torch.bool)
        mask[torch.tensor(ok, dtype=torch.long)] = False
        masks[vocab] = mask
    return masks[vocab]


def constrained_logp(logits, params, tokenizer):
    """Log-probabilities (V,) a constrained draw samples from: the request's processed distribution
    (temperature, top-k / top-p / min-p), float64 on the CPU beside the per-request generator, with
    unsampleable tokens at -inf. The one form of it for ``Constrained`` and constrained tree leaves."""
    import torch

    from decodekit.sampling import process_logits

    logp = torch.log_softmax(process_logits(logits, params).double().cpu(), -1)
    return logp.masked_fill(unsampleable_mask(tokenizer, logp.shape[-1]), float("-inf"))


def _build(tokenizer) -> list[bytes | None]:
    if hasattr(tokenizer, "pieces"):  # decodekit's mock tokenizer: one character per token
        eos = tokenizer.eos_token_ids
        return [None if i in eos else p.encode() for i, p in enumerate(tokenizer.pieces)]
    hf = getattr(tokenizer, "hf", tokenizer)
    size = len(hf)
    pieces = hf.convert_ids_to_tokens(list(range(size)))
    special = set(hf.all_special_ids)
    added = getattr(hf, "added_tokens_decoder", {}) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    byte_level = _is_byte_level(pieces)
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif i in added:
            out.append(added[i].content.encode())
        else:
            out.append(_byte_level_bytes(piece) if byte_level else _sentencepiece_bytes(piece))
    return out


def _is_byte_level(pieces: list[str | None]) -> bool:
    """Byte-level BPE vocabularies spell spaces as ``Ġ``; SentencePiece ones as ``▁``."""
    g = sum(1 for p in pieces[:5000] if p and "Ġ" in p)
    s = sum(1 for p in pieces[:5000] if p and "▁" in p)
    return g > s


def _byte_level_bytes(piece: str) -> bytes | None:
    table = _unicode_to_byte()
    try:
        return bytes(table[c] for c in piece)
    except KeyError:  # not a byte-level piece (an unmarked added token): its text as UTF-8
        return piece.encode()


def _sentencepiece_bytes(piece: str) -> bytes:
    m = _BYTE_FALLBACK.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("▁", " ").encode()
