"""Constrained generation beside its peers: decodekit AWRS (+SMC) vs genlm-control AWRS vs outlines.

Same model (the default model's cached Hugging Face directory, float32), same prompts, constraints
and token limits as ``bench/constraints.py`` (pattern matching, JSON schemas, the arithmetic
grammar), one process, contenders interleaved per prompt:

- ``decodekit_awrs``, ``decodekit_awrs_smc5``: ``Constrained(..., sampler="awrs")``, 1 and 5 particles;
- ``genlm_awrs_smc5``: genlm-control 0.4.1 (the AWRS reference implementation), ``AWRS`` with
  ``smc(n_particles=5, ess_threshold=0.5)``; patterns through a byte-level potential calling the
  same ``regex``-module checks decodekit uses (most patterns use ``regex``-only syntax that
  ``BoolFSA.from_regex`` rejects), JSON through its ``JsonSchema``, the grammar through
  ``BoolCFG.from_lark``; its output is the top sequence of the decoded posterior;
- ``outlines``: outlines 1.3.3's transformers integration (full-vocabulary masking through
  outlines-core), sampling at temperature 1; building its index (a warm-up call) is timed as
  preparation, apart from generation.

A constraint a peer cannot express (a back-reference pattern for an automaton, a grammar feature)
is recorded as unsupported with the error. Needs ``make setup-peers`` (``.venv-peers``); ``decodekit
bench`` runs it with that venv's python.

    .venv-peers/bin/python -m decodekit.bench.constraint_peers [--quick]
"""

from __future__ import annotations

import asyncio
import time

from decodekit.bench.common import md_table, parser, write_results
from decodekit.bench.constraints import grammar_task, json_task, pattern_task, rates

CONTENDERS = ["decodekit_awrs", "decodekit_awrs_smc5", "genlm_awrs_smc5", "outlines"]


class Decodekit:
    def __init__(self, llm):
        self.llm = llm

    def prepare(self, constraint, prompt):
        return constraint

    def run(self, prepared, prompt, max_new, seed, particles):
        from decodekit.strategies.constrained import Constrained

        strategy = Constrained(prepared, sampler="awrs", num_particles=particles, ess_threshold=0.5)
        c = self.llm.generate(prompt, strategy=strategy, max_new_tokens=max_new, seed=seed)
        return c.text, len(c.token_ids), c.finish_reason != "constraint_failed"


class Genlm:
    """genlm-control's AWRS with SMC; its async API runs on a private event loop."""

    def __init__(self, model_dir: str):
        from genlm.control import PromptedLLM

        self.llm = PromptedLLM.from_name(model_dir, backend="hf")
        self.loop = asyncio.new_event_loop()

    def prepare(self, constraint, prompt):
        from genlm.control import AWRS, BoolCFG, JsonSchema

        kind = type(constraint).__name__
        if kind == "Regex":
            potential = _python_check(constraint)
        elif kind == "JsonSchema":
            potential = JsonSchema(constraint.schema)
        else:
            potential = BoolCFG.from_lark(constraint.lark_text)
        return AWRS(self.llm, potential.coerce(self.llm, f=b"".join))

    def run(self, sampler, prompt, max_new, seed, particles):
        self.llm.set_prompt_from_str(prompt)
        seqs = self.loop.run_until_complete(sampler.smc(n_particles=particles, ess_threshold=0.5,
                                                        max_tokens=max_new))
        posterior = seqs.decoded_posterior
        text = next(iter(posterior), None)
        tokens = sum(len(c) for c in seqs.contexts) / max(len(seqs.contexts), 1)
        return (text or ""), tokens, text is not None


class Outlines:
    def __init__(self, model, tokenizer):
        import outlines

        self.outlines = outlines
        self.model = outlines.from_transformers(model, tokenizer)
        self.tokenizer = tokenizer

    def prepare(self, constraint, prompt):
        from outlines.types import CFG, JsonSchema, Regex

        kind = type(constraint).__name__
        if kind == "Regex":
            term = Regex(constraint.pattern)
        elif kind == "JsonSchema":
            term = JsonSchema(constraint.schema)
        else:
            term = CFG(constraint.lark_text)
        generator = self.outlines.Generator(self.model, term)
        generator(prompt, max_new_tokens=1)  # builds the index over the vocabulary
        return generator

    def run(self, generator, prompt, max_new, seed, particles):
        import torch

        torch.manual_seed(seed)
        text = generator(prompt, max_new_tokens=max_new, do_sample=True, temperature=1.0, top_k=0)
        return text, len(self.tokenizer.encode(text, add_special_tokens=False)), True


