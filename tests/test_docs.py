"""Every Python code block in README.md and docs/*.md runs, and every ``decodekit`` command in their
shell blocks parses. A document's blocks run in order in one namespace (later blocks use earlier
names, as a reader does). Models load as tiny random-weight Llamas with SmolLM2's tokenizer and
answers stop at 12 tokens, so the code paths are the real ones at a fraction of the time; the
OpenAI-client blocks talk to a server started here; blocks for the vLLM backend need vLLM and run only
where it is installed."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from conftest import tiny_llama

import decodekit.api
import decodekit.models
from decodekit.backends.hf import HFBackend
from decodekit.cli import build_parser
from decodekit.types import SamplingParams

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
SERVER = "http://127.0.0.1:8000"
MAX_TOKENS = 12


def blocks(path: Path, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(path.read_text()) if kind == lang]


def _short(check):
    """Answers of at most MAX_TOKENS: the blocks' code paths run, not their full lengths."""
    def post_init(self):
        check(self)
        object.__setattr__(self, "max_new_tokens", min(self.max_new_tokens, MAX_TOKENS))
    return post_init


@pytest.fixture
def tiny_models(smollm, monkeypatch):
    """Every model name loads as a tiny Llama sharing SmolLM2's tokenizer (seeded by name)."""
    tokenizer = smollm.tokenizer

    def load(name="smollm2-135m", *, dtype="float32", cache_tokens=16384, **_):
        model = tiny_llama(sum(map(ord, name)) % 1000, vocab_size=smollm.vocab_size)
        return HFBackend(model, tokenizer, name=f"{name}:{dtype}", cache_tokens=min(cache_tokens, 16384))

    monkeypatch.setattr(decodekit.models, "load_backend", load)
    monkeypatch.setattr(SamplingParams, "__post_init__", _short(SamplingParams.__post_init__))
    monkeypatch.setattr(decodekit.api, "load_backend", load)
    decodekit.api._loaded.cache_clear()
    yield load
    decodekit.api._loaded.cache_clear()


@pytest.fixture
def server(tiny_models):
    from decodekit.servers.openai.app import ServerThread, create_app

    thread = ServerThread(create_app(decodekit.api.LLM(), model_name="smollm2-135m", api_key="KEY")).start()
    yield thread.url
    thread.stop()


def needs_vllm(code: str) -> bool:
    return 'backend="vllm"' in code


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(doc, server, capsys):
    code_blocks = blocks(doc, "python")
    if not code_blocks:
        pytest.skip(f"{doc.name} has no Python blocks")
    namespace = {"__name__": "__docs__"}
    ran = 0
    for code in code_blocks:
        if needs_vllm(code) and importlib.util.find_spec("vllm") is None:
            continue  # the vLLM backend's own venv runs these (tests/vllm_backend)
        if 'backend="llamacpp"' in code and importlib.util.find_spec("llama_cpp") is None:
            continue  # the llama.cpp extra (make setup-llamacpp; CI installs it)
        if "from trl import" in code and importlib.util.find_spec("trl") is None:
            continue  # the RL extra (pip install 'decodekit[rl]'; make setup installs it)
        exec(compile(code.replace(SERVER, server), f"{doc.name} block", "exec"), namespace)  # noqa: S102
        ran += 1
    if not ran:
        pytest.skip(f"{doc.name}: every block needs vLLM (not installed here)")


def decodekit_commands(doc: Path) -> list[str]:
    """Shell lines that call ``decodekit`` with real arguments (a synopsis with [optional] parts is not one)."""
    lines = []
    for block in blocks(doc, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("decodekit ") and "[" not in line:
                lines.append(line)
    return lines


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_shell_commands_parse(doc):
    parser = build_parser()
    for line in decodekit_commands(doc):
        parser.parse_args(shlex.split(line)[1:])  # argparse exits (SystemExit) on an unknown option
