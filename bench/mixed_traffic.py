"""Mixed traffic through one engine: plain sampling, JSON-constrained, speculative and SMC requests together.

16 concurrent requests on one engine (Spec-Bench first turns, chat-formatted): 8 plain ``Sample``
requests (temperatures 0 .. 1.0, own seeds), 4 ``Constrained(JsonSchema)`` AWRS requests (each its own
strategy instance and its own JSONSchemaBench schema), 2 ``Speculative(draft="ngram")`` (greedy) and
2 ``Constrained(Regex, num_particles=4)`` SMC requests. Plain and speculative requests ignore EOS;
the constrained ones stop where their text is complete, and count the tokens they produced.

Contenders, interleaved rounds (ABBA), medians:

- ``mixed``: all 16 added at once, then ``engine.step()`` until done;
- ``plain``: a plain batch of 16 ``Sample`` requests, same prompts and sampling parameters, each
  ``max_new_tokens`` = the tokens that request produced in the (untimed) first mixed run, EOS ignored;
- ``serial``: the 16 mixed requests one at a time (``--quick``: 8 of them, every kind).

Engine counters come from ``engine.stats()`` (``steps``, ``main_forwards``, ``side_forwards``,
``peak_running``, ``preemptions``) where the engine has it, else from the backend's forward-call counter,
steps counted here and ``len(engine.running)`` seen between steps. ``forwards_per_step`` is main-model
forward calls per engine step in the mixed run (1.0: every kind of request rides in one forward).

``spec_batch_speedup``: n-gram ``Speculative`` vs plain ``Sample``, greedy, EOS ignored, on the first 4
and on all 16 prompts as one batch each; tokens/s ratio, median of same-round ratios.

    .venv/bin/python -m decodekit.bench.mixed_traffic            # full run: 64 tokens, 3 rounds
    .venv/bin/python -m decodekit.bench.mixed_traffic --quick    # smoke run: 16 tokens, 1 round
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Callable

import torch
from decodekit.bench.common import (
    DATA,
    compiling_schemas,
    interleaved,
    md_table,
    median,
    paired_ratio,
    parser,
    spec_bench,
    write_results,
)

from decodekit import LLM, Constrained, JsonSchema, Regex, SamplingParams, Speculative

TEMPERATURES = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0]
SENTENCE = r"[A-Za-z ,.]{10,60}\."  # the SMC requests' constraint: one short plain sentence
KINDS = ["sample"] * 8 + ["json"] * 4 + ["speculative"] * 2 + ["smc"] * 2
QUICK_SERIAL = [0, 1, 2, 3, 8, 9, 12, 14]  # --quick: serial on 4 sample, 2 json, 1 speculative, 1 smc


@dataclasses.dataclass
class Job:
    kind: str
    text: str
    ids: list[int]
    params: SamplingParams
    make_strategy: Callable[[], object] | None  # a fresh strategy instance per run (None: the engine's Sample)
    constraint: object = None
    label: str = ""

    def strategy(self):
        return self.make_strategy() if self.make_strategy else None


# ---- inputs -------------------------------------------------------------------------------------
def questions(n: int) -> list[str]:
    """The first ``n`` Spec-Bench first turns (the short MT-Bench prompts, as bench/server_load.py sends),
    reordered one category at a time so every kind of request gets a mix of categories."""
    rows = spec_bench(per_category=-(-n // 4))[:n]
    by_category: dict[str, list[str]] = {}
    for q in rows:
        by_category.setdefault(q["category"], []).append(q["turns"][0])
    out = []
    while len(out) < n:
        for turns in by_category.values():
            if turns and len(out) < n:
                out.append(turns.pop(0))
    return out


def schemas(k: int) -> list[tuple[str, dict, JsonSchema]]:
    """The first ``k`` small JSONSchemaBench schemas that compile: (file, schema, constraint)."""
    folder = DATA / "jsonschemabench" / "schemas"
    out = [(name, schema, c) for name, _, schema, c in itertools.islice(compiling_schemas(folder, 600, JsonSchema), k)]
    if len(out) < k:
        sys.exit(f"only {len(out)} small JSON schemas compile under {folder}, need {k}")
    return out


def mixed_jobs(llm, prompts: list[str], tokens: int) -> list[Job]:
    picked = schemas(4)
    jobs = []
    for i, (kind, question) in enumerate(zip(KINDS, prompts)):
        if kind == "sample":
            content, params, make, constraint = question, SamplingParams(
                max_new_tokens=tokens, temperature=TEMPERATURES[i], seed=i, ignore_eos=True), None, None
            label = f"sample t={TEMPERATURES[i]}"
        elif kind == "json":
            name, schema, constraint = picked[i - 8]
            content = (f"{question}\n\nAnswer with one JSON document that follows this JSON schema: "
                       f"{json.dumps(schema, separators=(',', ':'))}")
            params = SamplingParams(max_new_tokens=tokens, seed=i)
            make, label = (lambda c=constraint: Constrained(c, sampler="awrs")), f"json {name}"
        elif kind == "speculative":
            content, constraint = question, None
            params = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
            make, label = (lambda: Speculative(draft="ngram")), "speculative ngram"
        else:
            constraint = Regex(SENTENCE)
            content = f"{question}\n\nAnswer in one short sentence."
            params = SamplingParams(max_new_tokens=tokens, seed=i)
            make, label = (lambda c=constraint: Constrained(c, sampler="awrs", num_particles=4)), "smc regex x4"
        text, ids = llm.encode_prompt([{"role": "user", "content": content}])
        jobs.append(Job(kind, text, ids, params, make, constraint, label))
    return jobs


def plain_jobs(jobs: list[Job], produced: list[int]) -> list[Job]:
    """The same prompts and sampling parameters as plain ``Sample`` requests of the mixed run's lengths."""
    return [dataclasses.replace(j, kind="plain", make_strategy=None, constraint=None,
                                params=dataclasses.replace(j.params, max_new_tokens=max(1, n), ignore_eos=True))
            for j, n in zip(jobs, produced)]


