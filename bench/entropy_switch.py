"""Entropy-adaptive switching: sweep the threshold, small = the distilled student, large = the default model.

For each threshold: the large model's token share, the paper's parameter-weighted cost, wall-clock
against large-only decoding (plain ``Sample`` on the large model), and quality against large-only:
GSM8K accuracy (reported; near zero for a 135M model, so not used as the ratio) and, model-free,
the large model's mean log-likelihood of the generated text; ``quality_ratio`` is
``exp(mean_ll - mean_ll_large_only)``, the ratio of per-token geometric-mean probabilities.

Every configuration runs the same prompts (greedy), one request at a time (EAD is a latency method),
on fresh caches over the same loaded weights; configurations are interleaved per repeat and wall
times are medians. The switch at threshold 0 is exactly large-only decoding (tested), so it is not rerun.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import interleaved, md_table, median, parser, require_data, spec_bench, timed, write_results  # noqa: E402
from decodekit.api import LLM  # noqa: E402
from decodekit.backends.hf import HFBackend  # noqa: E402
from decodekit.models import load_backend  # noqa: E402
from decodekit.strategies.entropy import EntropySwitch  # noqa: E402

NAME = "entropy_switch"


def gsm8k(k: int) -> list[dict]:
    rows = [json.loads(line) for line in require_data("gsm8k/test.jsonl").read_text().splitlines()[:k]]
    return [{"prompt": r["question"] + "\nSolve it step by step and end with 'The answer is N.'",
             "answer": r["answer"].split("####")[-1].strip().replace(",", ""), "source": "gsm8k"} for r in rows]


def last_number(text: str) -> str | None:
    found = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def fresh(backend) -> HFBackend:
    """The same weights behind an empty cache, so no configuration profits from another's prefixes."""
    return HFBackend(backend.model, backend.tokenizer, name=backend.name, cache_tokens=backend.cache.capacity)


@torch.inference_mode()
def large_loglik(large, prompt_ids: list[int], output_ids: list[int]) -> tuple[float, int]:
    """Sum of the large model's log-probs of ``output_ids`` after ``prompt_ids`` (one no-cache forward)."""
    if not output_ids:
        return 0.0, 0
    ids = torch.tensor([prompt_ids + output_ids])
    logits = large.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(output_ids).unsqueeze(-1))
    return float(logp.sum()), len(output_ids)


def run_config(large, small, tau, prompts, max_new_tokens, window, min_dwell):
    """One configuration on fresh caches (``tau`` None: plain decoding on the large model)."""
    llm = LLM(backend=fresh(large))
    strategy = None if tau is None else EntropySwitch(small=fresh(small), threshold=tau, window=window,
                                                      min_dwell=min_dwell)
    outs, seconds = [], 0.0
    for p in prompts:  # one request at a time: EAD is a latency method (batching mixes both models per step)
        out, took = timed(lambda p=p: llm.generate([{"role": "user", "content": p["prompt"]}], strategy=strategy,
                                                   temperature=0, max_new_tokens=max_new_tokens))
        outs.append(out)
        seconds += took
    return {"outs": outs, "seconds": seconds}


