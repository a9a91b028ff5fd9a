"""Constrained generation benchmark: masked decoding vs AWRS vs AWRS + SMC on three tasks.

Tasks (default model): pattern matching (``../shared/data/pattern_matching``, ``regex``-module
checks, no automaton), JSON schemas (``../shared/data/jsonschemabench/schemas``, small schemas;
masked uses the exact outlines-core mask, AWRS checks tokens against the schema automaton),
and a Lark arithmetic-expression grammar (prompts below). Per method: constraint checks per
token, output tokens/s, validity (share of outputs that satisfy the constraint; a
``constraint_failed`` output counts as not valid) and whether every returned output was valid.

``llguidance``: the same items on the default engine (``engine="auto"``: llguidance's exact mask
where it models the constraint, no walk; the checker and AWRS elsewhere, e.g. look-around patterns).

Masking with a grammar checks all 49,152 tokens with the incremental parser (~0.3 ms each, ~15 s
per token), so the masked grammar run is limited to a few tokens of one prompt.
"""

from __future__ import annotations

import random
import time

from decodekit.bench.common import DATA, compiling_schemas, md_table, median, parser, patterns, write_results

from decodekit.api import LLM
from decodekit.constraints import Grammar, JsonSchema, Regex
from decodekit.strategies.constrained import Constrained

ARITH = r"""
?start: sum
?sum: product | sum "+" product | sum "-" product
?product: atom | product "*" atom | product "/" atom
?atom: NUMBER | "(" sum ")"
NUMBER: /[0-9]+(\.[0-9]+)?/
%ignore " "
"""
GRAMMAR_PROMPTS = ["Write an arithmetic expression that equals 10: ", "Compute the total cost of 3 apples at 2 dollars "
                   "each plus 4 pears at 1.5 dollars, as an expression: ", "An expression using parentheses: ",
                   "Twelve times seven minus five, in symbols: "]
METHODS = {"masked": dict(sampler="masked"), "awrs": dict(sampler="awrs"),
           "awrs_smc5": dict(sampler="awrs", num_particles=5, ess_threshold=0.5),
           "llguidance": dict(sampler="awrs")}  # the default engine: llguidance's mask where it compiles
DEFAULTS: dict = {}  # id(constraint) -> the same constraint on the default engine, built once


def default_engine(constraint):
    """The same constraint with ``engine="auto"`` (llguidance masks where it models it, else checks)."""
    if id(constraint) not in DEFAULTS:
        if isinstance(constraint, Regex):
            DEFAULTS[id(constraint)] = Regex(constraint.pattern, timeout=constraint.timeout)
        elif isinstance(constraint, JsonSchema):
            DEFAULTS[id(constraint)] = JsonSchema(constraint.schema)
        elif isinstance(constraint, Grammar):
            DEFAULTS[id(constraint)] = Grammar(constraint.lark_text)
        else:
            DEFAULTS[id(constraint)] = constraint
    return DEFAULTS[id(constraint)]


def pattern_task(k: int) -> list[tuple[str, object, str]]:
    rows = patterns()
    picked = random.Random(0).sample(rows, k)
    return [(f"Write a string that matches the regular expression {p}\nString: ", Regex(p, automaton=False), p)
            for p in picked]


def json_task(k: int, engine: str = "auto") -> list[tuple[str, object, str]]:
    """``k`` small schemas outlines-core compiles (the same items on every engine), as constraints on
    ``engine`` (the default engine: llguidance or the checker, by schema)."""
    out = []
    outlines = lambda s: JsonSchema(s, engine="outlines")  # noqa: E731
    for name, text, schema, c in compiling_schemas(DATA / "jsonschemabench" / "schemas", 600, outlines):
        if c.regex is None or len(c.regex) > 3000:
            continue
        prompt = f"Write one JSON document that follows this JSON schema.\nSchema: {text}\nJSON: "
        out.append((prompt, c if engine == "outlines" else JsonSchema(schema, engine=engine), name.split("/")[-1]))
        if len(out) == k:
            break
    return out


def grammar_task(k: int) -> list[tuple[str, object, str]]:
    g = Grammar(ARITH, engine="checker")  # masked = every token checked, AWRS = the walk; llguidance: its own row
    return [(p, g, p) for p in GRAMMAR_PROMPTS[:k]]


