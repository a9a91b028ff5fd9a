"""Timing a backend's forward directly (no engine): speculation profiles and benchmark micro-timings.

The only code outside the engine that opens KV handles, and only on a backend it owns for the
measurement: each helper releases what it opened before returning (also on error).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

from decodekit.profiles import SpeculationProfile, profile_from


@contextmanager
def prefilled(backend, ids: list[int]) -> Iterator:
    """A KV handle holding ``ids`` computed on ``backend`` (through its prefix cache), released after."""
    handle = backend.cache.open(ids)
    try:
        backend.forward([handle], [ids[len(handle):]])
        yield handle
    finally:
        backend.cache.release(handle)


def time_rows(backend, base, rows: int, new: int) -> float:
    """Seconds of one forward of ``rows`` forks of ``base``, each ``new`` tokens wider (rolled back after)."""
    cache = backend.cache
    forks = [cache.fork(base) for _ in range(rows)]
    try:
        return _timed_forward(backend, forks, [[_token(backend, i)] * new for i in range(rows)], new)
    finally:
        for handle in forks:
            cache.release(handle)


def time_widening(backend, base, rows: int) -> tuple[float, float]:
    """Seconds of a step of ``rows`` forks of ``base`` one token each, then one token wider (2 each),
    after an untimed step of the same rows (the forks' first forward is not what a running batch pays)."""
    cache = backend.cache
    forks = [cache.fork(base) for _ in range(rows)]
    try:
        def step(new: int) -> float:
            seconds = _timed_forward(backend, forks, [[_token(backend, i)] * new for i in range(rows)], new)
            for handle in forks:
                cache.truncate(handle, len(base))
            return seconds

        step(1)
        return step(1), step(2)
    finally:
        for handle in forks:
            cache.release(handle)


def _token(backend, i: int) -> int:
    """The i-th synthetic token of a timed row (any id but 0: the timing does not depend on which)."""
    return (5 + i) % (backend.vocab_size - 1) + 1


def _timed_forward(backend, handles, new_ids: list[list[int]], num_logits: int) -> float:
    start = time.perf_counter()
    backend.forward(handles, new_ids, num_logits=num_logits)
    return time.perf_counter() - start


def _row(backend, handle, new: int) -> float:
    return _timed_forward(backend, [handle], [[_token(backend, i) for i in range(new)]], new)


def after_steps(backend, handle, new: int, run: int = 8, pairs: int = 4) -> tuple[float, float]:
    """Seconds of a plain decoding step (median of the last half of ``run`` 1-token steps on ``handle``)
    and of a ``new``-token row in speculative decoding's rhythm (median over ``pairs`` of a 1-token step
    then a ``new``-token row, each pair rolled back), on the sequence's own lane: no fresh fork."""
    length = len(handle)
    try:
        one = statistics.median([_row(backend, handle, 1) for _ in range(run)][run // 2:])
        backend.cache.truncate(handle, length)
        rows = []
        for _ in range(pairs):
            _row(backend, handle, 1)
            rows.append(_row(backend, handle, new))
            backend.cache.truncate(handle, length)
        return one, statistics.median(rows)
    finally:
        backend.cache.truncate(handle, length)


def measure_profile(backend, *, context: int = 256, reps: int = 5, lengths=(1, 2, 3, 4, 6, 8, 12, 16, 17),
                    batches=(1, 2, 4, 8, 16), progress=None) -> SpeculationProfile:
    """Time verify rows of each length and batched steps one token wider, interleaved, medians.

    Rows run as decoding runs them, on one sequence: the 1-token cost is a step in a run of plain
    decoding steps (on llama.cpp a lone step costs ~1.5x a step in a run: its threads and graph warm
    up over the first few), an m-token row alternates with 1-token steps as verify and plain steps do
    (on llama.cpp alternating shapes costs more than either shape in a run). ``progress``: called with a short
    text after each round (a CLI prints it)."""
    prompt = [(7 * i + 3) % max(backend.vocab_size - 1, 2) + 1 for i in range(context)]
    with prefilled(backend, prompt) as base:
        verify = {m: [] for m in {1, *lengths}}
        width = {b: ([], []) for b in batches}
        for rep in range(reps + 1):  # the first round warms up and is dropped
            for m in lengths:
                one, t = after_steps(backend, base, m)
                if rep:
                    verify[1].append(one)
                    verify[m].append(t)
            for b in batches:
                plain, wide = time_widening(backend, base, b)
                if rep:
                    width[b][0].append(plain)
                    width[b][1].append(wide)
            if progress is not None:
                progress(f"round {rep} of {reps}" + (" (warm-up)" if not rep else ""))
    return profile_from(verify, width, backend)
