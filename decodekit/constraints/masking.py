"""Draws with an exact token mask (llguidance): greedy is the argmax of the masked logits, sampling
draws from the masked distribution, and the weight is its exact log normaliser (no AWRS walk).

Where the token must also complete the text (the last allowed token), the completion check runs
only over the tokens the mask allows, by AWRS with a bounded number of checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from decodekit.constraints.awrs import NEG_INF, TokenDraw, masked_sample, recursive_awrs


def mask_draws(index, state) -> bool:
    """Whether draws take the mask: llguidance's index with a live state (outlines-core's index keeps
    the sampler's own rule)."""
    return index is not None and state is not None and getattr(index, "engine", None) == "llguidance"


def masked_draw(*, logp: torch.Tensor, allowed: torch.Tensor, accept: Callable[[int], bool], final: bool,
                generator: torch.Generator | None, max_checks: int) -> TokenDraw:
    """One draw from p restricted to ``allowed`` (bool (V,), EOS already decided): ``logw`` = log Z
    exactly. ``final``: the token must complete the text (``accept`` checks it), searched by AWRS over
    the allowed tokens only."""
    if not final:
        return masked_sample(logp=logp, allowed=allowed, generator=generator)
    masked = logp.double().cpu().masked_fill(~allowed.cpu(), NEG_INF)
    return recursive_awrs(logp=masked, accept=accept, generator=generator, max_checks=max_checks)
