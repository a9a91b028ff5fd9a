"""Draws with an exact token mask (llguidance): greedy is the argmax of the masked logits, sampling
draws from the masked distribution, and the weight is its exact log normaliser (no AWRS walk).

The draw works on the K allowed tokens only (ids from the packed mask): one log-sum-exp over the
vocabulary for the normaliser (on the logits' device), then a gather of K logits; nothing else
touches all V tokens. Where the token must also complete the text (the last allowed token), the
completion check runs over the allowed tokens only, by AWRS with a bounded number of checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from decodekit.constraints.awrs import NEG_INF, TokenDraw, recursive_awrs


def mask_draws(index, state) -> bool:
    """Whether draws take the mask: llguidance's index with a live state (outlines-core's index keeps
    the sampler's own rule)."""
    return index is not None and state is not None and getattr(index, "engine", None) == "llguidance"


def allowed_ids(index, state, *, complete: bool, eos_ids, vocab: int) -> torch.Tensor:
    """Ids (K,) the mask allows below ``vocab``, EOS ids only where the text is ``complete``."""
    ids = index.allowed_ids(state)  # non-EOS tokens
    if index.vocab_size > vocab:
        ids = ids[ids < vocab]
    eos = sorted(e for e in eos_ids if e < vocab)
    return torch.cat([ids, torch.tensor(eos, dtype=ids.dtype)]) if complete and eos else ids


def masked_draw(*, logits: torch.Tensor, ids: torch.Tensor, accept: Callable[[int], bool], final: bool,
                generator: torch.Generator | None, max_checks: int) -> TokenDraw:
    """One draw from softmax(``logits``) (V,) restricted to ``ids`` (K,): ``logw`` = log Z exactly.
    ``final``: the token must complete the text (``accept`` checks it), searched by AWRS over ``ids``."""
    if ids.numel() == 0:
        return TokenDraw(-1, NEG_INF, 0)
    log_norm = torch.logsumexp(logits.double(), 0)
    logp = (logits[ids.to(logits.device)].double() - log_norm).cpu()  # (K,) log p of the allowed tokens
    if final:
        draw = recursive_awrs(logp=logp, accept=lambda j: accept(int(ids[j])), generator=generator,
                              max_checks=max_checks)
        return TokenDraw(int(ids[draw.token]) if draw.token >= 0 else -1, draw.logw, draw.num_checks)
    log_z = float(torch.logsumexp(logp, 0))
    if log_z == NEG_INF:
        return TokenDraw(-1, NEG_INF, 0)
    if generator is None:
        return TokenDraw(int(ids[int(logp.argmax())]), log_z, 0)
    pick = int(torch.multinomial((logp - log_z).exp(), 1, generator=generator))
    return TokenDraw(int(ids[pick]), log_z, 0)


def mask_token_draw(index, state, constraint, text: bytes, logits: torch.Tensor, *, eos_ids, pieces,
                    accept: Callable[[int], bool], final: bool, generator: torch.Generator | None,
                    max_checks: int) -> tuple[TokenDraw, int]:
    """(the draw, how many tokens the mask allowed) of one constrained token on llguidance's mask after
    ``text`` (matcher ``state``): EOS where ``constraint.complete_ok(text)``, the ids narrowed to the
    generation layout, then ``masked_draw`` on the request's processed ``logits``. The one form of it
    for ``Constrained`` (sequences, particles) and constrained tree leaves."""
    ids = allowed_ids(index, state, complete=constraint.complete_ok(text), eos_ids=eos_ids, vocab=logits.shape[-1])
    ids = constraint.mask_filter(text, ids, pieces)
    draw = masked_draw(logits=logits, ids=ids, accept=accept, final=final, generator=generator, max_checks=max_checks)
    return draw, int(ids.numel())
