"""decodekit: an inference-time decoding toolkit over one shared KV-cache manager."""

from decodekit.api import LLM, generate
from decodekit.cache import CacheFullError
from decodekit.constraints import Grammar, JsonSchema, OneOf, Predicate, Regex
from decodekit.strategies import EntropySwitch, Sample, Speculative, Strategy
from decodekit.strategies.advantages import grpo_advantages, tree_advantages
from decodekit.strategies.constrained import Constrained
from decodekit.strategies.tree import EarlyStop, TreeRollout
from decodekit.strategies.tree_types import RolloutResult, Trajectory, TreeNode
from decodekit.types import Choice, Completion, RequestStats, SamplingParams, TokenEvent, TokenInfo, Usage

__all__ = [
    "LLM",
    "CacheFullError",
    "Choice",
    "Completion",
    "Constrained",
    "EarlyStop",
    "EntropySwitch",
    "Grammar",
    "JsonSchema",
    "OneOf",
    "Predicate",
    "Regex",
    "RequestStats",
    "RolloutResult",
    "Sample",
    "SamplingParams",
    "Speculative",
    "Strategy",
    "TokenEvent",
    "TokenInfo",
    "Trajectory",
    "TreeNode",
    "TreeRollout",
    "Usage",
    "generate",
    "grpo_advantages",
    "tree_advantages",
]
__version__ = "0.1.0"
