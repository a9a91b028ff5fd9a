"""Entropy-adaptive switching: sweep the threshold, small = the distilled student, large = the default model.

For each threshold: the large model's token share, the paper's parameter-weighted cost, wall-clock
against large-only decoding (plain ``Sample`` on the large model), the overhead (wall ratio minus
cost ratio: switching steps, catch-up prefill, bookkeeping), and quality against large-only: GSM8K
accuracy (reported; near zero for a 135M model, so not used as the ratio) and, model-free, the large
model's mean log-likelihood of the generated text; ``quality_ratio`` is ``exp(mean_ll -
mean_ll_large_only)``, the ratio of per-token geometric-mean probabilities.

The method is judged against baselines at each threshold's measured large share s (``entropy_baselines``):
random switching (each window to the large model with probability s, averaged over seeds) and fixed
interleaving, on the same prompts with the same accounting; ``ead_minus_random`` is the quality-ratio
gain of the entropy rule over random switching with a paired bootstrap 95% interval over prompts.
``verified`` runs ``EntropySwitch(verify=tolerance)`` (speculative cascades): tolerance 0 must give
large-only output token for token.

Every configuration runs the same prompts (greedy), one request at a time (EAD is a latency method),
on fresh caches over the same loaded weights; configurations are interleaved per repeat and wall
times are medians. The switch at threshold 0 is exactly large-only decoding (tested), so it is not rerun.
A missing student is built first (``distill.ensure_student``; ``--quick``: a labeled stand-in).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from decodekit.bench.common import interleaved, md_table, median, parser, require_data, spec_bench, timed, write_results  # noqa: E402
from decodekit.bench.entropy_baselines import ScheduledSwitch, paired_bootstrap, pool_seeds, pooled_ratio  # noqa: E402

from decodekit.api import LLM  # noqa: E402
from decodekit.backends.hf import HFBackend  # noqa: E402
from decodekit.models import load_backend  # noqa: E402
from decodekit.strategies.entropy import EntropySwitch  # noqa: E402
from decodekit.training.distill import ensure_student  # noqa: E402

NAME = "entropy_switch"
BASELINE_SHARES = (0.2, 0.85)  # baselines around the target range (share 0.3-0.8), to bound the run time


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
    ids = torch.tensor([prompt_ids + output_ids], device=large.model.device)
    logits = large.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(output_ids, device=logits.device).unsqueeze(-1))
    return float(logp.sum()), len(output_ids)


def run_config(large, make_strategy, prompts, max_new_tokens):
    """One configuration on fresh caches (``make_strategy`` None: plain decoding on the large model)."""
    llm = LLM(backend=fresh(large))
    strategy = None if make_strategy is None else make_strategy()
    outs, seconds = [], 0.0
    for p in prompts:  # one request at a time: EAD is a latency method (batching mixes both models per step)
        out, took = timed(lambda p=p: llm.generate([{"role": "user", "content": p["prompt"]}], strategy=strategy,
                                                   temperature=0, max_new_tokens=max_new_tokens))
        outs.append(out)
        seconds += took
    return {"outs": outs, "seconds": seconds}


def summarize(name, runs, large, prompts) -> dict:
    outs = runs[0]["outs"]
    per_prompt = [large_loglik(large, list(o.prompt_token_ids), list(o.token_ids)) for o in outs]
    correct = [last_number(o.text) == p["answer"] for o, p in zip(outs, prompts) if p["source"] == "gsm8k"]
    extra = [o.stats.extra for o in outs]
    total = sum(o.usage.completion_tokens for o in outs)
    plain = "tokens_by_model" not in extra[0]
    num_large = total if plain else sum(e["tokens_by_model"]["large"] for e in extra)
    cost = 1.0 if plain else sum(e["cost_param_weighted"] * o.usage.completion_tokens
                                 for e, o in zip(extra, outs)) / total
    fwd = {"small": 0, "large": total} if plain else {m: sum(e["forward_tokens"][m] for e in extra)
                                                        for m in ("small", "large")}
    return {"config": name, "large_share": num_large / total, "cost_param_weighted": cost,
            "wall_s": median([r["seconds"] for r in runs]), "per_prompt": per_prompt,
            "mean_ll": sum(s for s, _ in per_prompt) / max(1, sum(n for _, n in per_prompt)),
            "gsm8k_acc": sum(correct) / max(1, len(correct)), "tokens": total, "forward_tokens": fwd,
            "switches": sum(e.get("num_switches", 0) for e in extra),
            "acceptance_rate": _acceptance(extra), "token_ids": [list(o.token_ids) for o in outs],
            "sample_text": outs[0].text[:200]}


def _acceptance(extra) -> float | None:
    drafted = sum(e.get("tokens_drafted", 0) for e in extra)
    return sum(e.get("tokens_kept", 0) for e in extra) / drafted if drafted else None


def finish_row(row, base) -> dict:
    row["wall_ratio_vs_large"] = row["wall_s"] / base["wall_s"]
    row["quality_ratio"] = math.exp(row["mean_ll"] - base["mean_ll"])
    return row


def sweep(configs: dict, large, prompts, max_new, repeats) -> dict:
    runs = interleaved({name: (lambda make=make: run_config(large, make, prompts, max_new))
                        for name, make in configs.items()}, repeats)
    return {name: summarize(name, runs[name], large, prompts) for name in configs}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--small", default="smollm2-135m-distill-8l")
    p.add_argument("--thresholds", default=None, help="comma-separated thresholds in bits ('inf' allowed)")
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--min-dwell", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seeds", type=int, default=None, help="random-switching seeds per share (default 3, quick 1)")
    p.add_argument("--tolerances", default=None, help="verified mode's tolerances (default 0,0.3,0.6,0.9; quick 0,0.5)")
    p.add_argument("--verify-threshold", type=float, default=2.0, help="entropy threshold of the verified runs")
    p.add_argument("--max-segment", type=int, default=8, help="drafts per verified segment at most")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    k_gsm, per_cat, max_new = (2, 0, 24) if args.quick else (6, 1, 64)
    taus = [float(t) for t in (args.thresholds or ("2,inf" if args.quick else "0.5,1,2,3,4,inf")).split(",")]
    seeds = args.seeds or (1 if args.quick else 3)
    tolerances = [float(t) for t in (args.tolerances or ("0,0.5" if args.quick else "0,0.3,0.6,0.9")).split(",")]
    prompts = gsm8k(k_gsm) + [{"prompt": q["turns"][0], "answer": None, "source": q["category"]}
                              for q in (spec_bench(per_cat) if per_cat else [])]
    large, small, small_info = load_pair(args)

    def ead(t):
        return lambda: EntropySwitch(small=fresh(small), threshold=t, window=args.window, min_dwell=args.min_dwell)

    rows = sweep({"large-only": None, **{f"tau={t}": ead(t) for t in taus}}, large, prompts, max_new, args.repeats)
    base = rows["large-only"]
    for row in rows.values():
        finish_row(row, base)
    points = [point(t, rows[f"tau={t}"]) for t in taus]
    second = {}
    for pt in points:
        if BASELINE_SHARES[0] < pt["large_share"] < BASELINE_SHARES[1]:
            second.update(baseline_configs(pt["large_share"], small, seeds, args.window))
    for tol in tolerances:
        second[f"verified tol={tol}"] = lambda tol=tol: EntropySwitch(
            small=fresh(small), threshold=args.verify_threshold, window=args.window, min_dwell=1, verify=tol,
            max_segment=args.max_segment)
    more = sweep(second, large, prompts, max_new, args.repeats)
    for row in more.values():
        finish_row(row, base)
    rows.update(more)
    summary = {"bench": NAME, "points": points, "baselines": baselines(points, rows, seeds),
               "verified": verified(tolerances, rows, base), "ead_minus_random": ead_minus_random(points, rows, seeds),
               "small_model": small_info}
    report(summary, rows, prompts, k_gsm, max_new, args, small, large)


def load_pair(args):
    """(large, small, what was done for the small model): a missing student is built first (``--quick``:
    a labeled stand-in in seconds; full: the distilled student, minutes), never a "not built yet" error."""
    small_spec, small_info = ensure_student(args.small, quick=args.quick, log=lambda m: print(m, file=sys.stderr))
    large = load_backend(args.model, device=args.device, cache_tokens=8192)
    small = load_backend(small_spec, device=args.device, cache_tokens=8192)
    return large, small, small_info


def point(t, row) -> dict:
    return {"threshold": t if math.isfinite(t) else "inf", "large_share": round(row["large_share"], 4),
            "cost_param_weighted": round(row["cost_param_weighted"], 4),
            "wall_ratio_vs_large": round(row["wall_ratio_vs_large"], 4),
            "overhead": round(row["wall_ratio_vs_large"] - row["cost_param_weighted"], 4),
            "quality_ratio": round(row["quality_ratio"], 4)}


def baseline_configs(share, small, seeds, window) -> dict:
    out = {f"random s={share:.4f} seed={seed}": (lambda seed=seed: ScheduledSwitch(
        fresh(small), share=share, kind="random", seed=seed, window=window)) for seed in range(seeds)}
    out[f"interleaved s={share:.4f}"] = lambda: ScheduledSwitch(fresh(small), share=share, kind="interleaved",
                                                                window=window)
    return out


def _random_rows(rows, share, seeds) -> list[dict]:
    return [rows[f"random s={share:.4f} seed={seed}"] for seed in range(seeds) if f"random s={share:.4f} seed={seed}"
            in rows]


def baselines(points, rows, seeds) -> dict:
    out = {"random": [], "interleaved": []}
    base = rows["large-only"]
    for pt in points:
        share = pt["large_share"]
        runs = _random_rows(rows, share, seeds)
        if not runs:
            continue
        pooled = pool_seeds([r["per_prompt"] for r in runs])
        out["random"].append(_baseline_entry(pt, runs, pooled_ratio(pooled, base["per_prompt"], range(len(pooled)))))
        inter = rows[f"interleaved s={share:.4f}"]
        out["interleaved"].append(_baseline_entry(pt, [inter], inter["quality_ratio"]))
    return out


def _baseline_entry(pt, runs, quality) -> dict:
    mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
    return {"threshold": pt["threshold"], "target_share": pt["large_share"],
            "large_share": round(mean("large_share"), 4), "quality_ratio": round(quality, 4),
            "wall_ratio_vs_large": round(mean("wall_ratio_vs_large"), 4),
            "cost_param_weighted": round(mean("cost_param_weighted"), 4), "seeds": len(runs)}


def ead_minus_random(points, rows, seeds) -> list[dict]:
    out = []
    base = rows["large-only"]["per_prompt"]
    for pt in points:
        runs = _random_rows(rows, pt["large_share"], seeds)
        if not runs:
            continue
        ead_rows = rows[f"tau={float(pt['threshold'])}"]["per_prompt"]
        gain, ci = paired_bootstrap(ead_rows, pool_seeds([r["per_prompt"] for r in runs]), base)
        out.append({"threshold": pt["threshold"], "large_share": pt["large_share"], "quality_gain": round(gain, 4),
                    "ci95": [round(ci[0], 4), round(ci[1], 4)]})
    return out


def verified(tolerances, rows, base) -> list[dict]:
    out = []
    for tol in tolerances:
        r = rows[f"verified tol={tol}"]
        out.append({"tolerance": tol, "quality_ratio": round(r["quality_ratio"], 4),
                    "wall_ratio_vs_large": round(r["wall_ratio_vs_large"], 4),
                    "large_share": round(r["large_share"], 4),
                    "acceptance_rate": None if r["acceptance_rate"] is None else round(r["acceptance_rate"], 4),
                    "identical_to_large": r["token_ids"] == base["token_ids"]})
    return out


def report(summary, rows, prompts, k_gsm, max_new, args, small, large) -> None:
    header = ["config", "large share", "param cost", "wall s", "wall / large", "mean LL", "quality ratio",
              "GSM8K acc", "switches", "fwd tokens small/large", "kept drafts"]
    table = md_table(header, [[n, r["large_share"], r["cost_param_weighted"], r["wall_s"], r["wall_ratio_vs_large"],
                               r["mean_ll"], r["quality_ratio"], r["gsm8k_acc"], r["switches"],
                               f"{r['forward_tokens']['small']}/{r['forward_tokens']['large']}",
                               "" if r["acceptance_rate"] is None else r["acceptance_rate"]]
                              for n, r in rows.items()])
    gains = "; ".join(f"s={g['large_share']}: {g['quality_gain']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]"
                      for g in summary["ead_minus_random"]) or "none"
    label = summary["small_model"]
    stand_in = " (QUICK STAND-IN: a cut student fitted for a few steps, not the distilled one)" \
        if label["quick_stand_in"] else ""
    table += (f"\n\n{len(prompts)} prompts ({k_gsm} GSM8K, {len(prompts) - k_gsm} Spec-Bench), greedy, "
              f"max_new_tokens={max_new}, window={args.window}, min_dwell={args.min_dwell}; small model "
              f"`{label['student']}`{stand_in}, {small.num_params / 1e6:.1f}M params, large "
              f"{large.num_params / 1e6:.1f}M. Verified runs: threshold {args.verify_threshold}, min_dwell 1, "
              f"max_segment {args.max_segment}.\n\nEntropy rule minus random switching at the same share "
              f"(quality-ratio gain, paired bootstrap 95% CI over prompts): {gains}")
    if label.get("built_now"):
        table += f"\n\nThe student was built in this run ({label['build_seconds']:.0f} s)."
    plot(summary, Path(args.out) / f"{NAME}.png")
    details = {"rows": {n: {k: v for k, v in r.items() if k not in ("token_ids",)} for n, r in rows.items()}}
    write_results(NAME, summary, table, args.out, details=details)


def plot(summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    series = [("entropy rule", summary["points"], "o-"), ("random", summary["baselines"]["random"], "s--"),
              ("interleaved", summary["baselines"]["interleaved"], "^:"), ("verified", summary["verified"], "D")]
    for label, pts, style in series:
        pts = sorted(pts, key=lambda pt: pt["large_share"])
        ax.plot([pt["large_share"] for pt in pts], [pt["quality_ratio"] for pt in pts], style, label=label)
    for pt in summary["points"]:
        ax.annotate(f"τ={pt['threshold']}", (pt["large_share"], pt["quality_ratio"]), fontsize=7)
    ax.axhline(0.95, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("large-model token share")
    ax.set_ylabel("quality vs large-only (exp Δ mean log-lik)")
    ax.set_title("entropy-adaptive switching vs baselines")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
