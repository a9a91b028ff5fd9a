"""Run every benchmark script, continue past failures, and write bench/results/REPORT.md.

Each script runs in its own process (`python -m bench.<name>`), its progress bars pass through,
and its last stdout line (one JSON object) is its summary. Scripts that need an optional stack run
with that stack's venv (vLLM: `.venv-vllm`, constraint peers: `.venv-peers`); where it is not set up
the report names the missing set-up command. `--keep` keeps earlier results of scripts not run now,
so one report can be completed piece by piece (each section shows its own date).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from decodekit.bench.common import RESULTS, ROOT, machine
from decodekit.bench.targets import check
from tqdm import tqdm

PACKAGE = __package__ or "decodekit.bench"  # the scripts run as ``python -m decodekit.bench.<name>``
BENCHMARKS = ["throughput", "speculative", "constraints", "constraint_peers", "constrained_speculative",
              "constrained_batch", "json_schema_coverage", "entropy_switch", "tree_rollout", "rl_rollout",
              "server_load", "server_abuse", "mixed_traffic", "throughput_llamacpp", "throughput_vllm",
              "tree_rollout_vllm", "tree_rollout_llamacpp"]
# name -> (module, extra arguments, venv holding its optional stack, the command that sets it up)
SPECS = {
    "constraint_peers": ("constraint_peers", [], ".venv-peers", "make setup-peers"),
    "throughput_vllm": ("throughput_vllm", [], ".venv-vllm", "make setup-vllm"),
    "tree_rollout_vllm": ("tree_rollout", ["--backend", "vllm"], ".venv-vllm", "make setup-vllm"),
    "tree_rollout_llamacpp": ("tree_rollout", ["--backend", "llamacpp"], ".venv", "make setup-llamacpp"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decodekit bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="each script's ~1 minute mode")
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"a subset of {BENCHMARKS}")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--package", default=PACKAGE, help=argparse.SUPPRESS)  # tests point this at stub scripts
    p.add_argument("--timeout", type=float, default=3600, help="seconds per script")
    p.add_argument("--keep", action="store_true", help="keep earlier results (results.json) of scripts not run now")
    p.add_argument("--rebuild", action="store_true",
                   help="run nothing: rewrite REPORT.md and summary.json from each script's own <name>.json")
    return p


RECORD_ONLY = ("machine", "command", "date", "details")  # what write_results adds to a summary in <name>.json


def from_results_file(name: str, args, earlier: dict | None) -> dict | None:
    """A script's last result as ``run_script`` returns it, read back from ``<out>/<name>.json``."""
    path = Path(args.out) / f"{name}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    seconds = (earlier or {}).get("seconds") if (earlier or {}).get("date", "")[:16] == record.get("date") else None
    return {"summary": {k: v for k, v in record.items() if k not in RECORD_ONLY}, "error": None,
            "seconds": float(seconds if seconds is not None else record.get("seconds") or 0.0),
            "date": f"{record.get('date', 'date unknown')} (from {path.name})"}


