"""MaskBench for the peer mask engines, llguidance 1.9 and XGrammar 0.2 (run in ``.venv-peers``).

For each MaskBench schema: compile (time), then for each valid instance (``json.dumps`` default
layout, SmolLM2 tokens) every token must be allowed and the end accepting; each invalid instance
must be refused somewhere. The per-token mask time is the time to compute the full-vocabulary
mask before each token of the valid instances. Options: llguidance's defaults (flexible
whitespace); XGrammar ``any_whitespace=True, strict_mode=False`` (properties in schema order,
its default). ``bench/json_schema_coverage.py`` runs this script and reports its last line.

    .venv-peers/bin/python -m decodekit.bench.json_schema_peers [--quick]
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time

from decodekit.bench.common import median

MASK_TOKENS = 64  # mask timings per instance (the first tokens); acceptance is checked on all of them


def load(quick: bool) -> list[tuple[str, dict]]:
    from decodekit.bench.json_schema_coverage import maskbench

    return maskbench(quick)


class Llguidance:
    name = "llguidance"

    def __init__(self, hf_tokenizer):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(hf_tokenizer)

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema)
        error = self.ll.LLMatcher.validate_grammar(grammar, self.tok)
        if error:
            raise ValueError(error)
        return grammar

    def run(self, grammar, ids, masks: list | None) -> bool:
        m = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        for i, t in enumerate(ids):
            if masks is not None and i < MASK_TOKENS:
                t0 = time.perf_counter()
                m.compute_bitmask()
                masks.append(time.perf_counter() - t0)
            if not m.consume_token(t):
                return False
        return m.is_accepting() and not m.is_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, hf_tokenizer):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer)
        self.compiler = xgr.GrammarCompiler(self.info)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=False)

    def run(self, compiled, ids, masks: list | None) -> bool:
        m = self.xgr.GrammarMatcher(compiled)
        bitmask = self.xgr.allocate_token_bitmask(1, self.info.vocab_size)
        for i, t in enumerate(ids):
            if masks is not None and i < MASK_TOKENS:
                t0 = time.perf_counter()
                m.fill_next_token_bitmask(bitmask)
                masks.append(time.perf_counter() - t0)
            if not m.accept_token(t):
                return False
        return m.is_completed()


def evaluate(engine, items, encode) -> dict:
    row = {"schemas_accepted": 0, "of": len(items), "valid": 0, "valid_prefix_rejected": 0, "invalid": 0,
           "invalid_accepted": 0}
    compile_s, masks, errors = [], [], {}
    for stem, d in items:
        t0 = time.perf_counter()
        try:
            compiled = engine.compile(d["schema"])
        except Exception as e:  # each engine raises its own error types
            errors[stem] = str(e)[:160]
            continue
        compile_s.append(time.perf_counter() - t0)
        row["schemas_accepted"] += 1
        for t in d["tests"]:
            ids = encode(json.dumps(t["data"], ensure_ascii=False))
            key = "valid" if t["valid"] else "invalid"
            row[key] += 1
            ok = engine.run(compiled, ids, masks if t["valid"] else None)
            if t["valid"]:
                row["valid_prefix_rejected"] += not ok
            else:
                row["invalid_accepted"] += ok
    row["compile_ms_median"] = round(1000 * median(compile_s), 2) if compile_s else None
    row["compile_s_total"] = round(sum(compile_s), 2)
    row["mask_us_per_token_median"] = round(1e6 * median(masks), 1) if masks else None
    row["mask_us_per_token_mean"] = round(1e6 * sum(masks) / len(masks), 1) if masks else None
    row["compile_errors_example"] = dict(list(errors.items())[:5])
    return row


def main():
    quick = "--quick" in sys.argv
    from transformers import AutoTokenizer

    from decodekit.models import hf_dir

    hf = AutoTokenizer.from_pretrained(str(hf_dir("smollm2-135m")))
    items = load(quick)

    def encode(text: str) -> list[int]:
        return hf.encode(text, add_special_tokens=False)

    rows, versions = {}, {}
    for cls, module in ((Llguidance, "llguidance"), (Xgrammar, "xgrammar")):
        try:
            engine = cls(hf)
            versions[cls.name] = importlib.metadata.version(module)
        except ImportError as e:
            rows[cls.name] = {"skipped": f"not installed: {e}"}
            continue
        rows[cls.name] = evaluate(engine, items, encode)
        print(cls.name, json.dumps(rows[cls.name]), flush=True)
    print(json.dumps({"rows": rows, "versions": versions, "tokenizer": "smollm2-135m", "quick": quick}))


if __name__ == "__main__":
    main()