def summarize(tau, runs, large, prompts) -> dict:
    outs = runs[0]["outs"]
    ll, n = 0.0, 0
    for o in outs:
        s, k = large_loglik(large, list(o.prompt_token_ids), list(o.token_ids))
        ll, n = ll + s, n + k
    correct = [last_number(o.text) == p["answer"] for o, p in zip(outs, prompts) if p["source"] == "gsm8k"]
    extra = [o.stats.extra for o in outs]
    total = sum(o.usage.completion_tokens for o in outs)
    num_large = total if tau is None else sum(e["tokens_by_model"]["large"] for e in extra)
    cost = 1.0 if tau is None else sum(e["cost_param_weighted"] * o.usage.completion_tokens
                                       for e, o in zip(extra, outs)) / total
    fwd = {"small": 0, "large": total} if tau is None else {
        m: sum(e["forward_tokens"][m] for e in extra) for m in ("small", "large")}
    return {"threshold": "large-only" if tau is None else tau, "large_share": num_large / total,
            "cost_param_weighted": cost, "wall_s": median([r["seconds"] for r in runs]),
            "mean_ll": ll / n, "gsm8k_acc": sum(correct) / max(1, len(correct)), "tokens": total,
            "forward_tokens": fwd, "switches": sum(e.get("num_switches", 0) for e in extra),
            "sample_text": outs[0].text[:200]}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--small", default="smollm2-135m-distill-8l")
    p.add_argument("--thresholds", default=None, help="comma-separated thresholds in bits ('inf' allowed)")
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--min-dwell", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    k_gsm, per_cat, max_new = (2, 0, 24) if args.quick else (6, 1, 64)
    default_taus = "1,inf" if args.quick else "0.5,1,2,3,inf"
    taus = [float(t) for t in (args.thresholds or default_taus).split(",")]
    prompts = gsm8k(k_gsm) + [{"prompt": q["turns"][0], "answer": None, "source": q["category"]}
                              for q in (spec_bench(per_cat) if per_cat else [])]
    large = load_backend(args.model, device=args.device, cache_tokens=8192)
    small = load_backend(args.small, device=args.device, cache_tokens=8192)
    configs = {"large-only": None, **{f"tau={t}": t for t in taus}}
    runs = interleaved({name: (lambda t=t: run_config(large, small, t, prompts, max_new, args.window,
                                                           args.min_dwell))
                        for name, t in configs.items()}, args.repeats)
    rows = {name: summarize(t, runs[name], large, prompts) for name, t in configs.items()}
    base = rows["large-only"]
    points = []
    for name, t in configs.items():
        r = rows[name]
        r["wall_ratio_vs_large"] = r["wall_s"] / base["wall_s"]
        r["quality_ratio"] = math.exp(r["mean_ll"] - base["mean_ll"])
        if t is not None:
            points.append({"threshold": t if math.isfinite(t) else "inf", "large_share": round(r["large_share"], 4),
                           "cost_param_weighted": round(r["cost_param_weighted"], 4),
                           "wall_ratio_vs_large": round(r["wall_ratio_vs_large"], 4),
                           "quality_ratio": round(r["quality_ratio"], 4)})
    header = ["config", "large share", "param cost", "wall s", "wall / large", "mean LL", "quality ratio",
              "GSM8K acc", "switches", "fwd tokens small/large"]
    table = md_table(header, [[n, r["large_share"], r["cost_param_weighted"], r["wall_s"], r["wall_ratio_vs_large"],
                               r["mean_ll"], r["quality_ratio"], r["gsm8k_acc"], r["switches"],
                               f"{r['forward_tokens']['small']}/{r['forward_tokens']['large']}"]
                              for n, r in rows.items()])
    target = [pt for pt in points if pt["large_share"] <= 0.45 and pt["quality_ratio"] >= 0.95
              and pt["wall_ratio_vs_large"] < 1.0]
    table += (f"\n\n{len(prompts)} prompts ({k_gsm} GSM8K, {len(prompts) - k_gsm} Spec-Bench), greedy, "
              f"max_new_tokens={max_new}, window={args.window}, min_dwell={args.min_dwell}; "
              f"params small {small.num_params / 1e6:.1f}M, large {large.num_params / 1e6:.1f}M. "
              f"Target (large share <= 45%, quality >= 95%, faster than large-only) met at: "
              f"{[pt['threshold'] for pt in target] or 'none'}")
    plot(points, Path(args.out) / f"{NAME}.png")
    write_results(NAME, {"bench": NAME, "points": points}, table, args.out, details={"rows": rows})


def plot(points, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs, ys = [pt["large_share"] for pt in points], [pt["quality_ratio"] for pt in points]
    ax.plot(xs, ys, "o-")
    for pt in points:
        ax.annotate(f"τ={pt['threshold']}", (pt["large_share"], pt["quality_ratio"]), fontsize=7)
    ax.axhline(0.95, ls="--", c="grey", lw=0.8)
    ax.axvline(0.45, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("large-model token share")
    ax.set_ylabel("quality vs large-only (exp Δ mean log-lik)")
    ax.set_title("entropy-adaptive switching")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
