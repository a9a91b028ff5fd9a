"""JSON Schema coverage: which schemas decodekit enforces, how exactly, and what generation costs.

Sections:

1. MaskBench (``../shared/data/jsonschemabench/maskbench``, 424 files ``{schema, tests}``): schemas
   accepted as constraints; for every valid instance, every byte prefix accepted (``prefix_ok``)
   and the whole accepted (``complete_ok``); every invalid instance refused by ``complete_ok``.
   Rows: decodekit's prefix checker on every schema (``JsonSchema(s, automaton=False)``, three
   layouts per instance: ``json.dumps`` default, indent 2, compact); decodekit's default as
   validation (three layouts) and, where the schema routes to llguidance, as its generation mask on
   every instance re-serialized in the canonical layout (``json_route.canonical_json``), with the
   routing's dev half (even positions) and held-out half counted apart; decodekit on outlines-core's
   automaton (``engine="outlines"``: its regex fixes property order and whitespace, so instances
   written in another order count as rejected prefixes there); outlines-core alone;
   and the peers llguidance and XGrammar (``.venv-peers``, run by ``bench/json_schema_peers.py``:
   compile time, per-token mask time with the SmolLM2 tokenizer).
2. JSON-Schema-Test-Suite (shipped in the ``jsonschema`` sdist, downloaded once into
   ``~/.cache/decodekit/jsonschema-suite``): draft2020-12 and draft7, optional folders aside;
   groups whose schema needs the suite's remote server are counted apart. Each instance is judged
   by ``complete_ok`` (and every prefix of a valid one by ``prefix_ok``); decodekit asserts
   ``format``, which the suite treats as an annotation, so those disagreements are counted apart.
3. Generation with SmolLM2 on 40 JSONSchemaBench schemas (half refused by outlines-core), the
   default engine (llguidance's mask or the checker with AWRS, compact layout), at most 128 new
   tokens, the prompt of ``common.json_schema_prompt`` (an instruction, one worked instance, the
   fields named), sampled at T = 1 (``generate``'s default): validity of every returned output,
   completion rate, ``fields_filled`` (share of optional top-level properties present), tokens/s; the
   same at greedy (``greedy``: does an unfinished answer come from sampling or from the model); and on
   schemas routed to
   the mask, the checker path (``engine="checker"``) vs the mask, interleaved per schema, the
   median of per-schema tokens/s ratios (``checker_vs_automaton``).

    python -m decodekit.bench.json_schema_coverage [--quick] [--sections maskbench,suite,peers,generation]

``--sections`` runs some sections and keeps the others from the last result file (same ``--quick``);
``sections_from`` in the result says when each section ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

from decodekit.bench.common import (
    DATA,
    ROOT,
    fields_filled,
    json_schema_prompt,
    md_table,
    median,
    optional_fields,
    parser,
    write_results,
)

SUITE_VERSION = "4.26.0"
SUITE_CACHE = Path.home() / ".cache" / "decodekit" / "jsonschema-suite"
SUITE_DRAFTS = {"draft2020-12": "https://json-schema.org/draft/2020-12/schema",
                "draft7": "http://json-schema.org/draft-07/schema#"}
REMOTE = "localhost:1234"  # the suite's remote-reference server


# ---- JSON-Schema-Test-Suite ----------------------------------------------------------------------
def suite_archive() -> tuple[Path | None, str]:
    """The jsonschema sdist (downloaded once with pip), or (None, why not)."""
    archive = SUITE_CACHE / f"jsonschema-{SUITE_VERSION}.tar.gz"
    if archive.exists():
        return archive, ""
    SUITE_CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"jsonschema=={SUITE_VERSION}", "--no-deps", "--no-binary",
           ":all:", "-d", str(SUITE_CACHE), "-q"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"could not download the jsonschema sdist: {e}"
    if proc.returncode != 0 or not archive.exists():
        return None, f"could not download the jsonschema sdist: {proc.stderr.strip()[-300:]}"
    return archive, ""


def suite_groups() -> tuple[list[dict] | None, str]:
    """Test groups ``{draft, file, description, schema, tests, remote}``, or (None, why not)."""
    archive, why = suite_archive()
    if archive is None:
        return None, why
    groups = []
    with tarfile.open(archive) as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            for draft, dialect in SUITE_DRAFTS.items():
                head = f"jsonschema-{SUITE_VERSION}/json/tests/{draft}/"
                name = member.name[len(head):]
                if not member.name.startswith(head) or "/" in name or not name.endswith(".json"):
                    continue  # optional/ and other folders aside
                for g in json.load(tf.extractfile(member)):
                    schema = g["schema"]
                    if isinstance(schema, dict) and "$schema" not in schema:
                        schema = {"$schema": dialect, **schema}
                    groups.append({"draft": draft, "file": name, "description": g["description"], "schema": schema,
                                   "tests": g["tests"], "remote": REMOTE in json.dumps(g["schema"])})
    return groups, ""


def judge_suite_group(group: dict) -> dict:
    """Construct the constraint (checker path) and judge each instance; format-only disagreements apart."""
    import jsonschema

    from decodekit.constraints import JsonSchema

    try:
        c = JsonSchema(group["schema"], automaton=False)
    except Exception as e:  # a schema the constraint refuses
        return {"accepted": False, "error": repr(e)[:200], "wrong": [], "prefix_rejected": [], "format_only": [],
                "instances": 0}
    plain = jsonschema.validators.validator_for(group["schema"])(group["schema"])  # format as annotation
    wrong, rejected, format_only = [], [], []
    for t in group["tests"]:
        raw = json.dumps(t["data"], ensure_ascii=False).encode()
        got = c.complete_ok(raw)
        if got != t["valid"]:
            (format_only if plain.is_valid(t["data"]) == t["valid"] and "format" in json.dumps(group["schema"])
             else wrong).append(t["description"])
            continue
        if t["valid"] and not all(c.prefix_ok(raw[:i]) for i in range(len(raw) + 1)):
            rejected.append(t["description"])
    return {"accepted": True, "wrong": wrong, "prefix_rejected": rejected, "format_only": format_only,
            "instances": len(group["tests"])}


def test_suite_section() -> dict:
    groups, why = suite_groups()
    if groups is None:
        return {"skipped": why}
    local = [g for g in groups if not g["remote"]]
    results = [judge_suite_group(g) for g in local]
    instances = sum(r["instances"] for r in results)
    judged = instances - sum(len(r["wrong"]) for r in results) - sum(len(r["format_only"]) for r in results)
    return {"schemas": len(local), "schemas_accepted": sum(r["accepted"] for r in results),
            "accepted_share": round(sum(r["accepted"] for r in results) / max(len(local), 1), 4),
            "remote_ref_groups_skipped": len(groups) - len(local), "instances": instances,
            "judged_as_suite": judged, "wrong": sum(len(r["wrong"]) for r in results),
            "format_asserted_disagreements": sum(len(r["format_only"]) for r in results),
            "valid_prefixes_rejected": sum(len(r["prefix_rejected"]) for r in results),
            "all_judged_as_suite": all(not r["wrong"] and not r["prefix_rejected"] for r in results),
            "examples_wrong": [(g["file"], g["description"], r["wrong"]) for g, r in zip(local, results)
                               if r["wrong"]][:10]}


# ---- MaskBench ------------------------------------------------------------------------------------
LAYOUTS = {"default": {}, "indent2": {"indent": 2}, "compact": {"separators": (",", ":")}}


def maskbench(quick: bool) -> list[tuple[str, dict]]:
    files = sorted((DATA / "jsonschemabench" / "maskbench").glob("*.json"))
    if not files:
        sys.exit(f"MaskBench not found under {DATA / 'jsonschemabench' / 'maskbench'}")
    return [(f.stem, json.loads(f.read_text())) for f in files[:: 16 if quick else 1]]  # --quick: every 16th


def _first_rejected_prefix(check, raw: bytes) -> int | None:
    return next((i for i in range(len(raw) + 1) if not check(raw[:i])), None)


def judge_instances(prefix_ok, complete_ok, tests, layouts) -> dict:
    """Counts for one schema: valid instances (per layout) with a rejected byte prefix or a rejected
    whole, invalid instances (default layout) accepted."""
    out = {"valid": 0, "valid_prefix_rejected": 0, "valid_rejected": 0, "invalid": 0, "invalid_accepted": 0}
    for t in tests:
        if not t["valid"]:
            out["invalid"] += 1
            out["invalid_accepted"] += bool(complete_ok(json.dumps(t["data"], ensure_ascii=False).encode()))
            continue
        for layout in layouts:
            raw = json.dumps(t["data"], ensure_ascii=False, **LAYOUTS[layout]).encode()
            out["valid"] += 1
            out["valid_prefix_rejected"] += _first_rejected_prefix(prefix_ok, raw) is not None
            out["valid_rejected"] += not complete_ok(raw)
    return out


def _add(total: dict, part: dict) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


def maskbench_section(items) -> tuple[dict, list]:
    """decodekit's checker on every schema; decodekit's default (validation, and llguidance's generation
    mask on canonical instances where the schema routes to it); decodekit on outlines-core's automaton
    (``engine="outlines"``) and that automaton alone."""
    from decodekit.constraints import JsonSchema

    rows = {name: {"schemas_accepted": 0, "of": len(items), "seconds": 0.0}
            for name in ("decodekit_checker", "decodekit_default", "decodekit_default_mask", "decodekit_outlines",
                         "outlines_core")}
    failures = []
    for position, (stem, d) in enumerate(items):
        t0 = time.perf_counter()
        checker = JsonSchema(d["schema"], automaton=False)
        _add(rows["decodekit_checker"], {"schemas_accepted": 1, **judge_instances(
            checker.prefix_ok, checker.complete_ok, d["tests"], list(LAYOUTS))})
        rows["decodekit_checker"]["seconds"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        default = JsonSchema(d["schema"])  # validation: exact in any layout
        counts = judge_instances(default.prefix_ok, default.complete_ok, d["tests"], list(LAYOUTS))
        _add(rows["decodekit_default"], {"schemas_accepted": 1, **counts})
        if default.engine == "llguidance":  # generation: the mask on canonical instances
            mask = judge_mask(default, d["schema"], d["tests"])
            _add(rows["decodekit_default_mask"], {"schemas_accepted": 1, **mask})
            half = "dev" if position % 2 == 0 else "held_out"
            _add(rows["decodekit_default_mask"], {f"{half}_schemas": 1, f"{half}_disagreements":
                                                  mask["valid_rejected"] + mask["invalid_accepted"]})
        rows["decodekit_default"]["seconds"] += time.perf_counter() - t0
        rows["decodekit_default"][f"engine_{default.engine}"] = rows["decodekit_default"].get(
            f"engine_{default.engine}", 0) + 1
        outlines = JsonSchema(d["schema"], engine="outlines", whitespace=r"[ ]?")
        dfa = outlines.byte_dfa()
        if dfa is not None:  # the automaton's regex allows one space: the default layout only
            _add(rows["decodekit_outlines"], {"schemas_accepted": 1, **judge_instances(
                outlines.prefix_ok, outlines.complete_ok, d["tests"], ["default"])})
            _add(rows["outlines_core"], {"schemas_accepted": 1, **judge_instances(  # no jsonschema at the end
                dfa.prefix_ok, dfa.complete_ok, d["tests"], ["default"])})
        failures += [stem] if counts["valid_prefix_rejected"] or counts["invalid_accepted"] else []
    for r in rows.values():
        r["seconds"] = round(r["seconds"], 1)
    return rows, failures


def judge_mask(constraint, schema, tests) -> dict:
    """llguidance's byte-level decisions on canonical instances: a valid one refused on the way or at
    the end; an invalid one the engine would end (mask complete and ``complete_ok``), or the mask alone."""
    from decodekit.constraints.guidance import ByteMatcher
    from decodekit.constraints.json_route import canonical_json

    matcher = ByteMatcher(constraint.mask_grammar())
    out = {"valid": 0, "valid_prefix_rejected": 0, "valid_rejected": 0, "invalid": 0, "invalid_accepted": 0,
           "invalid_mask_complete": 0}
    for t in tests:
        raw = canonical_json(t["data"], schema).encode()
        taken, complete = matcher.accepts(raw)
        if t["valid"]:
            out["valid"] += 1
            out["valid_prefix_rejected"] += taken < len(raw)
            out["valid_rejected"] += not complete
        else:
            out["invalid"] += 1
            out["invalid_mask_complete"] += complete
            out["invalid_accepted"] += complete and constraint.complete_ok(raw)
    return out


def peers_section(quick: bool) -> dict:
    """llguidance and XGrammar on MaskBench, in .venv-peers (bench/json_schema_peers.py)."""
    python = ROOT / ".venv-peers" / "bin" / "python"
    if not python.exists():
        return {"skipped": "no .venv-peers: make setup-peers, then .venv-peers/bin/pip install "
                           "'llguidance==1.9.*' 'xgrammar==0.2.*'"}
    cmd = [str(python), "-m", "decodekit.bench.json_schema_peers"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip()[-1500:]}
    return json.loads(lines[-1])


# ---- generation -----------------------------------------------------------------------------------
def generation_schemas(k: int, max_chars: int = 5000) -> tuple[list, list]:
    """``k`` JSONSchemaBench schemas small enough for a prompt, half that outlines-core compiles, half that
    it refuses; both lists of (name, text, schema). The ``schemas`` folder first (sorted by name); its
    few refused ones are topped up from MaskBench's schemas (same benchmark), smallest first."""
    compiled, refused = [], []
    for path in sorted((DATA / "jsonschemabench" / "schemas").glob("*/*.json")):
        _sort_schema(path.read_text(), f"{path.parent.name}/{path.name}", max_chars, compiled, refused, k)
        if len(compiled) >= k // 2 and len(refused) >= k - k // 2:
            break
    masks = sorted((DATA / "jsonschemabench" / "maskbench").glob("*.json"), key=lambda p: (p.stat().st_size, p.name))
    for path in masks:
        if len(refused) >= k - k // 2:
            break
        text = json.dumps(json.loads(path.read_text())["schema"])
        _sort_schema(text, f"maskbench/{path.stem}", max_chars, [], refused, k)
    return compiled[: k // 2], refused[: k - k // 2]


def _sort_schema(text: str, name: str, max_chars: int, compiled: list, refused: list, k: int) -> None:
    from decodekit.constraints import JsonSchema

    if len(text) > max_chars:
        return
    schema = json.loads(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            c = JsonSchema(schema, engine="outlines")  # the same 40 schemas as before the engine change
        except ValueError:
            return
    if c.byte_dfa() is not None and len(compiled) < k // 2:
        compiled.append((name, text, schema))
    elif c.byte_dfa() is None and len(refused) < k - k // 2:
        refused.append((name, text, schema))


def generate_one(llm, schema_text: str, constraint, max_new: int, seed: int, temperature: float = 1.0) -> dict:
    from decodekit.strategies.constrained import Constrained

    prompt = json_schema_prompt(schema_text)
    t0 = time.perf_counter()
    c = llm.generate(prompt, strategy=Constrained(constraint, sampler="awrs"), max_new_tokens=max_new, seed=seed,
                     temperature=temperature)
    wall = time.perf_counter() - t0
    done = c.finish_reason == "stop"
    ok = c.finish_reason == "constraint_failed" or constraint.complete_ok(c.text)  # what is returned is valid
    return {"finish": c.finish_reason, "completed": done and constraint.complete_ok(c.text), "returned_valid": ok,
            "tokens": len(c.token_ids), "wall_s": wall, "tokens_per_s": len(c.token_ids) / max(wall, 1e-9),
            "text": c.text[:300], "optional_fields": optional_fields(json.loads(schema_text), c.text)}


def generation_section(llm, quick: bool, checker_pairs: bool = True) -> tuple[dict, list]:
    """``checker_pairs=False``: only the default path (no ``checker_vs_automaton``)."""
    from decodekit.constraints import JsonSchema

    k, max_new = (4, 48) if quick else (40, 128)
    compiled, refused = generation_schemas(k)
    rows, defaults = [], []  # defaults: (schema text, its default-path constraint), compiled once
    for i, (name, text, schema) in enumerate(compiled + refused):
        auto = JsonSchema(schema)
        defaults.append((text, auto))
        path = "mask" if auto.engine == "llguidance" else "checker"
        runs = {path: auto}
        if path == "mask" and checker_pairs:  # the same schema through the checker, interleaved (ABBA)
            runs["checker"] = JsonSchema(schema, engine="checker")
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for which in order:
            row = generate_one(llm, text, runs[which], max_new, seed=i)
            rows.append({"schema": name, "path": which, "default": which == path,
                         "outlines_compiles": i < len(compiled), **row})
            print(name[:50], which, row["finish"], f"{row['tokens_per_s']:.1f} tok/s", repr(row["text"][:70]),
                  flush=True)
    main_rows = [r for r in rows if r["default"]]
    greedy = [generate_one(llm, text, auto, max_new, seed=i, temperature=0.0)
              for i, (text, auto) in enumerate(defaults)]
    pairs = {}
    for r in rows:
        if r["path"] == "mask" or not r["default"]:
            pairs.setdefault(r["schema"], {})[r["path"]] = r["tokens_per_s"]
    pairs = {k: v for k, v in pairs.items() if "mask" in v and "checker" in v}
    ratios = [p["checker"] / p["mask"] for p in pairs.values() if p.get("mask")]
    summary = {"schemas": len(main_rows), "outlines_refused": len(refused), "max_new_tokens": max_new,
               "valid_rate": round(sum(r["returned_valid"] for r in main_rows) / max(len(main_rows), 1), 4),
               "completed": sum(r["completed"] for r in main_rows),
               "completed_rate": round(sum(r["completed"] for r in main_rows) / max(len(main_rows), 1), 4),
               "fields_filled": fields_filled(r["optional_fields"] for r in main_rows),
               "temperature": 1.0,
               "greedy": {"completed_rate": round(sum(r["completed"] for r in greedy) / max(len(greedy), 1), 4),
                          "valid_rate": round(sum(r["returned_valid"] for r in greedy) / max(len(greedy), 1), 4),
                          "fields_filled": fields_filled(r["optional_fields"] for r in greedy),
                          "unfinished": [r["text"][:120] for r in greedy if not r["completed"]]},
               "tokens_per_s": round(sum(r["tokens"] for r in main_rows) / max(sum(r["wall_s"] for r in main_rows),
                                                                                 1e-9), 2),
               "mask_schemas": sum(r["path"] == "mask" for r in main_rows),
               "checker_tokens_per_s_median": round(median([p["checker"] for p in pairs.values()]), 2) if pairs
               else None,
               "mask_tokens_per_s_median": round(median([p["mask"] for p in pairs.values()]), 2) if pairs
               else None,
               "checker_vs_automaton": round(median(ratios), 3) if ratios else None,  # the mask is the automaton
               "checker_path_valid_rate": round(sum(r["returned_valid"] for r in rows if r["path"] == "checker")
                                                / max(sum(r["path"] == "checker" for r in rows), 1), 4)}
    return summary, rows


SECTIONS = ("maskbench", "suite", "peers", "generation")


def run_sections(args, sections) -> dict:
    """The parts of the result each section produces (``result`` keys and their details)."""
    out: dict = {}
    if "maskbench" in sections:
        items = maskbench(args.quick)
        mb_rows, mb_failures = maskbench_section(items)
        print("maskbench", json.dumps(mb_rows), flush=True)
        out["maskbench"] = maskbench_summary(mb_rows, mb_failures, len(items))
    if "suite" in sections:
        suite = test_suite_section()
        print("test_suite", json.dumps({k: v for k, v in suite.items() if k != "examples_wrong"}), flush=True)
        out["test_suite"] = {k: v for k, v in suite.items() if k != "examples_wrong"}
        out["test_suite_wrong"] = suite.get("examples_wrong")
    if "peers" in sections:
        out["peers"] = peers_section(args.quick)
        print("peers", json.dumps(out["peers"])[:2000], flush=True)
    if "generation" in sections:
        from decodekit.api import LLM

        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        out["generation"], out["generation_rows"] = generation_section(llm, args.quick, args.checker_pairs)
    return out


def maskbench_summary(mb_rows: dict, mb_failures: list, num_items: int) -> dict:
    checker = mb_rows["decodekit_checker"]
    return {"schemas_accepted": checker["schemas_accepted"], "of": num_items,
            "valid_prefixes_rejected": checker["valid_prefix_rejected"],
            "invalid_accepted": checker["invalid_accepted"],
            "valid_instances_judged": checker["valid"], "invalid_instances": checker["invalid"],
            "default_mask": {k: mb_rows["decodekit_default_mask"].get(k, 0) for k in (
                "schemas_accepted", "valid", "valid_rejected", "invalid", "invalid_accepted",
                "invalid_mask_complete", "dev_schemas", "dev_disagreements", "held_out_schemas",
                "held_out_disagreements")},
            "rows": mb_rows, "default_constraint_failures": mb_failures[:20]}


def earlier_parts(out_dir: str, quick: bool) -> dict:
    """The sections of the last result file written with the same ``--quick``, with its date (a run of
    some sections keeps the others from it, and says so)."""
    path = Path(out_dir) / "json_schema_coverage.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if old.get("quick") != quick:
        return {}
    details = old.get("details") or {}
    parts = {k: old[k] for k in ("maskbench", "test_suite", "peers", "generation") if k in old}
    parts |= {"test_suite_wrong": details.get("test_suite_wrong"), "generation_rows": details.get("generation")}
    return {"date": old.get("date"), "parts": parts, "from": old.get("sections_from", {})}


def main():
    p = parser(__doc__)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run ({', '.join(SECTIONS)}); the others are kept from the "
                        "last result file of the same --quick, with their date")
    p.add_argument("--no-checker-pairs", dest="checker_pairs", action="store_false",
                   help="generation: the default path only, not each mask schema again through the checker")
    args = p.parse_args()
    sections = [x for x in args.sections.split(",") if x]
    if set(sections) - set(SECTIONS):
        p.error(f"unknown sections {sorted(set(sections) - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
    t0 = time.perf_counter()
    parts = run_sections(args, sections)
    now = time.strftime("%Y-%m-%d %H:%M")
    sections_from = {name: now for name in SECTIONS if name in sections}
    earlier = earlier_parts(args.out, args.quick) if len(sections) < len(SECTIONS) else {}
    keys = {"maskbench": ("maskbench",), "suite": ("test_suite", "test_suite_wrong"), "peers": ("peers",),
            "generation": ("generation", "generation_rows")}
    for name in SECTIONS:
        if name not in sections and earlier:
            parts |= {k: earlier["parts"].get(k) for k in keys[name]}
            sections_from[name] = earlier["from"].get(name, earlier["date"])
    result = {"bench": "json_schema_coverage", "quick": args.quick,
              **{k: parts.get(k) for k in ("maskbench", "test_suite", "generation", "peers")},
              "sections_from": sections_from, "seconds": round(time.perf_counter() - t0, 1)}
    details = {"generation": parts.get("generation_rows"), "test_suite_wrong": parts.get("test_suite_wrong")}
    write_results("json_schema_coverage", result, result_tables(parts), args.out, details=details)


def result_tables(parts: dict) -> str:
    header = ["maskbench row", "schemas accepted", "valid instances", "valid with a rejected prefix",
              "valid rejected", "invalid", "invalid accepted"]
    rows = {**((parts.get("maskbench") or {}).get("rows") or {}), **((parts.get("peers") or {}).get("rows") or {})}
    table = [[name, r["schemas_accepted"], r.get("valid", 0), r.get("valid_prefix_rejected", 0),
              r.get("valid_rejected", 0), r.get("invalid", 0), r.get("invalid_accepted", 0)]
             for name, r in rows.items()]
    suite = [list(kv) for kv in (parts.get("test_suite") or {}).items()]
    md = md_table(header, table) + "\n\n" + md_table(["test suite", "value"], suite)
    return md + "\n\n" + md_table(["generation", "value"], [list(kv) for kv in (parts.get("generation") or {}).items()])


if __name__ == "__main__":
    main()