def run_script(name: str, args) -> dict:
    """Run one benchmark; returns {"summary": dict | None, "error": str | None, "seconds": float, "date": str}."""
    result = _run_script(name, args)
    return {**result, "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def _run_script(name: str, args) -> dict:
    module, extra, venv, setup = SPECS.get(name, (name, [], None, None))
    python = sys.executable
    if venv is not None and args.package == PACKAGE:
        python = str(ROOT / venv / "bin" / "python")
        if not Path(python).exists():
            return {"summary": None, "error": f"not installed: {venv} is missing; set it up with `{setup}`",
                    "seconds": 0.0}
    cmd = [python, "-m", f"{args.package}.{module}", "--model", args.model, "--out", args.out, *extra]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--device", args.device] if args.device else []
    start = time.perf_counter()
    tail: deque[str] = deque(maxlen=30)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        stdout, stderr = proc.communicate(timeout=args.timeout)
        tail.extend(stderr.replace("\r", "\n").splitlines())
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"summary": None, "error": f"timed out after {args.timeout:.0f} s", "seconds": args.timeout}
    seconds = time.perf_counter() - start
    lines = [line for line in stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {"summary": None, "error": f"exit code {proc.returncode}\n" + "\n".join(tail), "seconds": seconds}
    summary = _last_json_object(lines)
    if summary is None:
        error = f"no JSON summary on stdout; last line: {lines[-1][:200]}"
        return {"summary": None, "error": error, "seconds": seconds}
    return {"summary": summary, "error": None, "seconds": seconds}


def _last_json_object(lines: list[str]) -> dict | None:
    """The script's summary: its last stdout line holding a JSON object (vLLM logs to stdout after it)."""
    for line in reversed(lines):
        if line.lstrip().startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def report(results: dict[str, dict], args, command: str) -> str:
    out = Path(args.out)
    m = machine()
    lines = ["# decodekit benchmark report", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}", f"- command: `{command}`",
             f"- mode: {'quick' if args.quick else 'full'}; model: `{args.model}`",
             f"- machine: {m['platform']}, CPU `{m['cpu'] or 'unknown'}`, torch threads {m['threads']}, "
             f"GPU: {m.get('gpu', 'none')}",
             f"- torch {m['torch']}, transformers {m['transformers']}, python {m['python']}", "",
             "## Targets", "", "| benchmark | figure | target | measured | verdict |", "|---|---|---|---|---|"]
    for name, r in results.items():
        for label, target, figure, verdict in check(name, r["summary"]):
            lines.append(f"| {name} | {label} | {target} | {figure} | {verdict} |")
    for name, r in results.items():
        lines += ["", f"## {name}", "", f"run time: {r['seconds']:.0f} s, {r.get('date', 'date unknown')}", ""]
        if r["error"]:
            lines += ["**failed**:", "", "```", r["error"].strip()[-3000:], "```"]
            continue
        md = out / f"{name}.md"
        if md.exists():
            lines += [md.read_text().split("\n", 1)[-1].strip(), ""]
        lines += [f"![{p.stem}]({p.name})" for p in sorted(out.glob(f"{name}*.png"))]
        lines += ["", f"raw: [`{name}.json`]({name}.json)", "", "```json", json.dumps(r["summary"]), "```"]
    return "\n".join(lines) + "\n"


def run(args, command: str | None = None) -> dict[str, dict]:
    names = args.only or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown and args.package == PACKAGE:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {BENCHMARKS}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    store = Path(args.out) / "results.json"
    earlier = json.loads(store.read_text()) if (args.keep or args.rebuild) and store.exists() else {}
    fresh = {}
    if args.rebuild:
        fresh = {n: r for n in names if (r := from_results_file(n, args, earlier.get(n))) is not None}
        names = []
    for name in tqdm(names, desc="benchmarks", unit="script"):
        tqdm.write(f"== {name}")
        fresh[name] = run_script(name, args)
        tqdm.write(f"   {'ok' if fresh[name]['error'] is None else 'FAILED'} in {fresh[name]['seconds']:.0f} s")
    order = BENCHMARKS if args.package == PACKAGE else list(dict.fromkeys([*earlier, *fresh]))
    results = {n: fresh.get(n, earlier.get(n)) for n in order if n in fresh or n in earlier}
    store.write_text(json.dumps(results, indent=2))
    command = command or " ".join(["python -m decodekit.bench.run_all", *sys.argv[1:]])
    (Path(args.out) / "REPORT.md").write_text(report(results, args, command))
    (Path(args.out) / "summary.json").write_text(json.dumps(
        {n: r["summary"] for n, r in results.items()}, indent=2))
    print(json.dumps({"bench": "all", "ok": [n for n, r in results.items() if not r["error"]],
                      "failed": [n for n, r in results.items() if r["error"]],
                      "report": str(Path(args.out) / "REPORT.md")}))
    return results


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
