"""The Backend interface: one model, its tokenizer, and its namespace in the KV-cache manager."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from decodekit.cache import CacheManager, KVHandle

SHORT_ROW = 16  # rows with at most this many new tokens (decode, verify) batch together


@dataclass(frozen=True)
class ForwardRow:
    """One sequence in a forward call.

    ``slots`` are all the sequence's KV slots in position order; the last ``len(new_ids)`` of them
    receive this step's keys and values. Logits come back for the last ``num_logits`` new tokens.
    """

    slots: list[int]
    new_ids: list[int]
    num_logits: int = 1


class Backend(ABC):
    """A model behind the engine. Owns its tensors; the cache manager owns sharing and eviction."""

    name: str
    tokenizer: object
    vocab_size: int
    max_context: int
    num_params: int
    cache: CacheManager

    def __init__(self):
        self.num_forward_calls = 0
        self.num_forward_tokens = 0
        self.capturing = False
        self.feature_pool: torch.Tensor | None = None  # (capacity + 1, H): hidden state per KV slot
        self.feature_ok: torch.Tensor | None = None  # (capacity + 1,) bool: the slot's row was written
        self.last_hidden: list[torch.Tensor] | None = None  # set by forward_rows while capturing

    @abstractmethod
    def forward_rows(self, rows: list[ForwardRow]) -> list[torch.Tensor]:
        """Run the model on each row's new tokens, reading and writing K/V at the row's slots.

        Returns one float tensor (num_logits, V) per row.
        """

    def forward(self, handles: list[KVHandle], new_ids: list[list[int]], num_logits=1) -> list[torch.Tensor]:
        """Extend each handle by its new tokens and compute them (prefill, decode or verify).

        ``num_logits`` is an int for every row or a list per row. Long rows (prefill) and short
        rows (decode, verify) run as separate forward calls so short rows are not padded.
        """
        if len(handles) != len(new_ids):
            raise ValueError("forward needs one list of new ids per handle")
        counts = num_logits if isinstance(num_logits, list) else [num_logits] * len(handles)
        self.cache.ensure_free(sum(len(ids) for ids in new_ids))
        rows = []
        for handle, ids, k in zip(handles, new_ids, counts):
            if not ids:
                raise ValueError("forward needs at least one new token per row")
            self.cache.extend(handle, len(ids))
            rows.append(ForwardRow(list(handle.slots), list(ids), min(k, len(ids))))
        out: list[torch.Tensor | None] = [None] * len(rows)
        for group in _split_short_long(rows):
            logits = self.forward_rows([rows[i] for i in group])
            self.num_forward_calls += 1
            self.num_forward_tokens += sum(len(rows[i].new_ids) for i in group)
            for i, row_logits in zip(group, logits):
                out[i] = row_logits
            if self.capturing:
                self._keep_features([rows[i] for i in group])
        return out

    # ---- hidden-state capture (for draft heads that read the target's features) --------------
    # The final hidden state of every computed position is kept per KV slot, beside its keys and
    # values, so a cached prefix keeps its features too (a prefix-cache hit computes nothing).
    def capture_features(self) -> None:
        """From now on keep each computed position's last hidden state in its KV slot's row."""
        self.capturing = True

    def features_at(self, handle: KVHandle, start: int, stop: int) -> torch.Tensor | None:
        """(stop - start, H) hidden states of ``handle``'s positions [start, stop), or None if one is missing."""
        if self.feature_pool is None or not 0 <= start < stop <= len(handle):
            return None
        slots = torch.tensor(handle.slots[start:stop], device=self.feature_pool.device)
        return self.feature_pool[slots] if bool(self.feature_ok[slots].all()) else None

    def first_featured(self, handle: KVHandle, stop: int) -> int | None:
        """The smallest p with features for every position in [p, stop), or None."""
        if self.feature_pool is None or not 0 < stop <= len(handle):
            return None
        ok = self.feature_ok[torch.tensor(handle.slots[:stop], device=self.feature_ok.device)]
        if not bool(ok[-1]):
            return None
        missing = (~ok).nonzero()
        return int(missing[-1]) + 1 if len(missing) else 0

    def _keep_features(self, rows: list[ForwardRow]) -> None:
        if self.last_hidden is None:
            raise ValueError(f"backend {self.name!r} cannot capture hidden states")
        for row, hidden in zip(rows, self.last_hidden):
            if self.feature_pool is None:
                self.feature_pool = hidden.new_zeros((self.cache.capacity + 1, hidden.shape[-1]))
                self.feature_ok = torch.zeros(self.cache.capacity + 1, dtype=torch.bool, device=hidden.device)
            slots = torch.tensor(row.slots[len(row.slots) - len(row.new_ids):], device=hidden.device)
            self.feature_pool[slots] = hidden
            self.feature_ok[slots] = True
        self.last_hidden = None

    def open(self, ids: list[int]) -> KVHandle:
        return self.cache.open(ids)

    def computed_tokens(self) -> int:
        """Tokens the model has computed so far (prefill, decode, verify), for cost accounting."""
        return self.num_forward_tokens

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix no running sequence holds (benchmarks start cold)."""
        self.cache.tree.evict(self.cache.capacity)


def _split_short_long(rows: list[ForwardRow]) -> list[list[int]]:
    short = [i for i, r in enumerate(rows) if len(r.new_ids) <= SHORT_ROW]
    long = [i for i, r in enumerate(rows) if len(r.new_ids) > SHORT_ROW]
    return [g for g in (short, long) if g]
