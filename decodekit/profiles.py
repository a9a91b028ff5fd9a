"""Speculation profiles: the economics of drafting on one model and device, in one object.

Speculative decoding chooses draft lengths from what a verify row costs (a forward over m new tokens
against a 1-token step), what widening a batched step costs, how often each drafter's tokens are
accepted a priori, and how long a lookup draft may run after a short match. Those numbers depend on
the model and the device, so they live here, not in the algorithms:

- ``CPU_PROFILE``: measured on a 2-core CPU with SmolLM2-135M float32 (the project's machine); the
  default for CPU backends.
- ``CUDA_PROFILE``: near-flat costs (a forward this small is launch-bound on a GPU); the default for CUDA.
- ``decodekit profile --model NAME``: measures the two cost tables for the user's model and device and
  saves them to ``profile_path(model, device)`` (``~/.cache/decodekit/profiles/``, or
  ``$DECODEKIT_PROFILES``), where ``Speculative`` finds them. A saved profile, never a per-run
  measurement, decides draft lengths, so seeded outputs stay reproducible.

The acceptance priors are only where the per-sequence calibration starts (it rescales a drafter's
confidences by its observed hit rate), so a profile keeps the measured defaults unless given others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

VERIFY_LENGTHS = 17  # verify-cost entries: rows of 1..17 new tokens (16 drafts + the bonus position)
WIDTH_BATCHES = 32  # width-cost entries: batches of 1..32 rows


def interpolate(points: dict[int, float], size: int) -> tuple[float, ...]:
    """Values at 1..size from measured ``points`` (linear between them, flat past the ends)."""
    keys = sorted(points)
    out = []
    for b in range(1, size + 1):
        lo = max((k for k in keys if k <= b), default=keys[0])
        hi = min((k for k in keys if k >= b), default=lo)
        t = 0.0 if hi == lo else (b - lo) / (hi - lo)
        out.append(round(points[lo] + t * (points[hi] - points[lo]), 4))
    return tuple(out)


@dataclass(frozen=True)
class SpeculationProfile:
    """The numbers speculation decides with, for one model on one device.

    ``verify_cost[m - 1]``: a forward over m new tokens against a 1-token one (non-decreasing, from 1.0).
    ``width_cost[b - 1]``: widening a batched step of b rows by one token position, against the plain step.
    ``ngram_acceptance[n]``: prior acceptance of the i-th lookup draft (i = 0..3, then 4+) after an
    n-token match (n = 1, 2, 3 or longer). ``match_caps[n - 1]``: lookup drafts at most after an
    n-token match. ``lookup_sure``: a lookup draft this likely is not second-guessed by a model
    drafter. ``row_cost``: what one more drafted token must beat besides its own cost (about one
    more verify row's share). ``source``: where the numbers come from.
    """

    verify_cost: tuple[float, ...]
    width_cost: tuple[float, ...]
    ngram_acceptance: dict = field(default_factory=lambda: dict(NGRAM_ACCEPTANCE), hash=False)
    match_caps: tuple[int, ...] = (1, 3)
    lookup_sure: float = 0.7
    row_cost: float = 0.05
    source: str = "default"

    def __post_init__(self):
        costs = self.verify_cost
        if not costs or costs[0] != 1.0 or any(b < a for a, b in zip(costs, costs[1:])):
            raise ValueError(f"verify_cost must be non-decreasing from 1.0, got {costs!r}")
        if not self.width_cost or any(not c >= 0 for c in self.width_cost):
            raise ValueError(f"width_cost must be numbers >= 0, got {self.width_cost!r}")
        if sorted(self.ngram_acceptance) != [1, 2, 3]:
            raise ValueError("ngram_acceptance needs rates after 1-, 2- and 3-token matches")

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["ngram_acceptance"] = {str(k): list(v) for k, v in self.ngram_acceptance.items()}
        return out

    @classmethod
    def from_json(cls, data: dict, source: str) -> SpeculationProfile:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"profile {source}: unknown fields {unknown}")
        data = dict(data)
        if "ngram_acceptance" in data:
            data["ngram_acceptance"] = {int(k): tuple(v) for k, v in data["ngram_acceptance"].items()}
        for name in ("verify_cost", "width_cost", "match_caps"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**{**data, "source": source})

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path


# How often the i-th lookup draft is accepted given the earlier ones were: SmolLM2-135M greedy answers
# to 39 held-out Spec-Bench prompts (3 per category), 2,300 positions.
NGRAM_ACCEPTANCE = {1: (0.2, 0.5, 0.6, 0.6, 0.8), 2: (0.45, 0.65, 0.6, 0.7, 0.8), 3: (0.7, 0.75, 0.8, 0.85, 0.9)}

# CPU: SmolLM2-135M float32 with packed linears, 1 thread, ~300-token context, medians of two interleaved
# runs (m = 1..8, 10, 12, 16; the rest interpolated). Width: a batch of 4 one-token rows took 85 ms,
# 100 ms with one row verifying 1 draft and 99 ms with all four doing so, 112 ms with 2 drafts; a batch
# of 16 ~170 ms, +40-65% with 2 drafts: drafts of other rows ride almost free once a step is wide.
CPU_PROFILE = SpeculationProfile(
    verify_cost=(1.0, 1.05, 1.12, 1.25, 1.32, 1.37, 1.41, 1.45, 1.55, 1.65, 1.7, 1.75, 1.8, 1.85, 1.9, 1.95, 2.0),
    width_cost=interpolate({1: 0.05, 2: 0.1, 4: 0.15, 8: 0.22, 16: 0.3, 32: 0.4}, WIDTH_BATCHES),
    source="default: CPU (SmolLM2-135M, 2 cores)")
# llama.cpp on CPU (SmolLM2-135M Q4_1, 2 threads): forward times of the engine's own steps on Spec-Bench
# prompts (n-gram drafts of fixed lengths 1, 3, 7, 15; 2026-12-07): an m-token verify row costs 1.77, 3.1,
# 5.6 and 10.5 plain decoding steps for m = 2, 4, 8, 16. A step here is compute-bound (the 85 MB model sits
# in this CPU's 480 MB L3, so extra rows cost their arithmetic, not a second pass over the weights), and
# steps that alternate shapes lose llama.cpp's warm graph and threads. So a draft pays only when it is
# accepted more than ~77% of the time: long lookup matches. A batch of b one-token rows costs about
# 1 + 0.46 (b - 1) single steps (104 tokens/s at 1 row, ~200 at 8): widening a step of b rows by one
# position (b more tokens) adds 0.46 b / (1 + 0.46 (b - 1)) of it. `decodekit profile --backend llamacpp`
# measures a machine's own (its synthetic rows come out ~20% cheaper than these engine steps).
LLAMACPP_CPU_PROFILE = SpeculationProfile(
    verify_cost=interpolate({1: 1.0, 2: 1.77, 4: 3.1, 8: 5.6, 16: 10.5}, VERIFY_LENGTHS),
    width_cost=interpolate({b: round(0.46 * b / (1 + 0.46 * (b - 1)), 4) for b in (1, 2, 4, 8, 16, 32)},
                           WIDTH_BATCHES),
    source="default: llama.cpp CPU (SmolLM2-135M Q4_1, 2 threads, engine steps)")
CUDA_PROFILE = SpeculationProfile(verify_cost=tuple(1.0 + 0.01 * m for m in range(VERIFY_LENGTHS)),
                                  width_cost=(0.01,) * WIDTH_BATCHES, source="default: CUDA (launch-bound)")


def device_of(backend) -> str:
    device = getattr(backend, "device", None)
    return str(getattr(device, "type", device) or "cpu")


def profile_dir() -> Path:
    return Path(os.environ.get("DECODEKIT_PROFILES", Path.home() / ".cache" / "decodekit" / "profiles"))


def profile_path(model: str, device: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{model}@{device}")
    return profile_dir() / f"{safe}.json"


def profile_for(backend) -> SpeculationProfile:
    """The saved profile of ``backend``'s model and device, else the device's default."""
    device = device_of(backend)
    path = profile_path(getattr(backend, "name", "model"), device)
    if path.exists():
        return SpeculationProfile.from_json(json.loads(path.read_text()), str(path))
    own = getattr(backend, "default_profile", None)  # a backend whose costs differ from the torch path's
    if own is not None:
        return own
    return CUDA_PROFILE if device == "cuda" else CPU_PROFILE


def load_profile(spec) -> SpeculationProfile:
    """A profile from a ``SpeculationProfile`` or the path of a saved one."""
    if isinstance(spec, SpeculationProfile):
        return spec
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"no speculation profile at {path}")
    return SpeculationProfile.from_json(json.loads(path.read_text()), str(path))


# ---- measuring (``backends.timing.measure_profile`` times the rows) ---------------------------------
def profile_from(verify: dict, width: dict, backend) -> SpeculationProfile:
    one = statistics.median(verify[min(verify)])
    points, running = {}, 1.0
    for m in sorted(verify):
        running = max(running, round(statistics.median(verify[m]) / one, 4))  # non-decreasing by definition
        points[m] = running
    points[1] = 1.0
    widths = {b: max(0.0, round(statistics.median(wide) / statistics.median(plain) - 1.0, 4))
              for b, (plain, wide) in width.items()}
    return SpeculationProfile(verify_cost=interpolate(points, VERIFY_LENGTHS),
                              width_cost=interpolate(widths, WIDTH_BATCHES),
                              source=f"measured: {getattr(backend, 'name', 'model')} on {device_of(backend)}, "
                                     f"{time.strftime('%Y-%m-%d %H:%M')}")
