"""Tree rollouts (TreePO) vs independent sampling on GSM8K: 16 trajectories per prompt.

Contenders, same model, prompts, max tokens and temperature, interleaved:
- ``tree``: ``LLM.rollout`` with a ``TreeRollout`` (segments sharing prefixes, early stops);
- ``independent``: ``LLM.generate(..., n=16)`` (16 samples forked from the prompt's cache);
- ``independent_es`` (``--es-baseline``): 16 independent paths with the tree's early stops
  (``TreeRollout(branch_factor=1, first_split=16)``), to separate prefix sharing from early stopping.
  Without it, that baseline's forward tokens are derived exactly by cutting the independent run's
  trajectories where the early stops fire.

Measured: forward tokens computed, wall-clock, trajectories/s, tokens/s, distinct final answers per
prompt (diversity) and pass@16. The prefix cache is emptied before every run.

``--backend vllm`` runs the same comparison on vLLM (segment-level tree driver over automatic prefix
caching; ``n=16`` sampling for the independent run); forward tokens there are vLLM's own counters:
prompt tokens not found in the prefix cache plus generated tokens. Results go to ``tree_rollout_vllm``.
``--backend llamacpp`` runs it on the llama.cpp backend (token-level, the same driver as transformers;
results in ``tree_rollout_llamacpp``).

    .venv/bin/python bench/tree_rollout.py [--quick]
    .venv-vllm/bin/python -m decodekit.bench.tree_rollout --backend vllm [--quick]
    .venv/bin/python bench/tree_rollout.py --backend llamacpp [--quick]
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decodekit.bench.common import md_table, median, parser, require_data, write_results  # noqa: E402

from decodekit import LLM  # noqa: E402
from decodekit.rollout.budget import find_answer  # noqa: E402
from decodekit.rollout.tree import EarlyStop, TreeRollout  # noqa: E402

INSTRUCTION = "\nSolve it step by step. End with the final answer as '#### <number>'."
WIDTH = 16


def gsm8k(k: int) -> list[dict]:
    rows = [json.loads(line) for line in require_data("gsm8k/test.jsonl").read_text().splitlines()[:k]]
    return [{"question": r["question"], "gold": _number(r["answer"].split("####")[-1])} for r in rows]


def _number(text: str | None) -> str | None:
    if text is None:
        return None
    m = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not m:
        return None
    value = m[-1].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def final_answer(text: str) -> str | None:
    """The pattern answer (#### / boxed / "the answer is") or else the last number in the text."""
    return _number(find_answer(text, ("gsm8k", "boxed", "answer_is")) or text)


def quality(texts_per_prompt: list[list[str]], golds: list[str]) -> dict:
    answers = [[final_answer(t) for t in texts] for texts in texts_per_prompt]
    distinct = [len({a for a in row if a is not None}) for row in answers]
    hits = [sum(a == g for a in row) for row, g in zip(answers, golds)]
    return {"distinct_answers": sum(distinct) / len(distinct), "pass_at_16": sum(h > 0 for h in hits) / len(hits),
            "mean_accuracy": sum(hits) / (WIDTH * len(hits))}


def run_once(llm: LLM, name: str, prompts, sampling: dict, tree: TreeRollout | None) -> dict:
    backend = llm.backend
    backend.reset_prefix_cache()  # no prefix left from the previous contender
    f0, t0 = backend.computed_tokens(), time.perf_counter()
    es_tokens = None
    if name == "independent":
        done = llm.generate(prompts, n=WIDTH, **sampling)
        wall = time.perf_counter() - t0
        texts = [[c.text for c in d.choices] for d in done]
        decode = sum(_decode_tokens(c, len(c.token_ids)) for d in done for c in d.choices)
        prefill = backend.computed_tokens() - f0 - decode
        es_tokens = prefill + sum(_early_stop_decode_tokens(llm.tokenizer, c) for d in done for c in d.choices)
        out_tokens = sum(len(c.token_ids) for d in done for c in d.choices)
        reasons = [c.finish_reason for d in done for c in d.choices]
    else:
        done = llm.rollout(prompts, tree=tree, **sampling)
        wall = time.perf_counter() - t0
        texts = [r.texts for r in done]
        out_tokens = sum(len(t.token_ids) for r in done for t in r.trajectories)
        reasons = [t.finish_reason for r in done for t in r.trajectories]
    per_prompt = [d.stats.get("forward_tokens", d.stats.get("computed_tokens")) for d in done] \
        if name != "independent" else None
    return {"wall_s": wall, "forward_tokens": backend.computed_tokens() - f0, "output_tokens": out_tokens,
            "texts": texts, "finish_reasons": {r: reasons.count(r) for r in sorted(set(reasons))},
            "forward_tokens_per_prompt": per_prompt, "early_stop_forward_tokens": es_tokens}


def _early_stop_decode_tokens(tokenizer, choice) -> int:
    """Decode tokens the engine would have computed for ``choice`` had it stopped where the tree's early
    stops fire (the same trajectory, cut): the last token before a stop needs no forward."""
    rule, ids = EarlyStop(), choice.token_ids
    for j in range(1, len(ids) + 1):
        if rule.reason(tokenizer.decode(ids[:j])) is not None:
            return j - 1
    return _decode_tokens(choice, len(ids))


def _decode_tokens(choice, n: int) -> int:
    """Output tokens the engine computed: all after an EOS ending, all but the last otherwise."""
    return n if choice.finish_reason == "stop" else n - 1


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--segment-len", type=int, default=None)
    p.add_argument("--first-split", type=int, default=2)
    p.add_argument("--branch-factor", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 on a shared machine: oversubscribed threads run ~10x slower)")
    p.add_argument("--backend", choices=["hf", "vllm", "llamacpp"], default="hf",
                   help="vllm: the same comparison on the vLLM backend (needs `make setup-vllm`); llamacpp: on "
                        "llama.cpp (`make setup-llamacpp`, the model's GGUF, llama.cpp on the CPU cores)")
    p.add_argument("--es-baseline", action="store_true",
                   help="also run 16 independent paths with the tree's early stops (otherwise derived by cutting "
                        "the independent run's trajectories where the early stops fire)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    k = args.prompts or (2 if args.quick else 4)
    max_new = args.max_new_tokens or (64 if args.quick else 128)
    segment = args.segment_len or (16 if args.quick else 32)
    repeats = args.repeats or 1
    rows = gsm8k(k)
    prompts = [[{"role": "user", "content": r["question"] + INSTRUCTION}] for r in rows]
    if args.backend == "vllm":
        llm = LLM(args.model, backend="vllm", max_model_len=1024, max_num_seqs=k * WIDTH)
    elif args.backend == "llamacpp":
        llm = LLM(args.model, backend="llamacpp", cache_tokens=k * (WIDTH * max_new + 300) + 1024,
                  max_batch_size=k * WIDTH)
    else:
        llm = LLM(args.model, device=args.device, cache_tokens=k * (WIDTH * max_new + 300) + 1024,
                  max_batch_size=k * WIDTH)
    bench_name = "tree_rollout" if args.backend == "hf" else f"tree_rollout_{args.backend}"
    sampling = {"max_new_tokens": max_new, "temperature": args.temperature, "seed": 0}
    tree = TreeRollout(segment_len=segment, branch_factor=args.branch_factor, max_width=WIDTH,
                       first_split=args.first_split, early_stop=EarlyStop())
    contenders = {"tree": tree, "independent": None}
    if args.es_baseline:
        contenders["independent_es"] = TreeRollout(segment_len=segment, branch_factor=1, max_width=WIDTH,
                                                   first_split=WIDTH, early_stop=EarlyStop())
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for rep in range(repeats):
        for name, cfg in contenders.items():
            sampling["seed"] = rep
            runs[name].append(run_once(llm, name, prompts, sampling, cfg))
            print(f"{name} rep {rep}: {runs[name][-1]['wall_s']:.1f}s {runs[name][-1]['forward_tokens']} fwd tokens",
                  file=sys.stderr, flush=True)
    golds = [r["gold"] for r in rows]
    summary_rows, per = [], {}
    for name, rs in runs.items():
        wall = median([r["wall_s"] for r in rs])
        q = quality(rs[0]["texts"], golds)
        per[name] = {"wall_s": wall, "forward_tokens": median([r["forward_tokens"] for r in rs]),
                     "trajectories_per_s": k * WIDTH / wall,
                     "tokens_per_s": median([r["output_tokens"] for r in rs]) / wall,
                     **q, "finish_reasons": rs[0]["finish_reasons"]}
        summary_rows.append([name, per[name]["forward_tokens"], wall, per[name]["trajectories_per_s"],
                             per[name]["tokens_per_s"], q["distinct_answers"], q["pass_at_16"], q["mean_accuracy"]])
    t, i = per["tree"], per["independent"]
    summary = {"bench": bench_name, "backend": args.backend,
               "forward_tokens_ratio": round(t["forward_tokens"] / i["forward_tokens"], 3),
               "wall_ratio": round(t["wall_s"] / i["wall_s"], 3),
               "trajectories_per_s_ratio": round(t["trajectories_per_s"] / i["trajectories_per_s"], 3),
               "distinct_answers": {"tree": round(t["distinct_answers"], 2),
                                    "independent": round(i["distinct_answers"], 2)},
               "pass_at_16": {"tree": t["pass_at_16"], "independent": i["pass_at_16"]}}
    es = runs["independent"][0]["early_stop_forward_tokens"]
    summary["forward_tokens_ratio_vs_early_stopped_independent"] = round(t["forward_tokens"] / es, 3)
    per["independent"]["early_stop_forward_tokens"] = es
    header = ["contender", "forward tokens", "wall s", "trajectories/s", "tokens/s", "distinct answers",
              "pass@16", "mean acc"]
    settings = (f"{k} GSM8K prompts x {WIDTH} trajectories, {args.model} ({args.backend}), max_new_tokens={max_new}, "
                f"temperature={args.temperature}, tree: segment_len={segment}, branch_factor={args.branch_factor}, "
                f"first_split={args.first_split}, early stops on '####' / boxed / repetition; repeats={repeats}")
    plot(runs, args.out, bench_name)
    write_results(bench_name, summary, settings + "\n\n" + md_table(header, summary_rows), args.out,
                  details={"contenders": per, "settings": settings,
                           "samples": {name: rs[0]["texts"][0][:3] for name, rs in runs.items()}})


def plot(runs: dict, out_dir: str, name: str) -> None:
    """Forward tokens per contender (bars), tree split per prompt on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    values = [runs[n][0]["forward_tokens"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(names, values, color=["tab:green", "tab:gray", "tab:blue"][: len(names)])
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v}", ha="center", va="bottom")
    ax.set_ylabel("forward tokens computed")
    ax.set_title(f"GSM8K, {WIDTH} trajectories per prompt")
    fig.tight_layout()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out_dir) / f"{name}.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
