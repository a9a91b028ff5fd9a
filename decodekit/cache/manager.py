"""The shared KV-cache manager of one model namespace: slot pool + prefix cache + handles.

A ``KVHandle`` is one sequence's view of the cache: ``slots[i]`` holds the K/V of its token i.
Handles share slots by reference count (fork without copying); only tokens passed to
``commit`` (verified tokens) enter the shared prefix cache.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from decodekit.cache.base import KVStorage, NaivePrefixCache
from decodekit.cache.pool import CacheFullError, SlotPool
from decodekit.cache.radix import RadixTree, common_prefix_len, path_len

SHARED_PREFIX_DEFER = 16  # see CacheManager.shares_uncached_prefix


class KVHandle:
    __slots__ = ("hid", "slots", "node")

    def __init__(self, hid: int, slots: list[int], node):
        self.hid = hid
        self.slots = slots
        self.node = node

    def __len__(self) -> int:
        return len(self.slots)


@dataclass
class CacheStats:
    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    evicted_tokens: int = 0
    committed_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


class CacheManager:
    def __init__(self, capacity: int, prefix_cache: bool = True, storage: KVStorage | None = None):
        self.storage = storage or KVStorage()  # the backend's physical KV (slot-pool backends: nothing to do)
        self.pool = SlotPool(capacity)
        self.tree = RadixTree(self.pool) if prefix_cache else NaivePrefixCache()
        if isinstance(self.tree, RadixTree):
            self.tree.on_evict = self.storage.evicted
        self.stats = CacheStats()
        self._handles: dict[int, KVHandle] = {}
        self._ids = itertools.count()

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    def available(self) -> int:
        """Slots that can be had now: free ones plus those held only by unlocked cache nodes."""
        return self.pool.num_free + self.tree.evictable_tokens()

    def open(self, ids: list[int]) -> KVHandle:
        """A handle holding the longest cached prefix of ``ids``, leaving at least one token to compute.

        The last token is always recomputed so its logits exist (a full hit still needs them).
        """
        slots, node = self.tree.match_prefix(list(ids[: max(len(ids) - 1, 0)]))
        self.tree.lock(node)
        self.pool.incref(slots)
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(ids)
        self.stats.hit_tokens += len(slots)
        handle = self._new_handle(list(slots), node)
        self.storage.opened(handle)
        return handle

    def shares_uncached_prefix(self, ids: list[int], others: list[list[int]]) -> bool:
        """Whether ``ids`` shares at least ``SHARED_PREFIX_DEFER`` tokens, not all in the cache yet,
        with one of ``others`` (prompts computed in the same forward): prefilled a round later, it
        reuses their K/V instead of computing the shared part twice."""
        cached = len(self.tree.match_prefix(ids)[0])
        least = max(SHARED_PREFIX_DEFER, cached + 1)
        return any(common_prefix_len(ids, other) >= least for other in others)

    def fork(self, handle: KVHandle) -> KVHandle:
        """A second handle sharing every slot of ``handle`` (no copy)."""
        self.pool.incref(handle.slots)
        self.tree.lock(handle.node)
        fork = self._new_handle(list(handle.slots), handle.node)
        self.storage.forked(handle, fork)
        return fork

    def extend(self, handle: KVHandle, n: int) -> list[int]:
        """Allocate ``n`` new slots at the end of ``handle``, evicting cold prefixes if needed."""
        self.ensure_free(n)
        new = self.pool.allocate(n)
        handle.slots.extend(new)
        return new

    def ensure_free(self, n: int) -> None:
        short = n - self.pool.num_free
        if short > 0:
            self.stats.evicted_tokens += self.tree.evict(short)
        if n > self.pool.num_free:
            raise CacheFullError(
                f"KV cache budget exhausted: need {n} slots, {self.pool.num_free} free of "
                f"{self.capacity} (raise cache_tokens or lower batch size / max_new_tokens)"
            )

    def truncate(self, handle: KVHandle, n: int) -> None:
        """Roll ``handle`` back to its first ``n`` tokens; dropped slots lose this reference."""
        if n < len(handle.slots):
            self.pool.decref(handle.slots[n:])
            del handle.slots[n:]
            self.storage.truncated(handle, n)
        node = handle.node
        while node is not None and path_len(node) > n:
            node = node.parent
        if node is not handle.node:
            self.tree.lock(node)
            self.tree.unlock(handle.node)
            handle.node = node

    def commit(self, handle: KVHandle, ids: list[int]) -> None:
        """Enter ``handle``'s computed tokens (``ids[:len(handle)]``, verified only) into the prefix cache.

        Where the cache already held those tokens in other slots, the handle switches to them and
        frees its duplicates.
        """
        k = len(handle.slots)
        if len(ids) < k:
            raise ValueError("commit needs the token ids of every computed slot")
        before = self.tree.num_cached_tokens
        node = self.tree.insert(list(ids[:k]), handle.slots)
        if node is None:
            return
        adopted = self.tree.num_cached_tokens - before  # the last `adopted` positions are new to the cache
        cached, node = self.tree.match_prefix(list(ids[:k]))
        dupes = [i for i in range(k) if cached[i] != handle.slots[i]]
        if dupes:
            self.pool.incref([cached[i] for i in dupes])
            self.pool.decref([handle.slots[i] for i in dupes])
            handle.slots[:] = cached
        self.storage.committed(handle, k - adopted, dupes)
        self.tree.lock(node)
        self.tree.unlock(handle.node)
        handle.node = node
        self.stats.committed_tokens += k

    def release(self, handle: KVHandle) -> None:
        if self._handles.pop(handle.hid, None) is None:
            raise RuntimeError("release of a handle that is not open")
        self.pool.decref(handle.slots)
        self.tree.unlock(handle.node)
        handle.slots = []
        self.storage.released(handle)

    def drop_prefix_cache(self) -> int:
        """Evict every cached prefix (the model's weights changed: its K/V no longer holds); returns the
        slots freed. Only with no handle open: an open handle's K/V would be stale too."""
        if self._handles:
            raise RuntimeError(f"cannot drop the prefix cache while {len(self._handles)} KV handle(s) are open: "
                               "finish or abort the running requests first")
        freed = self.tree.evict(self.pool.capacity)
        self.stats.evicted_tokens += freed
        return freed

    @property
    def num_open_handles(self) -> int:
        return len(self._handles)

    def check_integrity(self) -> None:
        refs = self.tree.slot_refs()
        for h in self._handles.values():
            for s in h.slots:
                refs[s] = refs.get(s, 0) + 1
        self.pool.check_integrity(refs)
        self.tree.check_integrity()
        if isinstance(self.tree, RadixTree):
            self._check_locks()

    def _check_locks(self) -> None:
        want: dict[int, int] = {id(self.tree.root): 1}
        for h in self._handles.values():
            node = h.node
            while node is not None:
                want[id(node)] = want.get(id(node), 0) + 1
                node = node.parent
        for node in self.tree._nodes():
            if node.lock_ref != want.get(id(node), 0):
                raise AssertionError(f"radix node lock_ref {node.lock_ref} != {want.get(id(node), 0)} holders")

    def _new_handle(self, slots: list[int], node) -> KVHandle:
        handle = KVHandle(next(self._ids), slots, node)
        self._handles[handle.hid] = handle
        return handle


__all__ = ["CacheFullError", "CacheManager", "CacheStats", "KVHandle"]
