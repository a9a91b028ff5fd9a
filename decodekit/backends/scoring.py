"""Prompt log-probabilities: every prompt position recomputed in chunks on a backend.

The prefix cache keeps keys and values, not logits, so scoring a prompt computes it again: one KV
handle opened through ``backend.cache`` with no cached prefix, the prompt forwarded a chunk at a
time (logits for every position of the chunk), a log-softmax per chunk, and the handle committed
(the prompt's K/V then serve a later request) and released. At most a (chunk x vocabulary) tensor
exists at once, never (prompt x vocabulary).

``PromptScorer`` works one chunk per ``step()`` so a server can interleave it with engine steps
(it runs on the engine's thread, between steps); ``score`` runs it to the end.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

DEFAULT_CHUNK = 128


class PromptLogprob(NamedTuple):
    """Position i > 0 of a prompt: log p(ids[i] | ids[:i]), its rank (1 = the most likely token) and
    the ``top`` most likely tokens as (token id, log-probability)."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


class PromptScorer:
    """Scores ``ids`` on ``backend`` chunk by chunk; ``result`` is None for position 0, then one
    ``PromptLogprob`` per position. Call ``close()`` if it is abandoned before ``done``."""

    def __init__(self, backend, ids: list[int], *, top_n: int = 0, chunk_tokens: int = DEFAULT_CHUNK):
        if not ids:
            raise ValueError("a prompt to score needs at least one token")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if top_n < 0:
            raise ValueError(f"top_n must be >= 0, got {top_n}")
        if getattr(backend, "cache", None) is None:
            name = getattr(backend, "name", backend)
            raise ValueError(f"backend {name!r} cannot score prompts (it has no KV cache manager)")
        self.backend = backend
        self.ids = list(ids)
        self.top_n = top_n
        self.chunk_tokens = chunk_tokens
        self.result: list[PromptLogprob | None] = [None]
        self._handle = None
        self._pos = 0  # tokens forwarded so far

    @property
    def done(self) -> bool:
        return len(self.result) == len(self.ids)

    def step(self) -> bool:
        """Forward the next chunk; True once every position is scored (the handle is then released)."""
        if self.done:
            self.close()
            return True
        cache = self.backend.cache
        if self._handle is None:
            self._handle = cache.open([])  # no cached prefix: every position needs its logits
        # the last prompt token predicts nothing inside the prompt: it is left out
        chunk = self.ids[self._pos: min(self._pos + self.chunk_tokens, len(self.ids) - 1)]
        try:
            logits = self.backend.forward([self._handle], [chunk], num_logits=len(chunk))[0]  # (C, V)
        except BaseException:
            self.close()
            raise
        targets = self.ids[self._pos + 1: self._pos + 1 + len(chunk)]
        self.result.extend(_score_rows(logits, targets, self.top_n))
        self._pos += len(chunk)
        if self.done:
            self.close(commit=True)
        return self.done

    def close(self, commit: bool = False) -> None:
        """Release the handle (idempotent); ``commit``: the computed prefix enters the prefix cache first."""
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        cache = self.backend.cache
        if commit:
            cache.commit(handle, self.ids)
        cache.release(handle)


def _score_rows(logits: torch.Tensor, targets: list[int], top_n: int) -> list[PromptLogprob]:
    logp = torch.log_softmax(logits.float(), dim=-1)  # (C, V)
    target = torch.tensor(targets, device=logp.device)[:, None]  # (C, 1)
    chosen = logp.gather(-1, target)  # (C, 1)
    ranks = (logp > chosen).sum(-1) + 1  # (C,)
    tops = torch.topk(logp, top_n, dim=-1) if top_n else None
    out = []
    for i, token in enumerate(targets):
        top = () if tops is None else tuple(zip(tops.indices[i].tolist(), tops.values[i].tolist()))
        out.append(PromptLogprob(token, float(chosen[i, 0]), int(ranks[i]), top))
    return out


def score(backend, ids: list[int], *, top_n: int = 0, chunk_tokens: int = DEFAULT_CHUNK) -> list[PromptLogprob | None]:
    """Every position's log-probability under ``backend``'s model (None for position 0)."""
    scorer = PromptScorer(backend, ids, top_n=top_n, chunk_tokens=chunk_tokens)
    try:
        while not scorer.step():
            pass
    finally:
        scorer.close()
    return scorer.result
