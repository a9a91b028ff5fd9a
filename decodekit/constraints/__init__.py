"""Constraints on generated text and the samplers that enforce them (AWRS, masking, SMC).

``OneOf`` is the fixed-strings constraint (``Choice`` here is an alias; the top-level
``decodekit.Choice`` stays the completion record).
"""

from decodekit.constraints.base import Constraint, TokenChecker
from decodekit.constraints.choice import OneOf
from decodekit.constraints.grammar import Grammar
from decodekit.constraints.json_schema import JsonSchema
from decodekit.constraints.predicate import Predicate
from decodekit.constraints.regex import Regex
from decodekit.constraints.tokens import token_bytes

Choice = OneOf

__all__ = ["Choice", "Constraint", "Grammar", "JsonSchema", "OneOf", "Predicate", "Regex", "TokenChecker",
           "token_bytes"]
