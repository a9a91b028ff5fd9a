"""The package's layers and their import direction (docs/architecture.md draws them): a module may
import its own layer and the layers below, never above; the runtime never imports training code or
the benchmarks; pyproject.toml installs every package folder, all under ``decodekit``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"decodekit": ROOT / "decodekit", "decodekit.servers": ROOT / "servers", "decodekit.bench": ROOT / "bench"}

# lowest first; a module's layer is the first whose prefixes match its name (longest prefix wins)
LAYERS = [
    ("core", ["decodekit.types", "decodekit.sampling", "decodekit.tokenizer", "decodekit.output", "decodekit.paths",
              "decodekit.profiles"]),
    ("cache", ["decodekit.cache"]),
    ("backends", ["decodekit.backends.base", "decodekit.backends.hf", "decodekit.backends.mock",
                  "decodekit.backends.cpu_linear", "decodekit.models"]),
    ("engine", ["decodekit.engine", "decodekit.scheduler", "decodekit.sequence", "decodekit.strategies.base"]),
    ("algorithms", ["decodekit.constraints", "decodekit.drafting", "decodekit.rollout"]),
    ("strategies", ["decodekit.strategies"]),
    ("api", ["decodekit.api", "decodekit.cli", "decodekit"]),
    ("integrations", ["decodekit.backends.vllm", "decodekit.backends.vllm_engine", "decodekit.backends.vllm_rollouts",
                      "decodekit.backends.vllm_strategies", "decodekit.vllm_prep"]),
    ("training", ["decodekit.training"]),
    ("server", ["decodekit.servers"]),
    ("bench", ["decodekit.bench"]),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
# Imports that go up a layer on purpose, with the reason.
ALLOWED_UP = {
    # the vLLM backend is chosen by name through LLM(backend="vllm"): api -> integrations, loaded lazily
    ("decodekit.api", "decodekit.backends.vllm"),
    # plain sampling is the engine's default strategy
    ("decodekit.engine", "decodekit.strategies.sample"),
}


def layer_of(module: str) -> str:
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = name, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def modules():
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if "results" in parts:
                continue
            yield ".".join([package, *parts]), path


def imports(path: Path) -> set[str]:
    """decodekit modules ``path`` imports, at any depth, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in ("decodekit", "bench", "servers")}


def test_no_generic_top_level_imports():
    wrong = [(m, i) for m, path in modules() for i in imports(path) if i.split(".")[0] in ("bench", "servers")]
    assert not wrong, f"import the installed names (decodekit.bench / decodekit.servers): {wrong}"


def test_imports_go_down_the_layers():
    up = []
    for module, path in modules():
        own = layer_of(module)
        for target in imports(path):
            if RANK[layer_of(target)] > RANK[own] and (module, target) not in ALLOWED_UP:
                up.append(f"{module} ({own}) -> {target} ({layer_of(target)})")
    assert not up, "imports against the layer order:\n" + "\n".join(up)


def test_runtime_never_imports_training_or_bench():
    runtime = [(m, p) for m, p in modules() if RANK[layer_of(m)] < RANK["training"]]
    wrong = [(m, i) for m, p in runtime for i in imports(p) if layer_of(i) in ("training", "server", "bench")]
    assert not wrong, wrong


def test_pyproject_installs_every_package():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools]")[1].split("[tool.setuptools.package-dir]")[0]
    listed = set(re.findall(r'"(decodekit[\w.]*)"', section))
    folders = {m for m, p in modules() if p.name == "__init__.py"}
    assert folders == listed, f"missing: {sorted(folders - listed)}, stale: {sorted(listed - folders)}"


@pytest.mark.parametrize("module", ["decodekit"])
def test_importing_the_library_stays_light(module):
    import subprocess
    import sys

    code = (f"import sys, {module}; heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'uvicorn', 'starlette', 'matplotlib') or m.startswith(('decodekit.training', "
            "'decodekit.bench', 'decodekit.servers'))); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_architecture_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(ROOT)) for _, p in modules()
               if p.name != "__init__.py" and f"`{p.relative_to(ROOT)}`" not in text]
    assert not missing, f"docs/architecture.md has no line for {missing}"
