"""Constrained decoding in batches on the mask engine (llguidance) vs the same requests unconstrained.

Batches of 1, 8 and 16 requests, each with its own JSON schema (``../shared/data/jsonschemabench/
schemas``, schemas the default engine routes to llguidance, at most 600 characters; the chat prompt of
``common.json_schema_prompt``), and 8 requests
each with its own regular expression (``../shared/data/pattern_matching``, patterns llguidance
compiles), greedy and T = 0.7 (seeded), on the transformers backend. All requests of a batch go into
one engine and step together; batch 1 runs the first ``SINGLES`` schemas one at a time (one answer of a
dozen tokens would time little but its first steps), their decode tokens and seconds summed. Plain: the
same prompts and sampling, unconstrained, each with ``max_new_tokens`` = the tokens its constrained twin
produced and EOS ignored, so both do the same work. Rounds interleave constrained and plain (ABBA);
``vs_plain`` is the median over rounds of the same-round ratio of decode tokens/s (from the step where
every prompt is prefilled: prefill is the same work on both sides and would dilute the ratio; greedy;
``vs_plain_sampled``: T = 0.7; the end-to-end ratios are in the details).

Also: per-token constraint checks of a ``Predicate`` (the same character class as a Python function:
the exact descending walk, greedy, number prompts: its mean and p99); llguidance's per-token mask
time (p50 / p99 over every mask computed) and the full per-token constraint CPU time (mask, EOS
check, advance: replayed on the outputs); compile time over the MaskBench sample; decodekit on
outlines-core's automaton (``engine="outlines"``, same backend, compile excluded) at batch 1; outlines
1.3.3 itself where ``.venv-peers`` exists. ``valid_rate``: share of returned constrained outputs
(``constraint_failed`` aside: no text is returned as valid there) valid under the constraint's exact
check; ``completed_rate``: share of all constrained requests ended by EOS within the token limit;
``fields_filled``: share of optional top-level properties present in the JSON outputs;
``masks_beside_forward``: json/8 and regex/8 greedy with the next masks filled on a worker thread while
the forward runs (the default) vs by each draw, interleaved: tokens/s ratio and mask time per token left
on the decode path.

    python -m decodekit.bench.constrained_batch [--quick]
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

from decodekit.bench.common import (
    DATA,
    ROOT,
    json_schema_prompt,
    md_table,
    median,
    optional_fields,
    paired_ratio,
    parser,
    patterns,
    write_results,
)
from decodekit.bench.common import fields_filled as filled_share

BATCHES = {"json/1": ("json", 1), "json/8": ("json", 8), "json/16": ("json", 16), "regex/8": ("regex", 8)}
TEMPERATURES = {"greedy": 0.0, "t0.7": 0.7}
NUMBER_PROMPTS = ["Count from 1 to 20: 1, 2, 3,", "The year 1984 and the year", "3.14159 is pi; e is",
                  "Phone: 555-0100, fax:", "Totals: 12, 47, 93,", "Coordinates 40.7128 N,", "Version 2.3.1 then",
                  "Scores were 88, 92 and"]


def json_items(k: int) -> list[tuple[str, object, dict]]:
    from decodekit.constraints import JsonSchema

    out = []
    for path in sorted((DATA / "jsonschemabench" / "schemas").glob("*/*.json")):
        text = path.read_text()
        if len(text) > 600:
            continue
        try:
            schema = json.loads(text)
            c = JsonSchema(schema)
        except ValueError:
            continue
        if c.engine != "llguidance":
            continue
        out.append((json_schema_prompt(text), c, schema))
        if len(out) == k:
            break
    return out


def regex_items(k: int) -> list[tuple[str, object, str]]:
    from decodekit.constraints import Regex

    rows = patterns()
    out = []
    for p in random.Random(2).sample(rows, len(rows)):
        try:
            c = Regex(p)
        except ValueError:
            continue
        if c.engine == "llguidance":
            out.append((f"Write a string that matches the regular expression {p}\nString: ", c, p))
        if len(out) == k:
            break
    return out


def peer_regex_items(k: int) -> list[tuple[str, object, str]]:
    """``regex_items``' kind for the batch-1 peer comparison, restricted to patterns whose shortest match
    has at least ``MIN_PEER_TOKENS`` characters (``re``'s parser where it reads the pattern): answers of a
    token or two time the prefill, not decoding."""
    import re._parser as re_parser  # the stdlib's own pattern widths

    out = []
    for prompt, c, p in regex_items(10_000):
        try:
            shortest = re_parser.parse(p).getwidth()[0]
        except Exception:  # syntax only the `regex` module reads
            continue
        if shortest >= MIN_PEER_TOKENS:
            out.append((prompt, c, p))
        if len(out) == k:
            break
    return out


SINGLES = 4  # batch 1: this many requests, each alone in the engine


def run_singles(llm, items, temperature: float, max_new, constrained: bool) -> dict:
    """``run_batch`` on each item alone (seeds as in a batch), as one run: times and tokens summed."""
    runs = [run_batch(llm, [item], temperature, max_new if isinstance(max_new, int) else [max_new[i]],
                      constrained, seed=i) for i, item in enumerate(items)]
    summed = {k: sum(r[k] for r in runs) for k in ("wall_s", "decode_s", "decode_tokens")}
    return summed | {k: [x for r in runs for x in r[k]] for k in runs[0] if k not in summed}


def run_batch(llm, items, temperature: float, max_new, constrained: bool, seed: int = 0) -> dict:
    """One batch through one engine; ``max_new``: an int, or one per item (plain twins, EOS ignored)."""
    from decodekit.api import sampling_params
    from decodekit.strategies.constrained import Constrained

    engine = llm.engine
    requests = []
    for i, (prompt, constraint, _) in enumerate(items):
        limit = max_new if isinstance(max_new, int) else max(1, max_new[i])
        params = sampling_params(max_new_tokens=limit, temperature=temperature, seed=seed + i,
                                 ignore_eos=not constrained)
        text, ids = llm.encode_prompt(prompt)
        strategy = Constrained(constraint) if constrained else None
        requests.append(engine.add_request(ids, params, strategy, prompt=text, stream=False))
    ours = {r.request_id for r in requests}
    started: set[str] = set()
    t0 = time.perf_counter()
    decode_t0, decode_tokens = None, 0
    while engine.has_unfinished():
        events = [e for e in engine.step() if e.request_id in ours]
        if decode_t0 is not None:
            decode_tokens += sum(len(e.token_ids) for e in events)
        started |= {e.request_id for e in events if e.token_ids}
        if decode_t0 is None and started == ours:  # every prompt prefilled: decoding from here on
            decode_t0 = time.perf_counter()
    end = time.perf_counter()
    done = [engine.pop_completion(r.request_id) for r in requests]
    decode_s = end - decode_t0 if decode_t0 is not None else 0.0
    return {"wall_s": end - t0, "decode_s": decode_s, "decode_tokens": decode_tokens,
            "tokens": [len(c.token_ids) for c in done], "texts": [c.text for c in done],
            "finish": [c.finish_reason for c in done], "token_ids": [list(c.token_ids) for c in done],
            "errors": [c.stats.extra.get("constraint_error") for c in done],
            "checks": [[p.detail.get("checks", 0) for p in c.choices[0].provenance] for c in done]}


def warm(llm, items) -> None:
    """Compile every constraint for this tokenizer (timed apart) and warm the model once."""
    for _, constraint, _ in items:
        constraint.index(llm.tokenizer)
    run_batch(llm, items, 0.0, 4, constrained=False)
    run_batch(llm, items, 0.0, 4, constrained=True)


def throughput(llm, tasks: dict, rounds: int, max_new: int, details: dict) -> dict:
    ratios: dict = {}
    for key, (task, size) in BATCHES.items():
        items = tasks[task][:size if size > 1 else SINGLES]
        run = run_batch if size > 1 else run_singles
        for label, temperature in TEMPERATURES.items():
            rows = details.setdefault(f"{key}/{label}", [])
            con_rate, plain_rate = [], []
            lengths = None
            for r in range(rounds):  # seeded alike every round: the same work, ABBA order
                if r % 2 and lengths is not None:
                    twin = run(llm, items, temperature, lengths, False)
                    first = run(llm, items, temperature, max_new, True)
                else:
                    first = run(llm, items, temperature, max_new, True)
                    twin = run(llm, items, temperature, first["tokens"], False)
                lengths = first["tokens"]
                con_rate.append(_decode_rate(first))
                plain_rate.append(_decode_rate(twin))
                rows.append({"round": r, "constrained": _slim(first), "plain_tokens_per_s": plain_rate[-1],
                             "constrained_tokens_per_s": con_rate[-1],
                             "end_to_end_ratio": (sum(first["tokens"]) / first["wall_s"])
                             / max(sum(twin["tokens"]) / twin["wall_s"], 1e-9)})
            ratios[f"{key}/{label}"] = round(paired_ratio(con_rate, plain_rate), 3)
            print(key, label, f"constrained {median(con_rate):.1f} tok/s, plain {median(plain_rate):.1f} tok/s,"
                  f" ratio {ratios[f'{key}/{label}']}", flush=True)
    return ratios


def _decode_rate(run: dict) -> float:
    """Tokens/s after every prompt is prefilled (prefill is the same work on both sides); the whole
    run's rate where decoding never started (one-token answers)."""
    if run["decode_tokens"] and run["decode_s"] > 0:
        return run["decode_tokens"] / run["decode_s"]
    return sum(run["tokens"]) / max(run["wall_s"], 1e-9)


def _slim(run: dict) -> dict:
    keys = ("wall_s", "decode_s", "decode_tokens", "tokens", "texts", "finish", "errors")
    return {k: run[k] for k in keys} | {"token_ids": run["token_ids"]}


def predicate_checks(llm, rounds_items: int, max_new: int) -> dict:
    """Checks per token of the descending walk for a Python predicate, greedy, number prompts."""
    import regex

    from decodekit.constraints import Predicate

    pattern = regex.compile("[a-z ]{10,60}")
    constraint = Predicate(lambda s: pattern.fullmatch(s, partial=True) is not None,
                           lambda s: pattern.fullmatch(s) is not None)
    items = [(p, constraint, p) for p in NUMBER_PROMPTS[:rounds_items]]
    run = run_batch(llm, items, 0.0, max_new, True)
    checks = sorted(c for per in run["checks"] for c in per)
    p99 = checks[min(len(checks) - 1, int(0.99 * len(checks)))] if checks else 0
    return {"mean": round(sum(checks) / max(len(checks), 1), 1), "p99": p99, "tokens": len(checks),
            "valid_rate": sum(constraint.complete_ok(t) for t in run["texts"]) / len(items)}


def constraint_times(llm, details: dict, tasks: dict) -> dict:
    """Per-token constraint CPU time replayed on the outputs: mask (fill + unpack), EOS check, advance."""
    from decodekit.constraints.tokens import token_bytes

    pieces = token_bytes(llm.tokenizer)
    times = []
    for key, rows in details.items():
        items = tasks[key.split("/")[0]]
        for row in rows[:1]:
            for (_, constraint, _), ids in zip(items, row["constrained"]["token_ids"]):
                index = constraint.index(llm.tokenizer)
                state, text = index.initial(), b""
                for tok in ids:
                    if tok in llm.tokenizer.eos_token_ids:
                        break
                    t0 = time.perf_counter()
                    state._ids = None  # computed afresh, as decoding did
                    index.allowed_ids(state)
                    constraint.complete_ok(text)
                    nxt = index.next(state, tok)
                    times.append((time.perf_counter() - t0) * 1e6)
                    if nxt is None:
                        break
                    state, text = nxt, text + (pieces[tok] or b"")
    times.sort()
    pick = (lambda q: round(times[min(len(times) - 1, int(q * len(times)))], 1)) if times else (lambda q: None)
    return {"p50": pick(0.5), "p99": pick(0.99), "tokens": len(times)}


def mask_times(tasks: dict, llm) -> dict:
    us = sorted(t for items in tasks.values() for _, c, _ in items
                if (index := c.index(llm.tokenizer)) is not None for t in index.mask_us)
    pick = (lambda q: round(us[min(len(us) - 1, int(q * len(us)))], 1)) if us else (lambda q: None)
    return {"p50": pick(0.5), "p99": pick(0.99), "masks": len(us)}


def compile_times(llm, quick: bool) -> dict:
    """llguidance compile time per MaskBench schema the default engine routes to it (SmolLM2 tokenizer)."""
    from decodekit.constraints import JsonSchema
    from decodekit.constraints.guidance import GuidanceIndex

    files = sorted((DATA / "jsonschemabench" / "maskbench").glob("*.json"))
    files = files[:60] if quick else files
    ms, routed = [], {"llguidance": 0, "checker": 0, "refused": 0}
    for path in files:
        try:
            c = JsonSchema(json.loads(path.read_text())["schema"])
        except ValueError:
            routed["refused"] += 1
            continue
        routed[c.engine] += 1
        if c.engine == "llguidance":
            ms.append(GuidanceIndex(c.mask_grammar(), llm.tokenizer).compile_ms)
    ms.sort()
    return {"p50": round(median(ms), 2) if ms else None, "p99": round(ms[int(0.99 * (len(ms) - 1))], 2) if ms
            else None, "schemas": len(files), "routed": routed}


def outlines_core_bs1(llm, tasks: dict, max_new: int) -> dict:
    """decodekit on outlines-core's automaton (engine='outlines'), batch 1, greedy, compile excluded,
    vs the llguidance engine on the same items (each run interleaved)."""
    from decodekit.constraints import JsonSchema, Regex

    out = {}
    for task in ("json", "regex"):
        ratios, skipped = [], 0
        for prompt, c, source in tasks[task][:4]:
            try:
                other = (JsonSchema(source, engine="outlines") if task == "json" else Regex(source, engine="outlines"))
                if other.engine != "outlines" or other.index(llm.tokenizer) is None:
                    raise ValueError("outlines-core refuses it")
            except ValueError:
                skipped += 1
                continue
            ours = run_batch(llm, [(prompt, c, source)], 0.0, max_new, True)
            theirs = run_batch(llm, [(prompt, other, source)], 0.0, max_new, True)
            ratios.append((sum(ours["tokens"]) / ours["wall_s"]) / max(sum(theirs["tokens"]) / theirs["wall_s"], 1e-9))
        out[task] = round(median(ratios), 3) if ratios else None
        out[f"{task}_items"] = len(ratios)
    return out


def overlap_effect(llm, tasks: dict, rounds: int, max_new: int, keys=("json/8", "regex/8")) -> dict:
    """Masks filled beside the forward (``engine.overlap`` on; the default where the forward leaves a
    core free) vs by each draw (off: as before), greedy, the same items, ABBA rounds in this process: the
    same-round ratio of decode tokens/s, and the mask time per token left on the decode path (draws
    getting their allowed ids, plus the step's wait for the worker thread after its forward)."""
    out, default = {}, llm.engine.overlap
    for key in keys:
        task, size = BATCHES[key]
        items = tasks[task][:size]
        indexes = [c.index(llm.tokenizer) for _, c, _ in items]
        rates = {True: [], False: []}
        path = {True: [0.0, 0], False: [0.0, 0]}  # mask microseconds on the path, tokens
        for r in range(2 * rounds):
            for overlap in ((True, False) if r % 2 == 0 else (False, True)):
                llm.engine.overlap = overlap
                for index in indexes:
                    index.path_us.clear()
                wait = llm.engine.stats()["beside_wait_s"]
                run = run_batch(llm, items, 0.0, max_new, True)
                rates[overlap].append(_decode_rate(run))
                path[overlap][0] += sum(sum(ix.path_us) for ix in indexes) + 1e6 * (
                    llm.engine.stats()["beside_wait_s"] - wait)
                path[overlap][1] += sum(run["tokens"])
        llm.engine.overlap = default
        out[key] = {"on_vs_off": round(paired_ratio(rates[True], rates[False]), 3),
                    "mask_path_us_per_token": {("on" if k else "off"): round(us / max(n, 1), 1)
                                               for k, (us, n) in path.items()},
                    "tokens_per_s": {("on" if k else "off"): round(median(v), 2) for k, v in rates.items()}}
        print("overlap", key, out[key], flush=True)
    return out


def fields_filled(tasks: dict, details: dict) -> float | None:
    pairs = [optional_fields(schema, text) for key, rows in details.items() if key.startswith("json/") for row in rows
             for (_, _, schema), text in zip(tasks["json"], row["constrained"]["texts"])]
    return filled_share(pairs)


PEER_ITEMS = 4  # per task at batch 1, greedy
MIN_PEER_TOKENS = 8  # a shorter answer's tokens/s is mostly its prefill: such items are not compared


def outlines_peer(args, llm, tasks: dict, max_new: int) -> dict:
    """``vs_outlines_bs1``: decodekit's default engine vs outlines 1.3.3 (``.venv-peers``, this script with
    ``--peer outlines``) at batch 1, greedy, the same model on the transformers backend, the same prompts,
    compile time excluded on both sides: the median over items of the tokens/s ratio, over items where
    both answers have at least ``MIN_PEER_TOKENS`` tokens (JSON: the first schemas of the batches; regex:
    ``peer_regex_items``). The two run in separate processes one after
    the other (not interleaved)."""
    python = ROOT / ".venv-peers" / "bin" / "python"
    if not python.exists():
        return {"json": None, "regex": None,
                "not_run": "outlines not installed: .venv-peers is missing; set it up with `make setup-peers`"}
    cmd = [str(python), "-m", "decodekit.bench.constrained_batch", "--peer", "outlines", "--model", args.model,
           "--max-new", str(max_new)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"json": None, "regex": None, "not_run": f"exit {proc.returncode}: {proc.stderr[-300:]}"}
    theirs = json.loads(lines[-1])
    out = {}
    peer_tasks = {"json": tasks["json"][:PEER_ITEMS], "regex": peer_regex_items(PEER_ITEMS)}
    for task in ("json", "regex"):
        ratios, lengths = [], []
        for i, (prompt, c, source) in enumerate(peer_tasks[task]):
            peer = theirs[task][i]
            if peer is None:  # outlines could not compile it
                continue
            ours = run_batch(llm, [(prompt, c, source)], 0.0, max_new, True)
            lengths.append([sum(ours["tokens"]), peer["tokens"]])
            if min(lengths[-1]) >= MIN_PEER_TOKENS:
                ratios.append((sum(ours["tokens"]) / ours["wall_s"]) / max(peer["tokens_per_s"], 1e-9))
        out[task] = round(median(ratios), 3) if ratios else None
        out[f"{task}_items"] = len(ratios)
        out[f"{task}_tokens_ours_theirs"] = lengths
    out["outlines"] = theirs
    return out


def run_outlines(args) -> None:
    """Peer mode (inside .venv-peers): outlines 1.3.3 at batch 1, greedy, on the items ``main`` uses; per
    item tokens/s (index build timed apart) and whether the output is valid, or None where it refuses."""
    import outlines
    from decodekit.bench.constraint_peers import Outlines

    from decodekit import LLM

    llm = LLM(args.model, device="cpu")
    runner = Outlines(llm.backend.model, llm.tokenizer.hf)
    tasks = {"json": json_items(16)[:PEER_ITEMS], "regex": peer_regex_items(PEER_ITEMS)}
    out: dict = {"version": outlines.__version__ if hasattr(outlines, "__version__") else "1.3.3"}
    for task, items in tasks.items():
        out[task] = []
        for prompt, constraint, _ in items:
            text = prompt if isinstance(prompt, str) else llm.tokenizer.hf.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True)
            try:
                t0 = time.perf_counter()
                generator = runner.prepare(constraint, text)  # the index over the vocabulary
                compile_s = time.perf_counter() - t0
            except Exception as e:  # a schema or pattern outlines cannot compile: not counted
                out[task].append(None)
                print("outlines refuses", type(e).__name__, str(e)[:100], file=sys.stderr)
                continue
            t0 = time.perf_counter()
            answer = generator(text, max_new_tokens=args.max_new, do_sample=False)
            wall = time.perf_counter() - t0
            tokens = len(llm.tokenizer.hf.encode(answer, add_special_tokens=False))
            out[task].append({"tokens_per_s": tokens / max(wall, 1e-9), "tokens": tokens,
                              "compile_s": round(compile_s, 2), "valid": constraint.complete_ok(answer)})
    print(json.dumps(out))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peer", choices=["outlines"], help="internal: run a peer in its own venv")
    args = p.parse_args()
    if args.peer == "outlines":
        return run_outlines(args)
    from decodekit import LLM

    quick = args.quick
    max_new = 24 if quick else args.max_new
    rounds = 1 if quick else args.rounds
    llm = LLM(args.model, device=args.device)
    tasks = {"json": json_items(16), "regex": regex_items(8)}
    for items in tasks.values():
        warm(llm, items)
    details: dict = {}
    ratios = throughput(llm, tasks, rounds, max_new, details)
    predicate = predicate_checks(llm, 2 if quick else 8, 16 if quick else 48)
    runs = [r["constrained"] for rows in details.values() for r in rows]
    outputs = [(items[i][1], text, fin) for key, rows in details.items() for r in rows
               for items in [tasks[key.split("/")[0]]] for i, (text, fin) in
               enumerate(zip(r["constrained"]["texts"], r["constrained"]["finish"]))]
    returned = [(c, text) for c, text, fin in outputs if fin != "constraint_failed"]
    valid = [c.complete_ok(text) for c, text in returned]
    result = {
        "bench": "constrained_batch",
        "vs_plain": {key: ratios[f"{key}/greedy"] for key in BATCHES},
        "vs_plain_sampled": {key: ratios[f"{key}/t0.7"] for key in BATCHES},
        "checks_per_token_predicate": {"mean": predicate["mean"], "p99": predicate["p99"]},
        "mask_us_p50": None, "mask_us_p99": None,
        "compile_ms_p50": None,
        "vs_outlines_bs1": None,
        "valid_rate": round(sum(valid) / max(len(valid), 1), 3),
        "completed_rate": round(sum(f == "stop" for _, _, f in outputs) / max(len(outputs), 1), 3),
        "constraint_failed_rate": round(1 - len(returned) / max(len(outputs), 1), 3),
        "dead_ends": sum(bool(e) and "dead end" in e for rows in details.values() for r in rows
                         for e in r["constrained"]["errors"]),
        "fields_filled": fields_filled(tasks, details),
        "quick": quick,
        "max_new_tokens": max_new,
        "rounds": rounds,
    }
    masks = mask_times(tasks, llm)
    result["mask_us_p50"], result["mask_us_p99"] = masks["p50"], masks["p99"]
    result["constraint_us_per_token"] = constraint_times(llm, details, tasks)
    compiles = compile_times(llm, quick)
    result["compile_ms_p50"] = compiles["p50"]
    result["compile_ms_p99"] = compiles["p99"]
    result["maskbench_routing"] = compiles["routed"]
    result["vs_outlines_bs1"] = outlines_peer(args, llm, tasks, max_new)
    result["vs_outlines_core_bs1"] = outlines_core_bs1(llm, tasks, max_new)
    result["masks_beside_forward"] = overlap_effect(llm, tasks, rounds, max_new)
    result["outputs"] = len(outputs)
    header = ["batch", "temperature", "constrained / plain tokens/s"]
    rows = [[key.rsplit("/", 1)[0], key.rsplit("/", 1)[1], ratio] for key, ratio in ratios.items()]
    table = md_table(header, rows) + "\n\n" + md_table(
        ["figure", "value"], [[k, json.dumps(v)] for k, v in result.items() if k not in ("vs_plain", "bench")])
    for r in runs:
        r.pop("token_ids", None)
    write_results("constrained_batch", result, table, args.out, details={"runs": details, "predicate": predicate})


if __name__ == "__main__":
    main()
