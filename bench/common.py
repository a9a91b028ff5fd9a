"""Helpers every benchmark script shares: data loading (the regex patterns, schemas), interleaved timing,
result files."""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from decodekit.paths import CHECKOUT, data_dir, results_dir

ROOT = CHECKOUT if CHECKOUT is not None else Path.cwd()
DATA = data_dir()
RESULTS = results_dir()


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a ~1 minute run for smoke checks")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype for the transformers backend (default: float32)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON / markdown / PNG results")
    return p


def require_data(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        sys.exit(f"benchmark data not found: {path} "
                 "(expected the shared data folder beside the project, or set DECODEKIT_DATA)")
    return path


def spec_bench(per_category: int, categories: list[str] | None = None) -> list[dict]:
    """Spec-Bench questions ``{question_id, category, turns}``, ``per_category`` of each category."""
    rows = [json.loads(line) for line in require_data("spec_bench/question.jsonl").read_text().splitlines()]
    counts: dict[str, int] = {}
    out = []
    for q in rows:
        if categories and q["category"] not in categories:
            continue
        if counts.get(q["category"], 0) < per_category:
            counts[q["category"]] = counts.get(q["category"], 0) + 1
            out.append(q)
    return out


def patterns() -> list[str]:
    """The regular expressions of ``pattern_matching/patterns.csv`` (its ``regex`` column), in file order."""
    with (DATA / "pattern_matching" / "patterns.csv").open() as f:
        return [row["regex"] for row in csv.DictReader(f)]


# The prompt for JSON generation benchmarks: what a user asking for one instance would write (say what to
# produce, show one worked instance, name the fields). Asked only "a JSON document valid under this
# schema", SmolLM2-135M writes the schema back or rambles (45% of the 40-schema set completed within
# 128 tokens; 60% with this prompt, T = 1).
JSON_SYSTEM = ("You write one JSON document that is an instance of the given JSON schema (never the schema "
               "itself): compact, on one line, with a short realistic value for each property the schema defines.")
_EXAMPLE_SCHEMA = ('{"type":"object","properties":{"id":{"type":"integer"},"title":{"type":"string"},"done":'
                   '{"type":"boolean"},"labels":{"type":"array","items":{"type":"string"}}},"required":["id","title"]}')
_EXAMPLE_DOC = '{"id":7,"title":"Buy milk","done":false,"labels":["home"]}'


def json_schema_prompt(schema_text: str) -> list[dict]:
    """Chat messages asking for one compact instance of the schema ``schema_text``."""
    return [{"role": "system", "content": JSON_SYSTEM},
            {"role": "user", "content": f"Schema: {_EXAMPLE_SCHEMA} Use the properties id, title, done, labels."},
            {"role": "assistant", "content": _EXAMPLE_DOC},
            {"role": "user", "content": f"Schema: {schema_text}{_fields_line(schema_text)}"}]


def _fields_line(schema_text: str) -> str:
    schema = json.loads(schema_text)
    props = schema.get("properties") if isinstance(schema, dict) else None
    names = list(props)[:12] if isinstance(props, dict) else []
    return f" Use the properties {', '.join(names)}." if names else ""


def optional_fields(schema, text: str) -> tuple[int, int]:
    """(optional top-level properties present in the output ``text``, optional properties the schema has);
    an output that does not parse has none present."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict):
        return 0, 0
    optional = [k for k in props if k not in (schema.get("required") or [])]
    try:
        doc = json.loads(text)
    except ValueError:
        return 0, len(optional)
    return (sum(k in doc for k in optional) if isinstance(doc, dict) else 0), len(optional)


def fields_filled(counts) -> float | None:
    """Share of optional properties present over (present, total) counts (``optional_fields``), so
    short answers are not the way to finish."""
    counts = list(counts)
    total = sum(t for _, t in counts)
    return round(sum(p for p, _ in counts) / total, 3) if total else None


def compiling_schemas(folder: Path, max_chars: int, compile_fn):
    """Schemas (sorted ``<subset>/<file>.json``) of at most ``max_chars`` characters that parse and that
    ``compile_fn(schema)`` accepts (a ``ValueError`` skips one), lazily: (subset/file, text, schema, compiled)."""
    for path in sorted(folder.glob("*/*.json")):
        text = path.read_text()
        if len(text) > max_chars:
            continue
        try:
            schema = json.loads(text)  # json.JSONDecodeError is a ValueError
            compiled = compile_fn(schema)
        except ValueError:
            continue
        yield f"{path.parent.name}/{path.name}", text, schema, compiled


def timed(fn):
    """(result, seconds) of one call."""
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def interleaved(runners: dict, repeats: int, warmup: int = 0) -> dict[str, list]:
    """Run each named zero-argument callable once per round, rounds interleaved; returns results per name.

    Interleaving spreads machine noise evenly over the contenders, and every other round runs them in
    reverse order (ABBA) so no contender always goes first; report medians or ``paired_ratio``.
    ``warmup`` rounds run first and are not recorded (first CUDA calls load kernels, allocators grow).
    """
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    out: dict[str, list] = {name: [] for name in runners}
    order = list(runners)
    for round_ in range(repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            out[name].append(runners[name]())
    return out


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a[i] / b[i]``: both ran in the same round, so slow drift of the machine
    (other jobs, clocks) cancels in each ratio, which a ratio of two medians does not."""
    return median([x / y for x, y in zip(a, b) if y])


def median(xs) -> float:
    return float(statistics.median(xs))


def machine() -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu": platform.processor(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, summary: dict, table_md: str, out_dir: str | Path, details: dict | None = None) -> None:
    """Write ``<name>.json`` (summary + details + machine) and ``<name>.md``, then print the summary line.

    The summary JSON is the last line on stdout, as every benchmark promises.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {**summary, "machine": machine(), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M")}
    if details is not None:
        record["details"] = details
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    (out / f"{name}.md").write_text(f"# {name}\n\n`{' '.join(sys.argv)}`\n\n{table_md}\n")
    print(json.dumps(summary, default=str), flush=True)


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
