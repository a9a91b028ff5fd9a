"""The targets each issue names, checked against a benchmark's summary JSON."""

from __future__ import annotations

from typing import NamedTuple


class Target(NamedTuple):
    bench: str
    label: str
    target: str
    measure: object  # summary dict -> (figure, met: bool)


def _get(summary, *path):
    for key in path:
        if not isinstance(summary, dict) or key not in summary:
            raise KeyError("/".join(path))
        summary = summary[key]
    return summary


def _at_least(threshold, *path):
    def measure(s):
        value = _get(s, *path)
        return value, value >= threshold
    return measure


def _at_most(threshold, *path):
    def measure(s):
        value = _get(s, *path)
        return value, value <= threshold
    return measure


def _extreme_at_least(threshold, pick, *path):
    """The ``pick`` (max: best, min: worst) entry of a {name: value} figure, against ``threshold``."""
    def measure(s):
        values = {k: v for k, v in _get(s, *path).items() if v is not None}
        key = pick(values, key=values.get)
        return f"{values[key]} ({key})", values[key] >= threshold
    return measure


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


def _final_rewards(s):
    """Not below beyond noise: the paired (tree - trl) interval over seeds and prompts reaches 0 or above."""
    rewards = _get(s, "reward_first_last")
    diff = s.get("final_reward_tree_minus_trl")
    if diff is None:  # results from before the interval was reported
        return f"tree {rewards['tree'][1]}, trl {rewards['trl'][1]}", rewards["tree"][1] >= rewards["trl"][1]
    return f"tree {rewards['tree'][1]}, trl {rewards['trl'][1]}, tree - trl {diff}", diff[1] >= 0


def _entropy_point(s):
    ok = [p for p in _get(s, "points") if p["large_share"] <= 0.45 and p["quality_ratio"] >= 0.95
          and p["wall_ratio_vs_large"] < 1.0]
    best = min(ok, key=lambda p: p["large_share"]) if ok else None
    return (f"tau={best['threshold']}: share {best['large_share']}, quality {best['quality_ratio']}" if best
            else "no such threshold"), best is not None


def _ead_vs_random(s):
    """Every threshold with large share in [0.3, 0.8]: EAD's quality loss <= 0.7x random switching's, CI above 0."""
    random_at = {b["threshold"]: b for b in _get(s, "baselines", "random")}
    gains = {g["threshold"]: g for g in _get(s, "ead_minus_random")}
    checked = [p for p in _get(s, "points") if 0.3 <= p["large_share"] <= 0.8 and p["threshold"] in random_at]
    parts, ok = [], bool(checked)
    for p in checked:
        loss, random_loss = 1 - p["quality_ratio"], 1 - random_at[p["threshold"]]["quality_ratio"]
        lo = gains[p["threshold"]]["ci95"][0]
        ok = ok and loss <= 0.7 * random_loss and lo > 0
        parts.append(f"s={p['large_share']}: loss {loss:.3f} vs {random_loss:.3f}, CI low {lo:+.3f}")
    return "; ".join(parts) or "no threshold in that share range", ok


def _verified(pick):
    def measure(s):
        runs = _get(s, "verified")
        run = pick(runs)
        if run is None:
            return "no such setting", False
        fig = f"tolerance {run['tolerance']}: quality {run['quality_ratio']}, wall {run['wall_ratio_vs_large']}"
        return fig, True
    return measure


def _verified_strict(s):
    strict = [r for r in _get(s, "verified") if r["tolerance"] == 0]
    if not strict:
        return "not run", False
    r = strict[0]
    return (f"identical {r['identical_to_large']}, wall {r['wall_ratio_vs_large']}",
            r["identical_to_large"] is True and r["wall_ratio_vs_large"] <= 1.0)


def _wall_vs_cost(s):
    worst = max(_get(s, "points"), key=lambda p: abs(p["overhead"]))
    return f"worst {worst['overhead']:+.3f} (tau={worst['threshold']})", abs(worst["overhead"]) <= 0.1


def _tree_diversity(s):
    tree, independent = _get(s, "distinct_answers", "tree"), _get(s, "distinct_answers", "independent")
    return f"{tree} vs {independent}", tree >= 0.9 * independent


def _speculative_vs_assisted(s):
    best = max(_get(s, "mean_speedup").items(), key=lambda kv: kv[1])[0]
    value = _get(s, "speedup_vs_hf_assisted").get(best)
    return f"{value} ({best})", value is not None and value >= 1.2


