"""Timing a backend's forward directly (no engine): speculation profiles and benchmark micro-timings.

The only code outside the engine that opens KV handles, and only on a backend it owns for the
measurement: each helper releases what it opened before returning (also on error).
"""

from __future__ import annotations

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
        start = time.perf_counter()
        backend.forward(forks, [[(5 + i) % (backend.vocab_size - 1) + 1] * new for i in range(rows)], num_logits=new)
        return time.perf_counter() - start
    finally:
        for handle in forks:
            cache.release(handle)


def measure_profile(backend, *, context: int = 256, reps: int = 5, lengths=(1, 2, 3, 4, 6, 8, 12, 16, 17),
                    batches=(1, 2, 4, 8, 16), progress=None) -> SpeculationProfile:
    """Time verify rows of each length and batched steps one token wider, interleaved, medians.

    ``progress``: called with a short text after each round (a CLI prints it)."""
    prompt = [(7 * i + 3) % max(backend.vocab_size - 1, 2) + 1 for i in range(context)]
    with prefilled(backend, prompt) as base:
        verify = {m: [] for m in lengths}
        width = {b: ([], []) for b in batches}
        for rep in range(reps + 1):  # the first round warms up and is dropped
            for m in lengths:
                t = time_rows(backend, base, 1, m)
                if rep:
                    verify[m].append(t)
            for b in batches:
                plain, wide = time_rows(backend, base, b, 1), time_rows(backend, base, b, 2)
                if rep:
                    width[b][0].append(plain)
                    width[b][1].append(wide)
            if progress is not None:
                progress(f"round {rep} of {reps}" + (" (warm-up)" if not rep else ""))
    return profile_from(verify, width, backend)
