"""The prefix-cache interface and a do-nothing stand-in for when prefix reuse is off; the physical-KV
hooks a backend that places its own cells implements, and the do-nothing slot-pool stand-in."""

from __future__ import annotations

from abc import ABC, abstractmethod


class PrefixCache(ABC):
    """Maps token-id prefixes to KV slots. Contracts:

    - ``match_prefix`` never frees or allocates a slot;
    - ``insert`` takes its own pool reference on each slot it adopts;
    - ``evict`` never touches a locked node.
    """

    num_cached_tokens: int

    @abstractmethod
    def match_prefix(self, ids: list[int]): ...

    @abstractmethod
    def insert(self, ids: list[int], slots: list[int]): ...

    @abstractmethod
    def lock(self, node) -> None: ...

    @abstractmethod
    def unlock(self, node) -> None: ...

    @abstractmethod
    def evictable_tokens(self) -> int: ...

    @abstractmethod
    def evict(self, num_tokens: int) -> int: ...

    @abstractmethod
    def slot_refs(self) -> dict[int, int]: ...

    @abstractmethod
    def check_integrity(self) -> None: ...


class NaivePrefixCache(PrefixCache):
    """Caches nothing: every request computes its whole prompt."""

    num_cached_tokens = 0

    def match_prefix(self, ids):
        return [], None

    def insert(self, ids, slots):
        return None

    def lock(self, node):
        pass

    def unlock(self, node):
        pass

    def evictable_tokens(self):
        return 0

    def evict(self, num_tokens):
        return 0

    def slot_refs(self):
        return {}

    def check_integrity(self):
        pass


class KVStorage:
    """What the cache manager tells a backend's physical KV about its handles' logical verbs.

    The transformers and mock backends store K/V by slot (the manager's pool is the storage), so
    these do nothing (this base class). A backend that places its own cells (llama.cpp: a handle is a
    llama.cpp sequence) maps them: ``forked`` = copy a sequence's cells into another sequence (shared,
    no copy in a unified KV cache), ``opened`` / ``committed`` / ``evicted`` = keep the prefix cache's
cells alive in sequences of their own, ``truncated`` = remove a sequence's cells from a position on,
    ``released`` = remove the sequence. Each is called after the manager updated its own bookkeeping.
    """

    def opened(self, handle) -> None:
        """``handle`` is new and holds a prefix-cache match (its slots, possibly none)."""

    def forked(self, source, handle) -> None:
        """``handle`` now shares every computed token of ``source``."""

    def truncated(self, handle, n: int) -> None:
        """``handle`` keeps its first ``n`` tokens."""

    def released(self, handle) -> None:
        """``handle`` is closed; its cells may go."""

    def committed(self, handle, start: int, switched: list[int]) -> None:
        """The prefix cache adopted ``handle``'s positions ``[start, len(handle))`` (their slots are now
        also the cache's); at the positions in ``switched`` the handle now uses the cache's own slots
        for tokens it had computed a second time."""

    def evicted(self, slots: list[int], start: int) -> None:
        """The prefix cache drops ``slots``, positions ``start...`` of their path (handles may still hold them)."""