# ---- engine counters ----------------------------------------------------------------------------
class Meter:
    """Engine counters around a run: ``engine.stats()`` where the engine has it, else counted here."""

    COUNTERS = ("steps", "main_forwards", "side_forwards", "preemptions")

    def __init__(self, llm):
        self.engine, self.backend = llm.engine, llm.backend
        self.steps = 0

    @property
    def source(self) -> str:
        return "engine.stats()"

    def counters(self) -> dict:
        return dict(self.engine.stats())

    def run(self, jobs: list[Job]) -> dict:
        """Add every job, step until all are done; tokens, seconds and counter deltas of the run."""
        engine = self.engine
        before = self.counters()
        peak = 0
        t0 = time.perf_counter()
        requests = [engine.add_request(j.ids, j.params, j.strategy(), prompt=j.text) for j in jobs]
        while engine.has_unfinished():
            engine.step()
            self.steps += 1
            peak = max(peak, len(engine.running))
        seconds = time.perf_counter() - t0
        done = [engine.pop_completion(r.request_id) for r in requests]
        after = self.counters()
        out = {k: _delta(after.get(k), before.get(k)) for k in self.COUNTERS}
        # the engine's peak_running is its maximum so far: exact for this run where it rose during it, else
        # (an earlier run peaked higher) this run's peak is the one seen between steps
        rose = (after.get("peak_running") or 0) > (before.get("peak_running") or 0)
        out["peak_running"] = after["peak_running"] if rose else peak
        out["peak_running_seen"] = peak
        out["tokens"] = [c.usage.completion_tokens for c in done]
        out["seconds"] = seconds
        out["tokens_per_s"] = sum(out["tokens"]) / seconds
        out["completions"] = done
        return out


def _delta(after, before):
    return None if after is None or before is None else after - before


def serial(meter: Meter, jobs: list[Job]) -> dict:
    runs = [meter.run([j]) for j in jobs]
    seconds = sum(r["seconds"] for r in runs)
    tokens = [t for r in runs for t in r["tokens"]]
    out = {k: (None if any(r[k] is None for r in runs) else sum(r[k] for r in runs)) for k in Meter.COUNTERS}
    return {**out, "peak_running": max(r["peak_running"] for r in runs),
            "peak_running_seen": max(r["peak_running_seen"] for r in runs),
            "tokens": tokens, "seconds": seconds, "tokens_per_s": sum(tokens) / seconds, "completions": []}


