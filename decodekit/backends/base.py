"""The Backend interface: one model, its tokenizer, and its namespace in the KV-cache manager."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass

import torch

from decodekit.cache import CacheManager, KVHandle

SHORT_ROW = 16  # rows with at most this many new tokens (decode, verify) batch together
FEATURE_ROWS = 32768  # captured hidden states kept at most (oldest handles' dropped first)


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
        self.features: OrderedDict[int, list] | None = None  # handle id -> [(first position, (n, H) rows)]
        self.last_hidden: list[torch.Tensor] | None = None  # set by forward_rows while features are captured

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
            if self.features is not None:
                self._keep_features([handles[i] for i in group], [rows[i] for i in group])
        return out

    # ---- hidden-state capture (for draft heads that read the target's features) --------------
    def capture_features(self) -> None:
        """From now on keep each computed position's last hidden state, per handle, until taken."""
        if self.features is None:
            self.features = OrderedDict()

    def take_features(self, handle: KVHandle) -> list[tuple[int, torch.Tensor]]:
        """The (first position, (n, H) hidden states) chunks computed for ``handle`` since the last take."""
        return self.features.pop(handle.hid, []) if self.features is not None else []

    def _keep_features(self, handles: list[KVHandle], rows: list[ForwardRow]) -> None:
        if self.last_hidden is None:
            raise ValueError(f"backend {self.name!r} cannot capture hidden states")
        for handle, row, hidden in zip(handles, rows, self.last_hidden):
            chunks = self.features.setdefault(handle.hid, [])
            chunks.append((len(row.slots) - len(row.new_ids), hidden.clone()))  # not a view of the batch
            self.features.move_to_end(handle.hid)
        kept = sum(c[1].shape[0] for chunks in self.features.values() for c in chunks)
        while kept > FEATURE_ROWS and len(self.features) > 1:  # handles nobody reads (other strategies' requests)
            _, chunks = self.features.popitem(last=False)
            kept -= sum(c[1].shape[0] for c in chunks)
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
