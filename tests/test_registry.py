"""One registry: every strategy class is registered under its own name, and the API, the server and
the vLLM mapping read how it takes a constraint from it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import decodekit.strategies as strategies_pkg
from decodekit import LLM
from decodekit.backends.mock import MockBackend
from decodekit.constraints import Regex
from decodekit.strategies import REGISTRY, ConstrainedSpeculative, Speculative, entry, entry_of, with_constraint
from decodekit.strategies.base import Strategy
from decodekit.strategies.constrained import Constrained


def test_every_strategy_class_is_registered_by_its_name():
    classes = set()
    for info in pkgutil.iter_modules(strategies_pkg.__path__):
        module = importlib.import_module(f"decodekit.strategies.{info.name}")
        classes |= {c for _, c in inspect.getmembers(module, inspect.isclass)
                    if issubclass(c, Strategy) and c is not Strategy and c.__module__ == module.__name__}
    assert classes == {e.build for e in REGISTRY.values()}
    for name, found in REGISTRY.items():
        assert found.build.name == name
        assert found.constraint in ("wraps", "own", "is", "no") and found.on_vllm


def test_constraint_composition_follows_the_registry():
    assert isinstance(with_constraint(Regex("[a-z]+"), None), Constrained)
    assert isinstance(with_constraint(Regex("[a-z]+"), Speculative()), ConstrainedSpeculative)
    llm = LLM(backend=MockBackend(cache_tokens=256))
    for name, found in REGISTRY.items():
        if found.constraint != "wraps":
            with pytest.raises(ValueError, match=found.hint.split(":")[0][:20]):
                llm.generate("abc", strategy=name, constraint=Regex("[a-z]+"), max_new_tokens=2)
    assert entry_of(None).name == "sample" and entry("speculative").vllm_forms == ("speculative_config",)
    with pytest.raises(ValueError, match="unknown strategy"):
        entry("nope")