def fresh(llm, fn):
    """Empty the prefix cache first, so repeated prompts give no run a head start."""
    def go():
        llm.backend.reset_prefix_cache()
        return fn()
    return go


# ---- n-gram speculation in a batch ----------------------------------------------------------------
def batch_generate(llm, prompts, tokens: int, speculative: bool) -> float:
    llm.backend.reset_prefix_cache()
    strategy = Speculative(draft="ngram") if speculative else None
    t0 = time.perf_counter()
    done = llm.generate(prompts, strategy=strategy, temperature=0, max_new_tokens=tokens, ignore_eos=True)
    return sum(c.usage.completion_tokens for c in done) / (time.perf_counter() - t0)


# ---- report -------------------------------------------------------------------------------------
def describe(run: dict) -> dict:
    steps, forwards = run["steps"], run["main_forwards"]
    return {"tokens": sum(run["tokens"]), "seconds": round(run["seconds"], 3),
            "tokens_per_s": round(run["tokens_per_s"], 2), "steps": steps, "main_forwards": forwards,
            "forwards_per_step": round(forwards / steps, 3) if steps else None,
            "side_forwards": run["side_forwards"], "preemptions": run["preemptions"],
            "peak_running": run["peak_running"], "peak_running_seen": run["peak_running_seen"]}


