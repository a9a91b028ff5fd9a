"""Speculative drafting on Spec-Bench: tokens/s against plain decoding and transformers' assisted generation.

Per prompt (interleaved: every contender runs on the same prompt before the next prompt), batch 1:
decodekit plain, decodekit speculative for each draft source (greedy and temperature 0.7), and
transformers ``generate`` with the same draft (``assistant_model=`` int8 copy,
``prompt_lookup_num_tokens=``), greedy. Speedups are medians of per-prompt tokens/s ratios.

    .venv/bin/python bench/speculative.py            # full run (~10 min on 2 busy cores)
    .venv/bin/python bench/speculative.py --quick    # ~1 minute smoke run
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decodekit.bench.common import interleaved, md_table, median, parser, spec_bench, write_results  # noqa: E402

from decodekit.backends.timing import prefilled, time_rows  # noqa: E402
from decodekit.drafting.drafters import (  # noqa: E402
    HeadDrafter,
    LookupThenModel,
    ModelDrafter,
    NgramDrafter,
    int8_backend,
)
from decodekit.drafting.head import load_head  # noqa: E402
from decodekit.engine import Engine  # noqa: E402
from decodekit.models import load_backend  # noqa: E402
from decodekit.strategies.speculative import Speculative  # noqa: E402
from decodekit.training.draft_head import ensure_head  # noqa: E402
from decodekit.types import SamplingParams  # noqa: E402

SOURCES = ["ngram", "int8", "ngram+int8"]  # and "head", "ngram+head" when a draft head is trained
HF_EQUIVALENT = {"ngram": "hf:ngram/greedy", "int8": "hf:int8/greedy"}  # the others: the faster of HF's two
HF_LOOKUP_TOKENS = 10  # transformers' documented prompt-lookup setting


def run_decodekit(engine: Engine, ids: list[int], params: SamplingParams, strategy=None) -> dict:
    t0 = time.perf_counter()
    request = engine.add_request(ids, params, strategy)
    while engine.has_unfinished():
        engine.step()
    seconds = time.perf_counter() - t0
    done = engine.pop_completion(request.request_id)
    return {"tokens": list(done.token_ids), "seconds": seconds, "extra": dict(done.stats.extra)}


def run_hf(model, ids: list[int], max_new_tokens: int, **assist) -> dict:
    input_ids = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, **assist)
    seconds = time.perf_counter() - t0
    return {"tokens": out[0, len(ids):].tolist(), "seconds": seconds, "extra": {}}


def tokens_per_s(run: dict) -> float:
    return len(run["tokens"]) / run["seconds"]


def contenders(engine, backend, draft_backend, ids, args) -> dict:
    greedy = SamplingParams(max_new_tokens=args.tokens, temperature=0.0)
    warm = SamplingParams(max_new_tokens=args.tokens, temperature=0.7, seed=0)
    out = {"plain/greedy": lambda: run_decodekit(engine, ids, greedy),
           "plain/t0.7": lambda: run_decodekit(engine, ids, warm)}
    for source in args.sources:
        spec = args.strategies[source]
        out[f"{source}/greedy"] = lambda spec=spec: run_decodekit(engine, ids, greedy, spec)
        out[f"{source}/t0.7"] = lambda spec=spec: run_decodekit(engine, ids, warm, spec)
    model = backend.model
    out["hf:int8/greedy"] = lambda: run_hf(model, ids, args.tokens, assistant_model=draft_backend.model)
    out["hf:ngram/greedy"] = lambda: run_hf(model, ids, args.tokens, prompt_lookup_num_tokens=HF_LOOKUP_TOKENS)
    return out


def draft_speed(backend, draft_backend, ids: list[int], steps: int = 12) -> dict:
    """ms per batch-1 decode step of the float32 target and of its int8 copy, interleaved."""
    times = {"float32": [], "int8": []}
    with prefilled(backend, ids) as target, prefilled(draft_backend, ids) as draft:
        for _ in range(steps):
            for name, b, base in (("float32", backend, target), ("int8", draft_backend, draft)):
                times[name].append(time_rows(b, base, 1, 1) * 1000)
    return {name: median(v) for name, v in times.items()}


def batch_run(engine, prompts: list[list[int]], args) -> dict:
    """One batch of prompts together, plain vs each source (greedy): tokens/s of the whole batch."""
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0.0)

    def go(strategy):
        t0 = time.perf_counter()
        requests = [engine.add_request(ids, params, strategy) for ids in prompts]
        while engine.has_unfinished():
            engine.step()
        seconds = time.perf_counter() - t0
        done = [engine.pop_completion(r.request_id) for r in requests]
        return {"tokens": [list(d.token_ids) for d in done], "seconds": seconds}

    runs = {"plain": lambda: go(None)} | {s: (lambda s=s: go(args.strategies[s])) for s in args.sources}
    res = {name: r[0] for name, r in interleaved(runs, 1).items()}
    plain_tps = sum(map(len, res["plain"]["tokens"])) / res["plain"]["seconds"]
    return {name: {"tokens_per_s": sum(map(len, r["tokens"])) / r["seconds"],
                   "speedup": sum(map(len, r["tokens"])) / r["seconds"] / plain_tps,
                   "identical": r["tokens"] == res["plain"]["tokens"]} for name, r in res.items()}


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--per-category", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--categories", default=None, help="comma-separated Spec-Bench categories (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids thread contention on busy cores)")
    args = p.parse_args()
    args.per_category = args.per_category or (1 if args.quick else 2)
    args.tokens = args.tokens or (16 if args.quick else 64)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backend = load_backend(args.model, device=args.device or "cpu")
    draft_backend = int8_backend(backend)
    lookup_then_int8 = LookupThenModel(NgramDrafter(), ModelDrafter(draft_backend))  # one int8 copy for all
    args.strategies = {"ngram": Speculative(draft="ngram"), "int8": Speculative(draft=draft_backend),
                       "ngram+int8": Speculative(draft=lookup_then_int8)}
    args.sources = list(SOURCES)
    try:  # a fresh machine has no trained head: a labeled quick stand-in is built once (draft_head.ensure_head)
        path, args.head_info = ensure_head(args.model, device=args.device or "cpu",
                                           log=lambda m: print(m, file=sys.stderr))
        head = load_head(backend, path)
        args.strategies["head"] = Speculative(draft=HeadDrafter(backend, head))
        args.strategies["ngram+head"] = Speculative(draft=LookupThenModel(NgramDrafter(), HeadDrafter(backend, head)))
        args.sources += ["head", "ngram+head"]
    except ValueError as e:
        print(f"draft head skipped: {e}", file=sys.stderr)
    engine = Engine(backend, max_batch_size=32)
    questions = spec_bench(args.per_category, args.categories.split(",") if args.categories else None)
    encode = backend.tokenizer.apply_chat_template
    prompts = [(q["category"], encode([{"role": "user", "content": q["turns"][0]}])) for q in questions]

    warm_ids = prompts[0][1]
    for fn in contenders(engine, backend, draft_backend, warm_ids[:64], argparse_tokens(args, 2)).values():
        fn()  # warm-up: first calls allocate the pools and page in the int8 weights
    speed = draft_speed(backend, draft_backend, warm_ids)
    records = []
    for category, ids in prompts:
        runs = interleaved(contenders(engine, backend, draft_backend, ids, args), 1)
        records.append({"category": category, "prompt_tokens": len(ids),
                        **{name: r[0] for name, r in runs.items()}})
        print(category, {name: round(tokens_per_s(r[0]), 1) for name, r in runs.items()}, file=sys.stderr)
        summary, table, details = summarize(records, None, speed, args)
        write_results("speculative", summary, table, args.out, details)  # partial results so far
    batch = batch_run(engine, [ids for _, ids in prompts[: args.batch]], args) if args.batch > 1 else None
    summary, table, details = summarize(records, batch, speed, args)
    write_results("speculative", summary, table, args.out, details)


def argparse_tokens(args, tokens: int):
    import copy

    short = copy.copy(args)
    short.tokens = tokens
    return short


def summarize(records: list[dict], batch: dict, speed: dict, args):
    categories = sorted({r["category"] for r in records})

    def ratio(num: str, den: str, cat: str | None = None) -> float:
        return median([tokens_per_s(r[num]) / tokens_per_s(r[den]) for r in records
                       if cat is None or r["category"] == cat])

    sources = args.sources
    speedup = {s: {c: ratio(f"{s}/greedy", "plain/greedy", c) for c in categories} for s in sources}
    mean_speedup = {s: sum(speedup[s].values()) / len(categories) for s in sources}
    vs_hf = {s: median([tokens_per_s(r[f"{s}/greedy"]) / _hf_reference(r, s) for r in records]) for s in sources}
    mean_accepted = {s: median([r[f"{s}/greedy"]["extra"]["mean_tokens_per_step"] for r in records])
                     for s in sources}
    identical = all(r[f"{s}/greedy"]["tokens"] == r["plain/greedy"]["tokens"] for r in records for s in sources)
    hf_identical = all(r[name]["tokens"] == r["plain/greedy"]["tokens"] for r in records
                       for name in HF_EQUIVALENT.values())
    warm_speedup = {s: {c: ratio(f"{s}/t0.7", "plain/t0.7", c) for c in categories} for s in sources}
    best = max(sources, key=lambda s: mean_speedup[s])
    summary = {"bench": "speculative", "speedup": speedup, "mean_speedup": mean_speedup,
               "speedup_vs_hf_assisted": vs_hf, "mean_accepted": mean_accepted, "greedy_identical": identical,
               "best_source": best, "mean_speedup_t0.7": {s: sum(v.values()) / len(v) for s, v in warm_speedup.items()},
               "batch_speedup": {s: batch[s]["speedup"] for s in sources} if batch else None,
               "int8_decode_ms": speed["int8"], "float32_decode_ms": speed["float32"],
               "draft_head": getattr(args, "head_info", None),
               "targets": {"mean_speedup>=1.5": mean_speedup[best] >= 1.5,
                           "vs_hf>=1.2": vs_hf[best] >= 1.2,
                           "greedy_identical": identical}}
    table = _tables(records, categories, speedup, warm_speedup, vs_hf, mean_accepted, batch, speed, args)
    details = {"records": [{k: (v if not isinstance(v, dict) else {"tokens_per_s": tokens_per_s(v),
                                                                     "n_tokens": len(v["tokens"]), **v["extra"]})
                            for k, v in r.items()} for r in records],
               "batch": batch, "hf_greedy_identical": hf_identical,
               "tokens": args.tokens, "per_category": args.per_category}
    return summary, table, details


def _hf_reference(record: dict, source: str) -> float:
    """transformers' assisted generation with the same draft, or the faster of its two where it has none."""
    if source in HF_EQUIVALENT:
        return tokens_per_s(record[HF_EQUIVALENT[source]])
    return max(tokens_per_s(record[name]) for name in HF_EQUIVALENT.values())


