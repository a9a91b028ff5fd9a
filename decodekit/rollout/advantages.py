"""Advantages from per-trajectory rewards: TreePO's tree-based estimate and the plain group (GRPO) one.

Pure functions on plain lists. A trajectory's tree path is the sequence of node ids from the root
to its leaf; trajectories that share ``path[:k]`` share the same first ``k - 1`` segments.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

NORMALIZE = ("global", "group", None)


def grpo_advantages(rewards: Sequence[float], *, normalize: bool = True, eps: float = 1e-6) -> list[float]:
    """GRPO: ``r_i - mean(r)`` over the prompt's group, divided by ``std(r) + eps`` when ``normalize``."""
    r = _check_rewards(rewards)
    mean, std = _mean_std(r)
    scale = (std + eps) if normalize else 1.0
    return [(x - mean) / scale for x in r]


def tree_advantages(paths: Sequence[Sequence[Hashable]], rewards: Sequence[float], *,
                    normalize: str | None = "global", eps: float = 1e-6) -> list[float]:
    """TreePO's tree-based advantage: group baselines at each depth of the shared path, averaged.

    For trajectory i and each prefix ``path_i[:k]`` (k = 1 is the root, i.e. all trajectories of the
    prompt) the group is every trajectory whose path starts with that prefix; groups of one carry no
    baseline and are skipped. Per group the term is ``r_i - mean(group)`` (``normalize="group"``:
    divided by ``std(group) + eps``); the advantage is the mean over the trajectory's groups
    (``normalize="global"``: then divided by ``std(all rewards) + eps``; ``None``: left as is).
    A trajectory alone in every group (one trajectory in all) gets 0.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    r = _check_rewards(rewards)
    if len(paths) != len(r):
        raise ValueError(f"paths and rewards differ in length: {len(paths)} vs {len(r)}")
    groups: dict[tuple, list[int]] = {}
    for i, path in enumerate(paths):
        if not path:
            raise ValueError(f"paths[{i}] is empty: a path starts at the root node")
        for k in range(1, len(path) + 1):
            groups.setdefault(tuple(path[:k]), []).append(i)
    stats = {key: _mean_std([r[j] for j in members]) for key, members in groups.items() if len(members) > 1}
    out = []
    for i, path in enumerate(paths):
        terms = []
        for k in range(1, len(path) + 1):
            key = tuple(path[:k])
            if key in stats:
                mean, std = stats[key]
                terms.append((r[i] - mean) / (std + eps if normalize == "group" else 1.0))
        out.append(sum(terms) / len(terms) if terms else 0.0)
    if normalize == "global":
        _, std = _mean_std(r)
        out = [a / (std + eps) for a in out]
    return out


def _check_rewards(rewards: Sequence[float]) -> list[float]:
    r = [float(x) for x in rewards]
    if not r:
        raise ValueError("rewards is empty")
    if any(math.isnan(x) for x in r):
        raise ValueError("rewards contain NaN")
    return r


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation."""
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
