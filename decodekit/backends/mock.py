"""A deterministic toy backend whose next-token distributions are known exactly.

Its "K/V" is the token id stored in each slot, so logits are computed from what the cache
actually holds: a cache bug changes the output, and tests see it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from decodekit.backends.base import Backend, ForwardRow
from decodekit.cache import CacheManager


class MockTokenizer:
    """One character per token; token 0 is EOS and decodes to nothing."""

    def __init__(self, vocab_size: int):
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?-ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        if vocab_size - 1 > len(alphabet):
            raise ValueError(f"mock vocab_size must be <= {len(alphabet) + 1}")
        self.pieces = [""] + list(alphabet[: vocab_size - 1])
        self.index = {p: i for i, p in enumerate(self.pieces) if p}
        self.eos_token_ids = frozenset([0])
        self.bos_token_id = None
        self.vocab_size = vocab_size
        self.has_chat_template = False

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"mock tokenizer cannot encode character {e.args[0]!r}") from None

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids)

    def token_str(self, token_id: int) -> str:
        return self.pieces[token_id]

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(m["content"] for m in messages))


def bigram_logits(vocab_size: int, seed: int = 0, scale: float = 2.0) -> Callable[[list[int]], torch.Tensor]:
    """Logits that depend on the last token only, from a fixed random table."""
    table = torch.randn((vocab_size, vocab_size), generator=torch.Generator().manual_seed(seed)) * scale

    def logits_fn(context: list[int]) -> torch.Tensor:
        return table[context[-1]].clone()

    return logits_fn


class MockBackend(Backend):
    def __init__(self, vocab_size: int = 16, logits_fn=None, *, name: str = "mock", seed: int = 0,
                 cache_tokens: int = 4096, max_context: int = 2048, prefix_cache: bool = True,
                 num_params: int = 1000):
        super().__init__()
        self.name = name
        self.vocab_size = vocab_size
        self.tokenizer = MockTokenizer(vocab_size)
        self.logits_fn = logits_fn or bigram_logits(vocab_size, seed)
        self.max_context = max_context
        self.num_params = num_params
        self.cache = CacheManager(cache_tokens, prefix_cache=prefix_cache)
        self.slot_tokens = [-1] * (cache_tokens + 1)

    def forward_rows(self, rows: list[ForwardRow]) -> list[torch.Tensor]:
        out = []
        for row in rows:
            start = len(row.slots) - len(row.new_ids)
            for slot, tok in zip(row.slots[start:], row.new_ids):
                self.slot_tokens[slot] = tok
            context = [self.slot_tokens[s] for s in row.slots]
            first = len(row.slots) - row.num_logits
            out.append(torch.stack([self.logits_fn(context[: i + 1]) for i in range(first, len(row.slots))]).float())
        return out

    def exact_logits(self, ids: list[int]) -> torch.Tensor:
        """The no-cache reference: next-token logits after ``ids``."""
        return self.logits_fn(list(ids)).float()
