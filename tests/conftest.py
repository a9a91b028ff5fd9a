"""Shared fixtures: real models (loaded once per session), tiny random models and the mock backend."""

from __future__ import annotations

import json
import os

import pytest
import torch
from decodekit.bench.common import DATA  # ../shared/data, or $DECODEKIT_DATA

from decodekit.backends.mock import MockBackend
from decodekit.models import is_installed
from decodekit.strategies.sample import Sample

# Device for the tiny random models (the mock backend always runs on the CPU): DECODEKIT_TEST_DEVICE=cuda
# runs the tiny-model tests on a GPU; tests build reference inputs on ``model.device``.
DEVICE = os.environ.get("DECODEKIT_TEST_DEVICE", "cpu")


def _real(alias: str):
    if not is_installed(alias):
        pytest.skip(f"{alias} is not installed (see README set-up)")
    from decodekit.models import load_backend

    return load_backend(alias, cache_tokens=8192)


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct HF backend, float32, shared by the session (do not leave handles open)."""
    return _real("smollm2-135m")


@pytest.fixture(scope="session")
def gemma():
    """Gemma 3 270M HF backend, float32, shared by the session."""
    return _real("gemma3-270m")


@pytest.fixture
def mock():
    """A fresh mock backend, vocab 16, bigram logits from a fixed seed."""
    return MockBackend(vocab_size=16, seed=0, cache_tokens=512)


class Exploding(Sample):
    """A strategy that fails on its first step (the engine and server must isolate it)."""

    def step(self, engine, seqs):
        raise RuntimeError("boom")


@pytest.fixture
def exploding():
    """An ``Exploding`` strategy (a fixture: importing from conftest is ambiguous beside vllm_backend's)."""
    return Exploding()


@pytest.fixture
def one_thread():
    """Tiny models and many small tensor ops: one intra-op thread avoids the thread wake-ups and spinning
    that dominate on a busy machine (modules use it with ``pytestmark = usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_caches_clean(*backends) -> None:
    """Every backend's cache is consistent and holds no open handle."""
    for backend in backends:
        backend.cache.check_integrity()
        assert backend.cache.num_open_handles == 0


def tiny_llama(seed: int = 0, **overrides):
    """A random-weight 2-layer Llama (vocab 128) built from a config, on ``DECODEKIT_TEST_DEVICE``; no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval().to(DEVICE)


def spec_bench_prompts(k: int, per_category: int = 1) -> list[str]:
    """First-turn Spec-Bench prompts, ``per_category`` from each category, ``k`` in all."""
    path = DATA / "spec_bench" / "question.jsonl"
    if not path.exists():
        pytest.skip(f"Spec-Bench data not found at {path}")
    seen: dict[str, int] = {}
    out = []
    for line in path.read_text().splitlines():
        q = json.loads(line)
        if seen.get(q["category"], 0) < per_category:
            seen[q["category"]] = seen.get(q["category"], 0) + 1
            out.append(q["turns"][0])
    return out[:k]
