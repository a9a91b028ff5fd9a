"""The shared KV-cache manager: pool, radix tree, handles, eviction and integrity."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from decodekit.cache import CacheFullError, CacheManager
from decodekit.cache.pool import SlotPool


def test_pool_refcounts_and_free_list():
    pool = SlotPool(4)
    a = pool.allocate(3)
    assert 0 not in a and pool.num_free == 1
    pool.incref(a[:1])
    assert pool.decref(a) == 2  # a[0] still referenced once
    assert pool.decref(a[:1]) == 1 and pool.num_free == 4
    with pytest.raises(CacheFullError):
        pool.allocate(5)
    with pytest.raises(RuntimeError):
        pool.decref([a[0]])


def test_pool_hands_out_lowest_free_slots_first():
    """Sequences written into a free region get ascending, contiguous slots (read as a view)."""
    pool = SlotPool(16)
    a, b = pool.allocate(4), pool.allocate(3)
    assert a == [1, 2, 3, 4] and b == [5, 6, 7]
    pool.decref(list(reversed(a)))
    assert pool.allocate(2) == [1, 2] and [pool.allocate(1)[0] for _ in range(3)] == [3, 4, 8]


def test_shared_uncached_prefix_defers_only_when_worth_it():
    cache = CacheManager(256)
    shared = list(range(1, 21))
    assert cache.shares_uncached_prefix(shared + [99], [shared + [98]])
    assert not cache.shares_uncached_prefix(shared[:10] + [99], [shared[:10] + [98]])  # < 16 shared tokens
    handle = cache.open(shared + [98])
    cache.extend(handle, len(shared) + 1 - len(handle))
    cache.commit(handle, shared + [98])
    cache.release(handle)
    assert not cache.shares_uncached_prefix(shared + [99], [shared + [97]])  # the shared part is cached already


def test_prefix_reuse_leaves_last_token_to_compute():
    cache = CacheManager(64)
    h = cache.open([1, 2, 3, 4])
    assert len(h) == 0
    cache.extend(h, 4)
    cache.commit(h, [1, 2, 3, 4])
    again = cache.open([1, 2, 3, 4])
    assert len(again) == 3 and again.slots == h.slots[:3]  # logits of the last token are recomputed
    longer = cache.open([1, 2, 3, 4, 5, 6])
    assert longer.slots == h.slots
    other = cache.open([1, 2, 9, 9])
    assert other.slots == h.slots[:2]  # the match splits the cached node
    for x in (h, again, longer, other):
        cache.release(x)
    cache.check_integrity()
    assert cache.stats.hit_tokens == 3 + 4 + 2


def test_fork_shares_slots_and_truncate_rolls_back():
    cache = CacheManager(64)
    h = cache.open([5, 6, 7])
    cache.extend(h, 3)
    child = cache.fork(h)
    assert child.slots == h.slots and cache.pool.refcount(h.slots[0]) == 2
    new = cache.extend(child, 2)
    cache.truncate(child, 3)
    assert child.slots == h.slots and all(cache.pool.refcount(s) == 0 for s in new)
    cache.check_integrity()
    cache.release(child)
    cache.release(h)
    assert cache.pool.num_free == 64
    cache.check_integrity()


def test_commit_deduplicates_against_cached_slots():
    cache = CacheManager(64)
    a, b = cache.open([1, 2, 3]), cache.open([1, 2, 3])
    cache.extend(a, 3)
    cache.extend(b, 3)
    cache.commit(a, [1, 2, 3])
    cache.commit(b, [1, 2, 3])
    assert a.slots == b.slots  # b dropped its duplicate K/V for the cached copy
    cache.release(a)
    cache.release(b)
    cache.check_integrity()
    assert cache.pool.num_used == 3 and cache.tree.num_cached_tokens == 3


def test_lru_eviction_skips_locked_nodes_and_full_budget_errors():
    cache = CacheManager(8)
    old = cache.open([1, 1, 1])
    cache.extend(old, 3)
    cache.commit(old, [1, 1, 1])
    cache.release(old)
    live = cache.open([2, 2, 2])
    cache.extend(live, 3)
    cache.commit(live, [2, 2, 2])  # still open: locked
    new = cache.open([3, 3, 3, 3, 3])
    cache.extend(new, 5)  # needs 3 more than free: evicts the unlocked [1,1,1] only
    assert cache.stats.evicted_tokens == 3
    assert cache.tree.match_prefix([2, 2, 2])[0] == live.slots
    with pytest.raises(CacheFullError, match="budget"):
        cache.extend(new, 1)
    for h in (live, new):
        cache.release(h)
    cache.check_integrity()


def test_available_counts_only_slots_eviction_can_free():
    """Found by the state machine: a fork keeps the slots of a prefix its origin committed and
    released, so that unlocked node's tokens cannot be had by eviction and must not count."""
    cache = CacheManager(12)
    origin = cache.open([5, 5, 5, 5])
    cache.extend(origin, 4)
    sibling = cache.fork(origin)
    cache.commit(origin, [5, 5, 5, 5])
    cache.release(origin)  # the node is unlocked, but the sibling still holds its 4 slots
    filler = cache.open([6] * 8)
    cache.extend(filler, 8)
    assert cache.pool.num_free == 0 and cache.available() == 0
    with pytest.raises(CacheFullError):
        cache.extend(filler, 1)
    for h in (sibling, filler):
        cache.release(h)
    cache.check_integrity()
    assert cache.available() == 12


