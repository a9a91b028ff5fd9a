"""The engine's lane keeper: every KV handle a sequence uses, opened, forked, rolled back and released here.

Strategies reach it through ``StepContext`` (``decodekit.context``); the engine calls
``release_all`` when a sequence finishes, is aborted or is preempted, so no lane outlives its
sequence's turn in the engine. Together with the scheduler (main handles at admission) and the
backends (``extend`` inside ``forward``) this is the only code that calls the cache manager's
handle verbs (``tests/test_layers.py`` enforces it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from decodekit.context import Lane

if TYPE_CHECKING:
    from decodekit.sequence import Sequence


class LaneKeeper:
    """Lanes of the sequences of one engine whose own model is ``backend``."""

    def __init__(self, backend):
        self.backend = backend

    def fork(self, seq: Sequence, source: Lane | None) -> Lane:
        backend = source.backend if source is not None else self.backend
        handle = source.handle if source is not None else seq.handle
        if handle is None:
            raise ValueError("fork_lane: the source lane is closed")
        return self._add(seq, Lane(backend, backend.cache.fork(handle), mirror=False))

    def open(self, seq: Sequence, ids: list[int], backend, *, mirror: bool) -> Lane:
        backend = backend if backend is not None else self.backend
        return self._add(seq, Lane(backend, backend.cache.open(ids), mirror))

    def truncate(self, seq: Sequence, lane: Lane | None, n: int) -> None:
        handle = seq.handle if lane is None else lane.handle
        if handle is not None and n < len(handle):
            (self.backend if lane is None else lane.backend).cache.truncate(handle, n)

    def commit(self, seq: Sequence, lane: Lane) -> None:
        """Enter a mirror lane's tokens (a prefix of ``seq.ids``) into its model's prefix cache now."""
        if not lane.mirror or len(lane) > len(seq.ids):
            raise ValueError("commit_lane takes a mirror lane holding verified tokens only")
        lane.backend.cache.commit(lane.handle, seq.ids)

    def close(self, seq: Sequence, lane: Lane, commit: list[int] | None) -> None:
        if lane.closed:
            return
        cache = lane.backend.cache
        if commit is not None:
            cache.commit(lane.handle, commit)
        cache.release(lane.handle)
        lane.handle = None
        seq.lanes.remove(lane)

    def uncomputed(self, seq: Sequence, lane: Lane | None, ids: list[int]) -> list[int]:
        handle = seq.handle if lane is None else lane.handle
        if len(handle) >= len(ids):
            self.truncate(seq, lane, len(ids) - 1)
        return ids[len(handle):]

    def forward(self, seq_lanes: list[tuple[Sequence, Lane]], new_ids: list[list[int]], num_logits=1):
        if not seq_lanes:
            return []
        backends = {id(lane.backend): lane.backend for _, lane in seq_lanes}
        if len(backends) != 1:
            raise ValueError("forward_lanes runs lanes of one backend")
        backend = next(iter(backends.values()))
        return backend.forward([lane.handle for _, lane in seq_lanes], new_ids, num_logits)

    def release_all(self, seq: Sequence, commit: bool) -> None:
        """Release every lane of ``seq`` and its main KV; with ``commit`` the verified tokens (the
        main KV's, and what mirror lanes share with them) enter the prefix caches first."""
        for lane in list(seq.lanes):
            if lane.mirror and commit:
                self._commit_verified(lane.backend.cache, lane.handle, seq.ids)
            lane.backend.cache.release(lane.handle)
            lane.handle = None
        seq.lanes = []
        if seq.handle is not None:
            cache = self.backend.cache
            if commit:
                self._commit_verified(cache, seq.handle, seq.ids)
            else:
                cache.truncate(seq.handle, min(len(seq.handle), len(seq.ids)))
            cache.release(seq.handle)
            seq.handle = None

    @staticmethod
    def _commit_verified(cache, handle, ids: list[int]) -> None:
        cache.truncate(handle, min(len(handle), len(ids)))
        cache.commit(handle, ids)

    @staticmethod
    def _add(seq: Sequence, lane: Lane) -> Lane:
        seq.lanes.append(lane)
        return lane