def _python_check(constraint):
    """A genlm-control potential over bytes that asks ``constraint.prefix_ok`` / ``complete_ok``."""
    from genlm.control import Potential

    class PythonCheck(Potential):
        async def prefix(self, context):
            return 0.0 if constraint.prefix_ok(bytes(context)) else float("-inf")

        async def complete(self, context):
            return 0.0 if constraint.complete_ok(bytes(context)) else float("-inf")

    return PythonCheck(list(range(256)))


def contenders(llm, model: str) -> dict:
    from decodekit.models import hf_dir

    model_dir = str(hf_dir(model))
    dk = Decodekit(llm)
    out = {"decodekit_awrs": (dk, 1), "decodekit_awrs_smc5": (dk, 5)}
    for name, make in (("genlm_awrs_smc5", lambda: (Genlm(model_dir), 5)),
                       ("outlines", lambda: (Outlines(llm.backend.model, llm.tokenizer.hf), 1))):
        try:
            out[name] = make()
        except Exception as e:  # a peer that does not install or load is reported, not fatal
            out[name] = f"not run: {type(e).__name__}: {e}"[:300]
    return out


def run_item(runner, particles, constraint, prompt, max_new, seed) -> dict:
    t0 = time.perf_counter()
    try:
        prepared = runner.prepare(constraint, prompt)
    except Exception as e:
        return {"unsupported": f"{type(e).__name__}: {e}"[:300]}
    prepare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        text, tokens, returned = runner.run(prepared, prompt, max_new, seed, particles)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300], "prepare_s": prepare_s}
    wall = time.perf_counter() - t0
    valid = returned and constraint.complete_ok(text)
    return {"text": text, "tokens": tokens, "wall_s": wall, "prepare_s": prepare_s, "valid": valid}


def summarise(rows: list[dict]) -> dict:
    done = [r for r in rows if "wall_s" in r]
    speed = rates(done)
    return {"items": len(rows), "ran": len(done),
            "unsupported": sum("unsupported" in r for r in rows), "errors": sum("error" in r for r in rows),
            "tokens_per_s": round(speed["tokens_per_s"], 2),
            "prepare_s_total": round(sum(r.get("prepare_s", 0.0) for r in rows), 2),
            "valid_rate": round(speed["valid_rate"], 3)}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    from decodekit import LLM

    quick = args.quick
    llm = LLM(args.model, device=args.device or "cpu")
    plan = {"pattern_matching": (pattern_task(2 if quick else 4), 10 if quick else 16),
            "json": (json_task(1 if quick else 2, engine="outlines"), 24 if quick else 64),
            "grammar": (grammar_task(1 if quick else 2), 8 if quick else 14)}
    runners = contenders(llm, args.model)
    details = {task: {name: [] for name in CONTENDERS} for task in plan}
    for task, (items, max_new) in plan.items():
        for i, (prompt, constraint, label) in enumerate(items):
            for name in CONTENDERS:
                runner = runners[name]
                row = {"not_run": runner} if isinstance(runner, str) else run_item(*runner, constraint, prompt,
                                                                                  max_new, i)
                details[task][name].append({"item": label, **row})
                print(task, name, label[:40], {k: v for k, v in row.items() if k != "text"}, flush=True)
    summary = {task: {name: summarise(rows) for name, rows in by.items()} for task, by in details.items()}
    dk, genlm = "decodekit_awrs_smc5", "genlm_awrs_smc5"
    vs_genlm = {t: round(s[dk]["tokens_per_s"] / s[genlm]["tokens_per_s"], 2) if s[genlm]["tokens_per_s"] else None
                for t, s in summary.items()}
    result = {"bench": "constraint_peers",
              "tokens_per_s": {t: {n: s["tokens_per_s"] for n, s in by.items()} for t, by in summary.items()},
              "valid_rate": {t: {n: s["valid_rate"] for n, s in by.items()} for t, by in summary.items()},
              "decodekit_smc5_vs_genlm_smc5": vs_genlm,
              "not_run": {n: r for n, r in runners.items() if isinstance(r, str)},
              "unsupported": {t: {n: s["unsupported"] for n, s in by.items() if s["unsupported"]}
                              for t, by in summary.items()}}
    header = ["task", "contender", "items", "ran", "unsupported", "errors", "tokens/s", "prepare s", "valid rate"]
    rows = [[t, n, s["items"], s["ran"], s["unsupported"], s["errors"], s["tokens_per_s"], s["prepare_s_total"],
             s["valid_rate"]] for t, by in summary.items() for n, s in by.items()]
    write_results("constraint_peers", result, md_table(header, rows), args.out, details=details)


if __name__ == "__main__":
    main()