def test_naive_prefix_cache_reuses_nothing():
    cache = CacheManager(16, prefix_cache=False)
    h = cache.open([1, 2, 3])
    cache.extend(h, 3)
    cache.commit(h, [1, 2, 3])
    cache.release(h)
    assert cache.pool.num_free == 16 and len(cache.open([1, 2, 3, 4])) == 0


class CacheMachine(RuleBasedStateMachine):
    """Random insert / fork / truncate / release / evict with ``check_integrity()`` after each."""

    def __init__(self):
        super().__init__()
        self.cache = CacheManager(48)
        self.live = []  # (handle, token ids of its slots)
        self.content = {}  # slot -> the token id whose K/V it holds

    def _fill(self, h, ids, new_slots):
        for s, t in zip(new_slots, ids[len(ids) - len(new_slots):]):
            self.content[s] = t

    @rule(ids=st.lists(st.integers(0, 3), min_size=1, max_size=10))
    def open_and_fill(self, ids):
        if self.cache.available() < len(ids):
            return
        h = self.cache.open(ids)
        self._fill(h, ids, self.cache.extend(h, len(ids) - len(h)))
        self.live.append((h, list(ids)))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def fork(self, i):
        h, ids = self.live[i % len(self.live)]
        self.live.append((self.cache.fork(h), list(ids)))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), extra=st.lists(st.integers(0, 3), min_size=1, max_size=4))
    def extend(self, i, extra):
        h, ids = self.live[i % len(self.live)]
        if self.cache.pool.num_free + self.cache.tree.evictable_tokens() >= len(extra):
            new = self.cache.extend(h, len(extra))
            ids.extend(extra)
            self._fill(h, ids, new)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), n=st.integers(0, 10))
    def truncate(self, i, n):
        h, ids = self.live[i % len(self.live)]
        n = min(n, len(h))
        self.cache.truncate(h, n)
        del ids[n:]

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def commit(self, i):
        h, ids = self.live[i % len(self.live)]
        self.cache.commit(h, ids)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def release(self, i):
        h, _ = self.live.pop(i % len(self.live))
        self.cache.release(h)

    @rule(n=st.integers(1, 20))
    def evict(self, n):
        self.cache.tree.evict(n)

    @invariant()
    def integrity(self):
        self.cache.check_integrity()
        for h, ids in self.live:
            assert len(h) == len(ids)
            assert [self.content[s] for s in h.slots] == ids  # each slot holds its token's K/V
        for node in self.cache.tree._nodes():
            assert [self.content[s] for s in node.slots] == node.key

    def teardown(self):
        for h, _ in self.live:
            self.cache.release(h)
        self.cache.check_integrity()
        assert self.cache.pool.num_free + self.cache.tree.num_cached_tokens == 48


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_storage_hooks_follow_the_logical_verbs():
    """A backend that places its own cells (llama.cpp sequences) hears of every fork, truncation and release."""
    from decodekit.cache import KVStorage

    class Recording(KVStorage):
        def __init__(self):
            self.log = []

        def forked(self, source, handle):
            self.log.append(("fork", source.hid, handle.hid))

        def truncated(self, handle, n):
            self.log.append(("truncate", handle.hid, n))

        def released(self, handle):
            self.log.append(("release", handle.hid))

    storage = Recording()
    cache = CacheManager(32, storage=storage)
    a = cache.open([1, 2, 3])
    cache.extend(a, 3)
    b = cache.fork(a)
    cache.truncate(b, 1)
    cache.truncate(b, 5)  # nothing to drop: no call
    cache.release(b)
    cache.release(a)
    assert storage.log == [("fork", a.hid, b.hid), ("truncate", b.hid, 1), ("release", b.hid), ("release", a.hid)]
    cache.check_integrity()