def request_rows(jobs: list[Job], run: dict) -> list[dict]:
    rows = []
    for job, c in zip(jobs, run["completions"]):
        valid = None
        if job.constraint is not None:
            valid = c.finish_reason != "constraint_failed" and job.constraint.complete_ok(c.text)
        rows.append({"kind": job.kind, "label": job.label, "prompt_tokens": len(job.ids),
                     "completion_tokens": c.usage.completion_tokens, "finish_reason": c.finish_reason,
                     "valid": valid, "text": c.text[:120]})
    return rows


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=None, help="max new tokens per request (default 64, quick 16)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids thread contention on busy cores)")
    args = p.parse_args()
    tokens = args.tokens or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    spec_tokens = 32 if args.quick else 64
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    meter = Meter(llm)
    prompts = questions(16)
    jobs = mixed_jobs(llm, prompts, tokens)

    # untimed first mixed run: warms every strategy (AWRS token tables, n-gram drafter) and fixes the
    # per-request token counts the plain batch reproduces
    first = fresh(llm, lambda: meter.run(jobs))()
    print(f"first mixed run: {first['seconds']:.1f} s, prompt tokens {[len(j.ids) for j in jobs]}", file=sys.stderr)
    produced = first["tokens"]
    for row in request_rows(jobs, first):
        print(f"{row['label']:<40} {row['completion_tokens']:>3} tokens  {row['finish_reason']:<17} "
              f"valid={row['valid']}  {row['text'][:50]!r}", file=sys.stderr)
    plain = plain_jobs(jobs, produced)
    serial_jobs = [jobs[i] for i in QUICK_SERIAL] if args.quick else jobs

    runs = interleaved({
        "mixed": fresh(llm, lambda: meter.run(jobs)),
        "plain": fresh(llm, lambda: meter.run(plain)),
        "serial": fresh(llm, lambda: serial(meter, serial_jobs)),
    }, rounds)
    for name, rs in runs.items():
        print(name, "tokens/s", [round(r["tokens_per_s"], 1) for r in rs], "seconds",
              [round(r["seconds"], 1) for r in rs], file=sys.stderr)
    chats = [[{"role": "user", "content": q}] for q in prompts]
    spec_runs = interleaved({
        f"{kind}{n}": (lambda n=n, s=kind == "spec": batch_generate(llm, chats[:n], spec_tokens, s))
        for n in (4, 16) for kind in ("plain", "spec")
    }, rounds)
    print("spec batch", {k: [round(v, 1) for v in vs] for k, vs in spec_runs.items()}, file=sys.stderr)

    tps = {name: round(median([r["tokens_per_s"] for r in rs]), 2) for name, rs in runs.items()}
    mixed = runs["mixed"]
    fps = median([r["main_forwards"] / r["steps"] for r in mixed])
    side = [r["side_forwards"] for r in mixed]
    summary = {
        "bench": "mixed_traffic",
        "forwards_per_step": round(fps, 3),
        "tokens_per_s": tps,
        "mixed_vs_plain": round(paired_ratio([r["tokens_per_s"] for r in mixed],
                                             [r["tokens_per_s"] for r in runs["plain"]]), 3),
        "mixed_vs_serial": round(paired_ratio([r["tokens_per_s"] for r in mixed],
                                              [r["tokens_per_s"] for r in runs["serial"]]), 3),
        "peak_batch": max(r["peak_running"] for r in mixed),
        "spec_batch_speedup": {str(n): round(paired_ratio(spec_runs[f"spec{n}"], spec_runs[f"plain{n}"]), 3)
                               for n in (4, 16)},
        "forwards_per_step_plain": round(median([r["main_forwards"] / r["steps"] for r in runs["plain"]]), 3),
        "side_forwards_per_step": None if None in side else round(
            median([s / r["steps"] for s, r in zip(side, mixed)]), 3),
        "preemptions": None if mixed[0]["preemptions"] is None else max(r["preemptions"] for r in mixed),
        "counters": meter.source,
        "model": args.model,
        "device": str(getattr(getattr(llm.backend, "model", None), "device", args.device or "cpu")),
        "threads": args.threads,
        "max_new_tokens": tokens,
        "spec_batch_tokens": spec_tokens,
        "mixed_tokens": sum(produced),
        "serial_requests": len(serial_jobs),
        "rounds": rounds,
        "quick": args.quick,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    table = _tables(summary, runs, spec_runs, jobs, first)
    details = {"first_mixed_run": {**describe(first), "requests": request_rows(jobs, first)},
               "runs": {name: [describe(r) for r in rs] for name, rs in runs.items()},
               "spec_batch_tokens_per_s": spec_runs, "prompt_tokens": [len(j.ids) for j in jobs],
               "kinds": [j.label for j in jobs], "serial_labels": [j.label for j in serial_jobs]}
    write_results("mixed_traffic", summary, table, args.out, details)


def _tables(summary, runs, spec_runs, jobs, first) -> str:
    rows = []
    for name, rs in runs.items():
        d = [describe(r) for r in rs]
        rows.append([name, summary["tokens_per_s"][name], median([x["steps"] for x in d]),
                     median([x["main_forwards"] for x in d]), median([x["forwards_per_step"] for x in d]),
                     max(x["peak_running"] for x in d)])
    requests = [[r["label"], r["prompt_tokens"], r["completion_tokens"], r["finish_reason"], r["valid"]]
                for r in request_rows(jobs, first)]
    spec_rows = [[n, round(median(spec_runs[f"plain{n}"]), 2), round(median(spec_runs[f"spec{n}"]), 2),
                  summary["spec_batch_speedup"][str(n)]] for n in (4, 16)]
    return "\n\n".join([
        f"{summary['model']}, {summary['device']}, {summary['threads']} torch thread(s), "
        f"{summary['max_new_tokens']} new tokens per request, {summary['rounds']} interleaved round(s), medians; "
        f"counters: {summary['counters']}. serial: {summary['serial_requests']} of the 16 requests.",
        md_table(["run", "tokens/s", "engine steps", "main forwards", "forwards/step", "peak running"], rows),
        f"mixed / plain: {summary['mixed_vs_plain']} (target >= 0.7); mixed / serial: {summary['mixed_vs_serial']} "
        f"(target >= 4); forwards per step: {summary['forwards_per_step']} (target <= 1.0).",
        "Requests of the first (untimed) mixed run; the plain batch reproduces these token counts:",
        md_table(["request", "prompt tokens", "tokens", "finish", "valid"], requests),
        f"n-gram speculative vs plain, greedy, {summary['spec_batch_tokens']} tokens, one batch (target >= 1.0):",
        md_table(["batch", "plain tok/s", "speculative tok/s", "speedup"], spec_rows),
    ])


if __name__ == "__main__":
    main()
