"""Plain decoding throughput: decodekit vs transformers' generate(), plus shared-prefix prefill savings.

Greedy, same model object and prompts (Spec-Bench first turns, chat-formatted), batch 1 and 8,
one untimed warm-up round, then runs interleaved, medians. decodekit's prefix cache is emptied
before each timed run so repeated prompts give it no unfair head start.
"""

from __future__ import annotations

import torch
from decodekit.bench.common import interleaved, md_table, median, parser, spec_bench, timed, write_results


def chat_ids(llm, questions):
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}]) for q in questions]


def decodekit_run(llm, ids_batch, max_new):
    from decodekit.types import SamplingParams

    llm.backend.reset_prefix_cache()
    params = SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True)
    engine = llm.engine

    def go():
        reqs = [engine.add_request(ids, params) for ids in ids_batch]
        while engine.has_unfinished():
            engine.step()
        return sum(len(engine.pop_completion(r.request_id).token_ids) for r in reqs)

    tokens, seconds = timed(go)
    return tokens / seconds


def hf_run(model, ids_batch, max_new, pad_id):
    width = max(len(x) for x in ids_batch)
    input_ids = torch.full((len(ids_batch), width), pad_id)
    mask = torch.zeros((len(ids_batch), width), dtype=torch.long)
    for i, ids in enumerate(ids_batch):  # left padding, as generate() expects for decoder-only models
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    input_ids, mask = input_ids.to(model.device), mask.to(model.device)

    def go():
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False, pad_token_id=pad_id)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)  # time the work, not the launches (decodekit syncs on .tolist())
        return (out.shape[1] - width) * len(ids_batch)

    tokens, seconds = timed(go)
    return tokens / seconds


def shared_prefix(llm, no_cache_llm, n_requests=8):
    system = " ".join(f"Rule {i}: answer briefly and politely." for i in range(30))
    prompts = [[{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: name a color."}]
               for i in range(n_requests)]
    out = {}
    for name, target in (("with_cache", llm), ("without_cache", no_cache_llm)):
        target.backend.reset_prefix_cache()
        done, seconds = timed(lambda t=target: t.generate(prompts, max_new_tokens=8, temperature=0))
        out[name] = {"prefill_tokens": sum(c.stats.prefill_tokens_computed for c in done), "seconds": seconds,
                     "prompt_tokens": sum(c.usage.prompt_tokens for c in done)}
    saved = 1 - out["with_cache"]["prefill_tokens"] / out["without_cache"]["prefill_tokens"]
    return out, saved


def main():
    args = parser(__doc__).parse_args()
    from decodekit import LLM
    from decodekit.backends.hf import HFBackend

    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    model = llm.backend.model  # the transformers baseline runs this same model object (same dtype, device)
    plain = LLM(backend=HFBackend(model, llm.tokenizer, name="no-prefix-cache", prefix_cache=False))
    pad_id = sorted(llm.tokenizer.eos_token_ids)[0]
    max_new, repeats = (24, 2) if args.quick else (64, 5)
    questions = spec_bench(per_category=2)
    singles = chat_ids(llm, questions[: (2 if args.quick else 6)])
    batch8 = chat_ids(llm, questions[:8])

    def bs1(fn):
        return lambda: median([fn([ids]) for ids in singles])

    runs = interleaved({
        "decodekit_bs1": bs1(lambda b: decodekit_run(llm, b, max_new)),
        "hf_bs1": bs1(lambda b: hf_run(model, b, max_new, pad_id)),
        "decodekit_bs8": lambda: decodekit_run(llm, batch8, max_new),
        "hf_bs8": lambda: hf_run(model, batch8, max_new, pad_id),
    }, repeats, warmup=1)
    tps = {name: round(median(v), 2) for name, v in runs.items()}
    prefix, saved = shared_prefix(llm, plain)
    summary = {
        "bench": "throughput",
        "model": args.model,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "max_new_tokens": max_new,
        "tokens_per_s": tps,
        "ratio_vs_hf_bs1": round(tps["decodekit_bs1"] / tps["hf_bs1"], 3),
        "ratio_vs_hf_bs8": round(tps["decodekit_bs8"] / tps["hf_bs8"], 3),
        "prefill_tokens_saved_frac": round(saved, 3),
    }
    table = md_table(["batch", "decodekit tok/s", "transformers tok/s", "ratio", "target"], [
        [1, tps["decodekit_bs1"], tps["hf_bs1"], summary["ratio_vs_hf_bs1"], ">= 1.0"],
        [8, tps["decodekit_bs8"], tps["hf_bs8"], summary["ratio_vs_hf_bs8"], ">= 1.0"],
    ])
    table += "\n\n" + md_table(["shared 200-token prefix, 8 requests", "prefill tokens computed", "seconds"], [
        [k, v["prefill_tokens"], round(v["seconds"], 2)] for k, v in prefix.items()
    ]) + f"\n\nprefill tokens saved: {saved:.1%} (target >= 80%)\n"
    write_results("throughput", summary, table, args.out, details={"runs": runs, "shared_prefix": prefix})


if __name__ == "__main__":
    main()
