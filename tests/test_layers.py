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
                  "decodekit.backends.cpu_linear", "decodekit.backends.timing", "decodekit.backends.llamacpp",
                  "decodekit.models"]),
    ("engine", ["decodekit.engine", "decodekit.scheduler", "decodekit.sequence", "decodekit.strategies.base",
                "decodekit.context", "decodekit.lanes", "decodekit.driver"]),
    ("algorithms", ["decodekit.constraints", "decodekit.drafting", "decodekit.rollout"]),
    ("strategies", ["decodekit.strategies"]),
    ("api", ["decodekit.api", "decodekit.cli", "decodekit"]),
    ("integrations", ["decodekit.integrations"]),
    ("training", ["decodekit.training"]),
    ("server", ["decodekit.servers"]),
    ("bench", ["decodekit.bench"]),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
# Imports that go up a layer on purpose, with the reason.
ALLOWED_UP = {
    # the vLLM backend is chosen by name through LLM(backend="vllm"): api -> integrations, loaded lazily
    ("decodekit.api", "decodekit.integrations.vllm.backend"),
    # plain sampling is the engine's default strategy
    ("decodekit.engine", "decodekit.strategies.sample"),
    # TreeRollout.run is the engine plus TreeStrategy (one decode loop), loaded lazily
    ("decodekit.rollout.tree", "decodekit.strategies.tree_strategy"),
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


# ---- the engine owns every KV lane -----------------------------------------------------------------
KV_VERBS = {"open", "fork", "extend", "truncate", "commit", "release"}
# the lane keeper, the scheduler (main handles at admission), the cache manager and the backends
KV_OWNERS = ("decodekit.engine", "decodekit.scheduler", "decodekit.lanes", "decodekit.cache", "decodekit.backends")
ABOVE_THE_ENGINE = ("decodekit.strategies", "decodekit.drafting", "decodekit.rollout", "decodekit.constraints")


def _owned_by(module: str, owners) -> bool:
    return any(module == o or module.startswith(o + ".") for o in owners)


def kv_calls(path: Path) -> list[str]:
    """Calls of a cache manager's handle verbs (``<...>cache.fork(...)``, ``backend.open(...)``) in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in KV_VERBS:
            receiver = ast.unparse(node.func.value)
            if re.search(r"(^|[._])cache$", receiver) or (node.func.attr == "open" and "backend" in receiver):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}")
    return out


def test_no_kv_handle_calls_outside_the_engine():
    """Strategies, algorithms, the API, the server and the benchmarks ask the engine (lanes) for KV."""
    calls = [c for m, p in modules() if not _owned_by(m, KV_OWNERS) for c in kv_calls(p)]
    assert not calls, "KV-handle calls outside the engine:\n" + "\n".join(calls)


def test_strategies_hold_no_handles():
    """Above the engine nothing reads a KV handle (``.handle``): strategies hold ``Lane`` records."""
    reads = [f"{p.relative_to(ROOT)}:{n.lineno}" for m, p in modules()
             if _owned_by(m, ABOVE_THE_ENGINE) and m != "decodekit.strategies.base"
             for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Attribute) and n.attr == "handle"]
    assert not reads, f"KV handles read above the engine: {reads}"


def test_no_engine_sniffing():
    """Nothing outside the engine asks an engine object what it has (``getattr`` / ``hasattr``)."""
    wrong = []
    for module, path in modules():
        if _owned_by(module, ("decodekit.engine", "decodekit.scheduler", "decodekit.lanes", "decodekit.context")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                    and node.args and re.search(r"(^|\.)engine$", ast.unparse(node.args[0])):  # noqa: E501
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not wrong, wrong


def test_kv_checks_see_calls():
    """The checks above find what they look for (a check that cannot fail proves nothing)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=ROOT / "tests", delete=False) as f:
        f.write("engine.backend.cache.fork(h)\nself.cache.release(h)\nbackend.open(ids)\nctx.fork_lane(seq)\n")
    path = Path(f.name)
    try:
        assert len(kv_calls(path)) == 3
    finally:
        path.unlink()
