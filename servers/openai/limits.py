"""What one request may cost the server: sizes, counts and time limits, checked before any work.

A server request is untrusted. Every limit below ends a request with a 400 (413 for the body)
naming the limit, before the engine thread sees it, or bounds the work it causes there.
"""

from __future__ import annotations

from dataclasses import dataclass

from decodekit.servers.openai.errors import bad_value


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 2 * 1024 * 1024  # a 2 MiB body already holds a prompt far past any context
    max_prompts: int = 64  # prompts in one /v1/completions call
    max_particles: int = 16
    max_choices: int = 10_000  # guided_choice options
    max_choice_chars: int = 1_000
    max_schema_bytes: int = 64 * 1024
    max_schema_depth: int = 32
    max_grammar_chars: int = 20_000
    max_pattern_chars: int = 5_000
    max_tools: int = 64  # function tools in one chat request
    max_tools_bytes: int = 128 * 1024  # their parameter schemas together (each one also <= max_schema_bytes)
    check_timeout_s: float = 0.05  # one regex check on the engine thread (normal checks take microseconds)
    step_limit_s: float = 30.0  # /health fails while one engine step has run longer


def check_nesting(value, limit: int, param: str) -> None:
    """400 when a JSON value nests deeper than ``limit`` (iteratively: no RecursionError on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise bad_value(f"{param} nests deeper than {limit} levels", param)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
