"""Decoding strategies; the registry (``strategies.registry``) maps the names the API, CLI and server use."""

from decodekit.strategies.base import Proposal, Strategy
from decodekit.strategies.best_of import BestOfN
from decodekit.strategies.constrained import Constrained
from decodekit.strategies.constrained_speculative import ConstrainedSpeculative
from decodekit.strategies.entropy import EntropySwitch
from decodekit.strategies.registry import REGISTRY, by_name, entry, entry_of, with_constraint
from decodekit.strategies.sample import Sample
from decodekit.strategies.speculative import Speculative
from decodekit.strategies.tree_strategy import TreeStrategy

__all__ = ["REGISTRY", "BestOfN", "Constrained", "ConstrainedSpeculative", "EntropySwitch", "Proposal", "Sample",
           "Speculative", "Strategy", "TreeStrategy", "by_name", "entry", "entry_of", "with_constraint"]