TARGETS = [
    Target("throughput", "tokens/s vs transformers, batch 1", ">= 1.0x", _at_least(1.0, "ratio_vs_hf_bs1")),
    Target("throughput", "tokens/s vs transformers, batch 8", ">= 1.0x", _at_least(1.0, "ratio_vs_hf_bs8")),
    Target("throughput", "shared-prefix prefill tokens saved", ">= 0.80", _at_least(0.8, "prefill_tokens_saved_frac")),
    Target("speculative", "best draft: speedup over plain decoding", ">= 1.5x",
           _extreme_at_least(1.5, max, "mean_speedup")),
    Target("speculative", "best draft vs transformers assisted generation", ">= 1.2x", _speculative_vs_assisted),
    Target("speculative", "greedy output identical to plain", "true",
           lambda s: (_get(s, "greedy_identical"), _get(s, "greedy_identical") is True)),
    Target("constraints", "fewer constraint checks per token than masked", ">= 50x",
           _at_least(50, "eval_reduction_vs_masked")),
    Target("constraints", "wall-clock speedup vs masked, grammar", ">= 10x",
           _at_least(10, "speedup_vs_masked", "grammar")),
    Target("constraints", "wall-clock speedup vs masked, pattern matching", ">= 1.3x",
           _at_least(1.3, "speedup_vs_masked", "pattern_matching")),
    Target("constraints", "validity of returned outputs (a run cut off by the token limit is flagged "
           "constraint_failed, not returned as valid)", "100%",
           lambda s: (_get(s, "returned_outputs_valid"), _get(s, "returned_outputs_valid") is True)),
    Target("constraints", "runs that finished valid within the token limit", "reported",
           lambda s: (min(_numbers(_get(s, "valid_rate"))), True)),
    Target("constraint_peers", "decodekit AWRS+SMC tokens/s vs genlm-control's, worst task", ">= 1.0x",
           _extreme_at_least(1.0, min, "decodekit_smc5_vs_genlm_smc5")),
    Target("entropy_switch", "large share <= 45%, quality >= 95%, faster than large-only", "a threshold exists",
           _entropy_point),
    Target("entropy_switch", "share 0.3-0.8: EAD quality loss <= 0.7x random switching's, 95% CI of the gain > 0",
           "every such threshold", _ead_vs_random),
    Target("entropy_switch", "verified, tolerance 0: greedy identical to large-only, wall <= 1.0x", "true",
           _verified_strict),
    Target("entropy_switch", "a verified setting with quality >= 0.95 at wall <= 0.85x large-only", "exists",
           _verified(lambda runs: next((r for r in runs if r["quality_ratio"] >= 0.95
                                        and r["wall_ratio_vs_large"] <= 0.85), None))),
    Target("entropy_switch", "plain EAD: wall ratio within 0.1 of the parameter-weighted cost ratio", "every point",
           _wall_vs_cost),
    Target("tree_rollout", "forward tokens, tree / independent", "<= 0.65", _at_most(0.65, "forward_tokens_ratio")),
    Target("tree_rollout", "wall-clock, tree / independent", "<= 0.75", _at_most(0.75, "wall_ratio")),
    Target("tree_rollout", "distinct answers vs independent", ">= 90%", _tree_diversity),
    Target("rl_rollout", "GRPO rollout wall per step, tree / TRL's own generation", "<= 0.6",
           _at_most(0.6, "tree_vs_trl_rollout")),
    Target("rl_rollout", "GRPO step wall, tree / TRL's own generation", "<= 0.75", _at_most(0.75, "tree_vs_trl_step")),
    Target("rl_rollout", "rollout logprobs vs the trainer's recomputation, max |diff| (float32)", "<= 1e-4",
           _at_most(1e-4, "logprob_match_max_abs")),
    Target("rl_rollout", "final reward, tree not below TRL's own generation beyond noise (paired 95% interval)",
           "upper bound >= 0",
           _final_rewards),
    Target("server_load", "16 clients vs one at a time, output tokens/s", ">= 3x",
           _at_least(3.0, "batching_speedup_16")),
    Target("server_load", "errors", "0", _at_most(0, "errors")),
    Target("server_load", "16 clients with 16 different JSON schemas vs one at a time, output tokens/s", ">= 3x",
           _at_least(3.0, "schemas_speedup")),
    Target("server_load", "errors, 16 different JSON schemas", "0", _at_most(0, "schemas_errors")),
    Target("server_load", "peak batch, 16 clients with max_tokens 2048 and short answers", ">= 16",
           _at_least(16, "peak_batch_2048")),
    Target("server_load", "inter-token gap p99 of 8 streams while a fresh ~8k-token prompt arrives", "<= 1.5 s",
           _at_most(1.5, "long_prompt_itl_p99_s")),
    Target("server_load", "returned tool calls that validate, 16 clients with their own tools", "100%",
           _at_least(1.0, "tools", "valid_calls")),
    Target("server_load", "16 tool clients vs one at a time, tokens/s", ">= 3x", _at_least(3.0, "tools", "speedup_16")),
    Target("server_load", "errors, 16 tool clients", "0", _at_most(0, "tools", "errors")),
    Target("mixed_traffic", "main-model forward passes per engine step, 16 mixed requests", "<= 1.0",
           _at_most(1.0 + 1e-9, "forwards_per_step")),
    Target("mixed_traffic", "mixed batch vs plain batch of 16, tokens/s", ">= 0.7x", _at_least(0.7, "mixed_vs_plain")),
    Target("mixed_traffic", "mixed batch vs the same requests one at a time, tokens/s", ">= 4x",
           _at_least(4.0, "mixed_vs_serial")),
    Target("mixed_traffic", "n-gram speculative vs plain, greedy batch of 4", ">= 1.0x",
           _at_least(1.0, "spec_batch_speedup", "4")),
    Target("mixed_traffic", "n-gram speculative vs plain, greedy batch of 16", ">= 1.0x",
           _at_least(1.0, "spec_batch_speedup", "16")),
    Target("constrained_speculative", "constrained + drafts vs constrained alone, JSON, tokens/s", ">= 1.5x",
           _at_least(1.5, "speedup", "json")),
    Target("constrained_speculative", "constrained + drafts vs constrained alone, regex, tokens/s", ">= 1.2x",
           _at_least(1.2, "speedup", "regex")),
    Target("constrained_speculative", "vs outlines tokens/s, JSON", ">= 1.2x", _at_least(1.2, "vs_outlines", "json")),
    Target("constrained_speculative", "vs outlines tokens/s, regex", ">= 1.2x", _at_least(1.2, "vs_outlines", "regex")),
    Target("constrained_speculative", "greedy identical to constrained decoding", "true",
           lambda s: (_get(s, "greedy_identical"), _get(s, "greedy_identical") is True)),
    Target("constrained_speculative", "returned outputs valid", "true",
           lambda s: (_get(s, "returned_outputs_valid"), _get(s, "returned_outputs_valid") is True)),
    *[Target("constrained_batch", f"constrained vs plain tokens/s, {key}, greedy", ">= 0.9x",
             _at_least(0.9, "vs_plain", key)) for key in ("json/1", "json/8", "json/16", "regex/8")],
    *[Target("constrained_batch", f"constrained vs plain tokens/s, {key}, T = 0.7", ">= 0.9x",
             _at_least(0.9, "vs_plain_sampled", key)) for key in ("json/1", "json/8", "json/16", "regex/8")],
    Target("constrained_batch", "llguidance mask time per token, p50", "<= 100 us", _at_most(100, "mask_us_p50")),
    Target("constrained_batch", "constraint CPU time per token, p50 (mask, EOS check, advance)", "<= 100 us",
           _at_most(100, "constraint_us_per_token", "p50")),
    Target("constrained_batch", "constraint CPU time per token, p99", "<= 2000 us",
           _at_most(2000, "constraint_us_per_token", "p99")),
    Target("constrained_batch", "compile time over the MaskBench sample, p50", "<= 10 ms",
           _at_most(10, "compile_ms_p50")),
    Target("constrained_batch", "vs outlines 1.3.3 tokens/s at batch 1, JSON", ">= 1.2x",
           _at_least(1.2, "vs_outlines_bs1", "json")),
    Target("constrained_batch", "vs outlines 1.3.3 tokens/s at batch 1, regex", ">= 1.2x",
           _at_least(1.2, "vs_outlines_bs1", "regex")),
    Target("constrained_batch", "constrained outputs valid", "1.0", _at_least(1.0, "valid_rate")),
    Target("constrained_batch", "predicate walk: checks per token (mean)", "reported",
           lambda s: (_get(s, "checks_per_token_predicate", "mean"),
                      _get(s, "checks_per_token_predicate", "mean") is not None)),
    Target("server_abuse", "hangs under hostile requests", "0", _at_most(0, "hangs")),
    Target("server_abuse", "5xx answers to hostile requests", "0", _at_most(0, "server_errors_5xx")),
    Target("server_abuse", "probe p99 latency during the worst abusive case (a fresh 8,000-token prompt included)",
           "<= 2000 ms", _at_most(2000, "worst_probe_p99_ms")),
    Target("server_abuse", "memory after 100 distinct strategy option sets vs after the first", "<= 1.10x",
           _at_most(1.10, "memory_after_100_options_vs_first")),
    Target("json_schema_coverage", "MaskBench schemas accepted (of 424)", "424",
           _at_least(424, "maskbench", "schemas_accepted")),
    Target("json_schema_coverage", "MaskBench valid instances with a rejected byte prefix", "0",
           _at_most(0, "maskbench", "valid_prefixes_rejected")),
    Target("json_schema_coverage", "MaskBench invalid instances accepted", "0",
           _at_most(0, "maskbench", "invalid_accepted")),
    Target("json_schema_coverage", "MaskBench, default generation mask: canonical valid instances refused", "0",
           _at_most(0, "maskbench", "default_mask", "valid_rejected")),
    Target("json_schema_coverage", "MaskBench, default path: invalid instances ended as complete", "0",
           _at_most(0, "maskbench", "default_mask", "invalid_accepted")),
    Target("json_schema_coverage", "JSON-Schema-Test-Suite schemas accepted", ">= 95%",
           _at_least(0.95, "test_suite", "accepted_share")),
    Target("json_schema_coverage", "JSON-Schema-Test-Suite instances judged as the suite says (format asserted "
           "aside)", "all", lambda s: (_get(s, "test_suite", "wrong"), _get(s, "test_suite", "all_judged_as_suite"))),
    Target("json_schema_coverage", "generation: returned outputs valid", "100%",
           _at_least(1.0, "generation", "valid_rate")),
    Target("json_schema_coverage", "generation: completed within 128 tokens", ">= 90%",
           _at_least(0.9, "generation", "completed_rate")),
    Target("json_schema_coverage", "generation: checker path vs automaton path, tokens/s", ">= 0.5x",
           _at_least(0.5, "generation", "checker_vs_automaton")),
    Target("throughput_llamacpp", "decodekit on llama.cpp / direct llama.cpp, batch 1 (greedy, 64 tokens)", ">= 0.85x",
           _at_least(0.85, "ratio_vs_direct_bs1")),
    Target("throughput_llamacpp", "decodekit on llama.cpp / the direct multi-sequence loop, batch 8", ">= 0.9x",
           _at_least(0.9, "ratio_vs_direct_bs8")),
    Target("throughput_llamacpp", "n-gram speculative / plain on this backend, Spec-Bench mean (batch 1)", ">= 1.2x",
           _at_least(1.2, "speculative_speedup")),
    Target("throughput_llamacpp", "n-gram speculative / plain, worst category", ">= 0.98x",
           _at_least(0.98, "speculative_min_category")),
    Target("throughput_llamacpp", "greedy output identical to direct llama.cpp (batch 1)", "yes",
           lambda s: (_get(s, "greedy_identical_to_direct"), _get(s, "greedy_identical_to_direct") is True)),
    Target("throughput_llamacpp", "server with 16 clients / the direct batch-16 loop, output tokens/s", ">= 0.85x",
           _at_least(0.85, "server_16_clients", "ratio")),
    Target("throughput_llamacpp", "server with 16 clients: errors", "0",
           lambda s: (_get(s, "server_16_clients", "errors"), _get(s, "server_16_clients", "errors") == 0)),
    Target("tree_rollout_llamacpp", "forward tokens on llama.cpp, tree / independent", "<= 0.65",
           _at_most(0.65, "forward_tokens_ratio")),
    Target("tree_rollout_llamacpp", "wall-clock on llama.cpp, tree / independent", "<= 0.75",
           _at_most(0.75, "wall_ratio")),
    Target("throughput_vllm", "decodekit on vLLM vs direct vLLM, worst batch size", ">= 0.95x",
           _at_least(0.95, "vllm_overhead_ratio")),
    Target("throughput_vllm", "vLLM backend vs transformers backend, batch 8", ">= 1.5x",
           _at_least(1.5, "vllm_vs_hf_backend", "8")),
    Target("tree_rollout_vllm", "forward tokens on vLLM, tree / independent", "< 1.0 (reported)",
           _at_most(1.0, "forward_tokens_ratio")),
]


def check(bench: str, summary: dict | None) -> list[tuple[str, str, str, str]]:
    """(label, target, figure, verdict) rows for one benchmark's summary."""
    rows = []
    for t in (t for t in TARGETS if t.bench == bench):
        if summary is None:
            rows.append((t.label, t.target, "n/a", "not run"))
            continue
        try:
            figure, met = t.measure(summary)
            verdict = "reported" if t.target == "reported" else "met" if met else "missed"
            rows.append((t.label, t.target, str(figure), verdict))
        except (KeyError, TypeError, ValueError) as e:
            rows.append((t.label, t.target, "n/a", f"missing field {e}"))
    return rows
