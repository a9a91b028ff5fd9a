"""decodekit: an inference-time decoding toolkit over one shared KV-cache manager."""

from decodekit.api import LLM, generate
from decodekit.cache import CacheFullError
from decodekit.constraints import Grammar, JsonSchema, OneOf, Predicate, Regex
from decodekit.rollout.advantages import grpo_advantages, tree_advantages
from decodekit.rollout.records import RolloutResult, Trajectory, TreeNode
from decodekit.rollout.tree import EarlyStop, TreeRollout
from decodekit.strategies import EntropySwitch, Sample, Speculative, Strategy
from decodekit.strategies.constrained import Constrained
from decodekit.types import (
    Choice,
    Completion,
    Provenance,
    RequestStats,
    SamplingParams,
    TokenEvent,
    TokenInfo,
    Usage,
)

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
    "Provenance",
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
