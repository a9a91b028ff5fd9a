"""decodekit: an inference-time decoding toolkit over one shared KV-cache manager."""

from decodekit.api import LLM, generate
from decodekit.cache import CacheFullError
from decodekit.constraints import Grammar, JsonSchema, OneOf, Predicate, Regex
from decodekit.strategies import EntropySwitch, Sample, Speculative, Strategy
from decodekit.strategies.constrained import Constrained
from decodekit.types import Choice, Completion, RequestStats, SamplingParams, TokenEvent, TokenInfo, Usage

__all__ = [
    "LLM",
    "CacheFullError",
    "Choice",
    "Completion",
    "Constrained",
    "EntropySwitch",
    "Grammar",
    "JsonSchema",
    "OneOf",
    "Predicate",
    "Regex",
    "RequestStats",
    "Sample",
    "SamplingParams",
    "Speculative",
    "Strategy",
    "TokenEvent",
    "TokenInfo",
    "Usage",
    "generate",
]
__version__ = "0.1.0"