def run_one(llm, prompt, constraint, method, max_new_tokens, seed):
    if method == "llguidance":
        constraint = default_engine(constraint)
    strategy = Constrained(constraint, **METHODS[method])
    t0 = time.perf_counter()
    c = llm.generate(prompt, strategy=strategy, max_new_tokens=max_new_tokens, seed=seed)
    wall = time.perf_counter() - t0
    ok = c.finish_reason != "constraint_failed" and constraint.complete_ok(c.text)
    return {"method": method, "text": c.text, "finish": c.finish_reason, "valid": ok,
            "returned_ok": c.finish_reason == "constraint_failed" or ok, "tokens": len(c.token_ids),
            "draws": c.stats.extra["token_draws"], "checks": c.stats.extra["constraint_checks"], "wall_s": wall}


def rates(rows: list[dict]) -> dict:
    """Tokens per second over all runs' wall time and the share of runs that finished valid."""
    return {"tokens_per_s": sum(r["tokens"] for r in rows) / max(sum(r["wall_s"] for r in rows), 1e-9),
            "valid_rate": sum(r["valid"] for r in rows) / max(len(rows), 1)}


def summarise(rows: list[dict]) -> dict:
    checks, draws = sum(r["checks"] for r in rows), sum(r["draws"] for r in rows)
    return {"runs": len(rows), "checks_per_token": checks / max(draws, 1), **rates(rows),
            "s_per_run_median": median([r["wall_s"] for r in rows]) if rows else 0.0,
            "returned_valid": all(r["returned_ok"] for r in rows)}


def main():
    args = parser(__doc__).parse_args()
    quick = args.quick
    llm = LLM(args.model, device=args.device)
    plan = {  # task: (items, max_new_tokens, masked items, masked max_new_tokens); masked per-token speed
        # is measured on fewer tokens where each token checks the whole vocabulary
        "pattern_matching": (pattern_task(2 if quick else 4), 10 if quick else 16, 1 if quick else 2, 4),
        "json": (json_task(1 if quick else 2, engine="outlines"), 24 if quick else 64, None, None),
        "grammar": (grammar_task(1 if quick else 2), 8 if quick else 14, 1, 2),
    }
    details: dict[str, dict[str, list]] = {}
    for task, (items, max_new, masked_items, masked_max) in plan.items():
        details[task] = {m: [] for m in METHODS}
        for i, (prompt, constraint, name) in enumerate(items):
            for method in METHODS:  # interleaved per prompt
                if method == "masked" and masked_items is not None and i >= masked_items:
                    continue
                limit = masked_max if method == "masked" and masked_max else max_new
                row = run_one(llm, prompt, constraint, method, limit, seed=i)
                row["item"] = name
                details[task][method].append(row)
                print(task, method, name[:40], row["finish"], repr(row["text"][:60]), f"{row['wall_s']:.1f}s",
                      flush=True)
    summary = {task: {m: summarise(rows) for m, rows in by.items()} for task, by in details.items()}
    check_based = ("pattern_matching", "grammar")
    reduction = min(summary[t]["masked"]["checks_per_token"] / max(summary[t]["awrs"]["checks_per_token"], 1e-9)
                    for t in check_based)
    result = {
        "bench": "constraints",
        "evals_per_token": {t: {m: round(s["checks_per_token"], 2) for m, s in by.items()}
                            for t, by in summary.items()},
        "eval_reduction_vs_masked": round(reduction, 1),
        "speedup_vs_masked": {t: round(summary[t]["awrs"]["tokens_per_s"] / max(summary[t]["masked"]["tokens_per_s"],
                                                                                  1e-9), 2) for t in summary},
        "tokens_per_s": {t: {m: round(s["tokens_per_s"], 2) for m, s in by.items()} for t, by in summary.items()},
        "valid_rate": {t: {m: round(s["valid_rate"], 3) for m, s in by.items()} for t, by in summary.items()},
        "returned_outputs_valid": all(s["returned_valid"] for by in summary.values() for s in by.values()),
        "peers": PEERS,
    }
    header = ["task", "method", "runs", "checks/token", "tokens/s", "valid rate", "returned outputs valid"]
    rows = [[t, m, s["runs"], s["checks_per_token"], s["tokens_per_s"], s["valid_rate"], s["returned_valid"]]
            for t, by in summary.items() for m, s in by.items()]
    write_results("constraints", result, md_table(header, rows), args.out, details=details)


PEERS = {  # they need their own venv (make setup-peers): measured side by side in bench/constraint_peers.py
    "outlines": "see constraint_peers (.venv-peers)",
    "genlm-control": "see constraint_peers (.venv-peers)",
}

if __name__ == "__main__":
    main()