def _tables(records, categories, speedup, warm, vs_hf, accepted, batch, speed, args) -> str:
    sources = args.sources
    plain = {c: median([tokens_per_s(r["plain/greedy"]) for r in records if r["category"] == c]) for c in categories}
    rows = [[c, plain[c], *[speedup[s][c] for s in sources], *[warm[s][c] for s in sources]] for c in categories]
    head = ["category", "plain tok/s (greedy)", *[f"{s} x (greedy)" for s in sources],
            *[f"{s} x (t=0.7)" for s in sources]]
    hf_rows = [[name, value] for name, value in vs_hf.items()]
    acc_rows = [[s, accepted[s]] for s in sources]
    batch_rows = [[s, b["tokens_per_s"], b["speedup"], b["identical"]] for s, b in (batch or {}).items()]
    return "\n\n".join([
        f"SmolLM2-135M float32, CPU ({args.threads} thread), batch 1, {args.tokens} new tokens, "
        f"{args.per_category} prompt(s) per category; "
        "speedup = median over prompts of tokens/s ratio against decodekit plain decoding (interleaved).",
        md_table(head, rows),
        "Against transformers assisted generation with the same draft (greedy, batch 1; ngram+int8 and the draft "
        "head have no HF equivalent and are compared with the faster of HF's two):",
        md_table(["source", "decodekit / HF assisted"], hf_rows),
        "Mean tokens per verify step (accepted drafts + 1), greedy:",
        md_table(["source", "tokens / step"], acc_rows),
        f"Batch of {args.batch} prompts, greedy{'' if batch else ': not run yet'}:",
        md_table(["strategy", "tok/s", "speedup", "identical to plain"], batch_rows),
        f"Decode step, batch 1: float32 {speed['float32']:.1f} ms, int8 copy {speed['int8']:.1f} ms "
        f"({speed['float32'] / speed['int8']:.2f}x).",
    ])


if __name__ == "__main__":
    main()
