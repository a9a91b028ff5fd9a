"""Decoding strategies; ``by_name`` maps the names used by the CLI and the server."""

from decodekit.strategies.base import Proposal, Strategy
from decodekit.strategies.constrained import Constrained
from decodekit.strategies.constrained_speculative import ConstrainedSpeculative
from decodekit.strategies.entropy import EntropySwitch
from decodekit.strategies.sample import Sample
from decodekit.strategies.speculative import Speculative
from decodekit.strategies.tree_strategy import TreeStrategy


def by_name(name: str, **options) -> Strategy:
    registry = {"sample": Sample, "constrained": Constrained, "entropy": EntropySwitch, "speculative": Speculative,
                "tree": TreeStrategy}
    if name not in registry:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(registry)}")
    return registry[name](**options)


__all__ = ["Constrained", "ConstrainedSpeculative", "EntropySwitch", "Proposal", "Sample", "Speculative", "Strategy",
           "TreeStrategy", "by_name"]
