"""vLLM backend tests (this folder is not named ``vllm``: pytest puts ``tests/`` on ``sys.path``, where a
``vllm`` folder would shadow the package). They run only where vLLM imports (``make test-vllm`` builds
and uses .venv-vllm).

In the main environment (no vLLM) every test here is skipped at collection with the reason, so the
default ``pytest`` run stays fast. Engines are session fixtures: each vLLM engine starts a process.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU machines are shared


def _vllm_missing() -> str | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:  # absent, or only a namespace folder of that name
        return "vLLM is not installed in this environment: run `make test-vllm` (builds .venv-vllm)"
    try:
        import vllm  # noqa: F401
    except Exception as e:  # a CUDA-only build on CPU, or torchvision beside CPU torch
        return f"vLLM is installed but does not import ({type(e).__name__}: {e}); see `make setup-vllm`"
    return None


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    mine = [item for item in items if str(item.fspath).startswith(here)]
    reason = _vllm_missing() if mine else None
    if reason is None:
        return
    for item in mine:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def vllm_llm():
    """SmolLM2-135M on vLLM, bfloat16, prefix caching on; shared by the session."""
    from decodekit import LLM

    llm = LLM("smollm2-135m", backend="vllm", max_model_len=1024, max_num_seqs=16)
    yield llm
    llm.backend.close()


@pytest.fixture(scope="session")
def hf_bf16():
    """The transformers backend in bfloat16, for parity."""
    from decodekit import LLM

    return LLM("smollm2-135m", dtype="bfloat16")
