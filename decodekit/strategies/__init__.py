"""Decoding strategies; ``by_name`` maps the names used by the CLI and the server."""

from decodekit.strategies.base import Proposal, Strategy
from decodekit.strategies.sample import Sample


def by_name(name: str, **options) -> Strategy:
    registry = {"sample": Sample}
    if name not in registry:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(registry)}")
    return registry[name](**options)


__all__ = ["Proposal", "Sample", "Strategy", "by_name"]
