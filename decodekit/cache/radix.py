"""Radix tree over token ids mapping cached prefixes to KV slots (SGLang's RadixAttention idea).

The tree holds one pool reference on every slot it stores. Nodes on the path of a running
sequence are locked (``lock_ref > 0``) and never evicted; unlocked leaves are evicted LRU.
"""

from __future__ import annotations

import heapq
import itertools

from decodekit.cache.base import PrefixCache
from decodekit.cache.pool import SlotPool


class RadixNode:
    __slots__ = ("children", "parent", "key", "slots", "lock_ref", "last_access")

    def __init__(self, parent: RadixNode | None = None, key=(), slots=()):
        self.children: dict[int, RadixNode] = {}
        self.parent = parent
        self.key: list[int] = list(key)
        self.slots: list[int] = list(slots)
        self.lock_ref = 0
        self.last_access = 0


class RadixTree(PrefixCache):
    def __init__(self, pool: SlotPool):
        self.pool = pool
        self.root = RadixNode()
        self.root.lock_ref = 1  # the root is never evicted
        self._clock = itertools.count(1)
        self.num_cached_tokens = 0
        self.on_evict = None  # called with (slots, first position) before a leaf's slots are dropped

    def match_prefix(self, ids: list[int]) -> tuple[list[int], RadixNode]:
        """Longest cached prefix of ``ids``: its slots and the node where it ends.

        A match that ends inside a node splits that node, so the returned node covers it exactly.
        """
        node, slots, i = self.root, [], 0
        now = next(self._clock)
        node.last_access = now
        while i < len(ids) and ids[i] in node.children:
            child = node.children[ids[i]]
            n = common_prefix_len(child.key, ids[i:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            slots.extend(child.slots)
            i += n
            node = child
        return slots, node

    def insert(self, ids: list[int], slots: list[int]) -> RadixNode:
        """Cache ``ids`` -> ``slots``; tokens already cached keep their old slots.

        The tree takes its own reference on each slot it adopts. Returns the node of the last token.
        """
        if len(ids) != len(slots):
            raise ValueError("insert needs one slot per token id")
        matched, node = self.match_prefix(ids)
        rest = len(matched)
        if rest < len(ids):
            child = RadixNode(node, ids[rest:], slots[rest:])
            child.last_access = next(self._clock)
            node.children[ids[rest]] = child
            self.pool.incref(child.slots)
            self.num_cached_tokens += len(child.key)
            node = child
        return node

    def lock(self, node: RadixNode) -> None:
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        while node is not None:
            if node.lock_ref <= 0:
                raise RuntimeError("unlock of an unlocked radix node")
            node.lock_ref -= 1
            node = node.parent

    def evictable_tokens(self) -> int:
        """Slots eviction can free: those of unlocked nodes that no handle also holds (a forked
        sibling can keep a committed prefix's slots after its own handle released the node)."""
        refcount = self.pool.refcount
        return sum(1 for n in self._nodes() if n.lock_ref == 0 for s in n.slots if refcount(s) == 1)

    def evict(self, num_tokens: int) -> int:
        """Drop unlocked leaves, least recently used first, until ``num_tokens`` slots are freed."""
        heap = [(n.last_access, id(n), n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_tokens:
            _, _, leaf = heapq.heappop(heap)
            if self.on_evict is not None:
                self.on_evict(leaf.slots, path_len(leaf.parent))
            freed += self.pool.decref(leaf.slots)
            self.num_cached_tokens -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def slot_refs(self) -> dict[int, int]:
        refs: dict[int, int] = {}
        for n in self._nodes():
            for s in n.slots:
                refs[s] = refs.get(s, 0) + 1
        return refs

    def check_integrity(self) -> None:
        total = 0
        for node in self._nodes():
            if node is not self.root and (not node.key or len(node.key) != len(node.slots)):
                raise AssertionError("radix node with empty key or key/slot length mismatch")
            child_locks = 0
            for first, child in node.children.items():
                if child.parent is not node or child.key[0] != first:
                    raise AssertionError("radix child indexed under the wrong token or parent")
                child_locks += child.lock_ref
            if node.lock_ref < child_locks:
                raise AssertionError("radix node locked less than its children")
            total += len(node.key)
        if total != self.num_cached_tokens:
            raise AssertionError(f"cached token count {self.num_cached_tokens} != {total}")

    def _split(self, child: RadixNode, n: int) -> RadixNode:
        """Split ``child`` after ``n`` tokens; returns the new upper node."""
        upper = RadixNode(child.parent, child.key[:n], child.slots[:n])
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        child.parent.children[child.key[0]] = upper
        child.key, child.slots = child.key[n:], child.slots[n:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


def path_len(node: RadixNode | None) -> int:
    """Tokens on the path from the root down to and including ``node``."""
    n = 0
    while node is not None:
        n += len(node.key)
        node = node.parent
    return n


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Number of leading token ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
