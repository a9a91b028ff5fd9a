"""Slot pool: token slots of one model namespace, with reference counts and a free list.

Slot 0 is a scratch slot that is never handed out: padded positions of a ragged batch write
there and masked positions read from it. The K/V tensors themselves belong to the backend,
sized by ``capacity``; the pool only decides which slot holds which token.
"""

from __future__ import annotations

import heapq


class CacheFullError(ValueError):
    """A request needs more KV slots than the budget can give, even after eviction."""


class SlotPool:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 token, got {capacity}")
        self.capacity = capacity
        self._refs = [0] * (capacity + 1)
        # A min-heap: the lowest free ids go out first, so a sequence written into a free region
        # gets ascending, contiguous slots and the backend can read its K/V as a view, not a gather.
        self._free = list(range(1, capacity + 1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Hand out ``n`` slots with reference count 1. Raises ``CacheFullError`` if short."""
        if n > len(self._free):
            raise CacheFullError(f"KV cache needs {n} free slots, has {len(self._free)} of {self.capacity}")
        slots = [heapq.heappop(self._free) for _ in range(n)]
        for s in slots:
            self._refs[s] = 1
        return slots

    def incref(self, slots: list[int]) -> None:
        for s in slots:
            if self._refs[s] <= 0:
                raise RuntimeError(f"incref of free slot {s}")
            self._refs[s] += 1

    def decref(self, slots: list[int]) -> int:
        """Drop one reference from each slot; slots that reach zero return to the free list."""
        freed = 0
        for s in slots:
            if self._refs[s] <= 0:
                raise RuntimeError(f"decref of free slot {s}")
            self._refs[s] -= 1
            if self._refs[s] == 0:
                heapq.heappush(self._free, s)
                freed += 1
        return freed

    def refcount(self, slot: int) -> int:
        return self._refs[slot]

    def check_integrity(self, expected_refs: dict[int, int]) -> None:
        """Every slot's count equals the references the caller knows of; free slots have none."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("free list holds a slot twice")
        if 0 in free or self._refs[0] != 0:
            raise AssertionError("scratch slot 0 was handed out")
        for s in range(1, self.capacity + 1):
            want = expected_refs.get(s, 0)
            if self._refs[s] != want:
                raise AssertionError(f"slot {s}: refcount {self._refs[s]}, expected {want}")
            if (want == 0) != (s in free):
                raise AssertionError(f"slot {s}: free-list membership disagrees with refcount {want}")
