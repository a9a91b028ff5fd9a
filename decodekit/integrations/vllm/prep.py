"""Model preparation for vLLM: alias | .gguf file | local directory | hub id -> what vLLM loads.

vLLM's own GGUF loader fails on the SmolLM2 file, so a GGUF model (the built-in aliases) goes through
``decodekit.models.hf_dir`` (transformers dequantizes it once into a float32 safetensors directory)
and is saved again in the serving dtype under ``~/.cache/decodekit/vllm/<name>-<dtype>/``: half the
disk and load time of float32, and the exact weights the transformers backend sees in that dtype,
which is what greedy parity between the two backends needs. Local directories and hub ids are
passed through untouched (vLLM reads them itself and casts to ``dtype`` at load).

This module imports neither vLLM nor torch at import time, so the main environment can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from decodekit.models import DTYPES  # noqa: E402  (one list of dtypes)


@dataclass(frozen=True)
class PreparedModel:
    """What the vLLM backend needs for one model name."""

    name: str  # the name the user gave
    path: str  # directory or hub id handed to vLLM as ``model=``
    dtype: str
    prepend_bos: bool  # the tokenizer must add a BOS the GGUF tokenizer omits (Gemma 3)


def prepare(name: str, dtype: str = "bfloat16") -> PreparedModel:
    """Resolve ``name`` to a directory (or hub id) vLLM loads, building a cached copy when needed.

    Raises ``ValueError`` for an unknown name, a missing alias package or a bad ``dtype``.
    """
    from decodekit.models import resolve

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    location, gguf_file, prepend_bos = resolve(name)
    if gguf_file is None:
        return PreparedModel(name, location, dtype, prepend_bos)
    return PreparedModel(name, str(_cast_copy(name, dtype)), dtype, prepend_bos or _is_gemma(name))


def vllm_cache_dir(name: str, dtype: str) -> Path:
    from decodekit.models import ALIASES, cache_root

    stem = name if name in ALIASES else Path(name).stem
    return cache_root() / "vllm" / f"{stem}-{dtype}"


def _cast_copy(name: str, dtype: str) -> Path:
    """The float32 HF directory of a GGUF model, saved once more in ``dtype`` (atomically)."""
    from decodekit.models import hf_dir

    source = hf_dir(name)
    if dtype == "float32":
        return source
    target = vllm_cache_dir(name, dtype)
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
    return target


def _is_gemma(name: str) -> bool:
    return "gemma" in name.lower()


def main(argv: list[str] | None = None) -> int:
    """``python -m decodekit.integrations.vllm.prep [NAME ...] [--dtype D]``: build the cached directories now."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("names", nargs="*", default=["smollm2-135m"])
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    args = p.parse_args(argv)
    for name in args.names:
        print(f"{name}: {prepare(name, args.dtype).path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
