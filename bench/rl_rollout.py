"""GRPO with TRL on SmolLM2-135M: TRL's own generation vs decodekit rollouts (independent / tree) as its rollout_func.

Task (default ``steps``): templated single-digit addition with a short reasoning ("What is 3 + 5? Explain step
by step, then give the answer."), reward 1 when the completion's last number is the sum; the base model scores
~0.25 at temperature 0.7 and writes ~100 tokens, so generation weighs in the step and tree segments share
prefixes (``number``: the bare answer, ~12-16 tokens; GSM8K is out: SmolLM2-135M-Instruct scores ~1%).
Three sources, the same settings (float32, KV cache on, no gradient checkpointing, the same prompts, seed,
completions per prompt, max_completion_length, steps):
- ``trl``: ``GRPOTrainer``'s own generation (transformers ``generate``) and loss;
- ``independent``: ``GRPOTrainer`` with ``rollout_func("independent")`` (num_generations samples per prompt);
- ``tree``: ``TreePOTrainer`` with ``rollout_func("tree")``: TreePO segment trees of width num_generations,
  TreePO's segment-level advantages, and the loss forward over each prompt's completions packed into their
  prefix tree (``integrations/trl/packing.py``: TRL's log-probabilities and gradients, shared tokens once).
Each source trains its own fresh copy of the model; the trainers take turns step by step (one runs at a
time, ABBA order per round), so slow drift of a shared machine spreads over all of them.
Measured per step: rollout wall (``_generate``), TRL's scoring after it, the loss forward, the backward, the
rest (optimizer), whole step wall, per-prompt rewards; for the decodekit sources the largest
|logprob - TRL's own recomputation| over the first two steps.

    .venv/bin/python bench/rl_rollout.py [--quick]
    # the full run: one invocation per seed (each writes <work>/run_seed<K>.json), then the summary over them
    for k in 0 1 2; do .venv/bin/python bench/rl_rollout.py --seed $k --run-only; done
    .venv/bin/python bench/rl_rollout.py --combine /tmp/decodekit-rl-rollout/run_seed*.json
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from decodekit.bench.common import md_table, parser, write_results  # noqa: E402

SOURCES = ("trl", "independent", "tree")
NAME = "rl_rollout"


# the question after "What is a + b?": "steps" asks for a short reasoning (~100 tokens, so generation weighs in the
# step and tree segments share prefixes); "number" for the bare number (~12-16 tokens)
TASKS = {"steps": "Explain step by step, then give the answer.", "number": "Answer with the number only."}


def arithmetic(num: int, seed: int, task: str = "steps") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}? {TASKS[task]}"}],
                     "answer": str(a + b)})
    return rows


def last_number(text: str) -> str | None:
    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


def correct(completions, answer, **kwargs) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(last_number(t) == a) for t, a in zip(texts, answer)]


def recording(log: dict, width: int):
    """``correct`` that also logs each prompt's mean reward (TRL's batch: a prompt's width completions in a row)."""
    def correct(completions, answer, **kwargs) -> list[float]:
        rewards = globals()["correct"](completions, answer)
        log["prompt_reward"].append([mean(rewards[i:i + width]) for i in range(0, len(rewards), width)])
        return rewards
    return correct


class Turns:
    """Trainers in threads, one step at a time each, in ABBA order per round (``TrainerCallback`` hooks)."""

    def __init__(self, names: list[str]):
        self.names, self.done = list(names), set()
        self.schedule, self.pos, self.round = list(names), 0, 0
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.pos < len(self.schedule) and self.schedule[self.pos] == name)

    def next(self, name: str, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(name)
            if self.pos < len(self.schedule) and self.schedule[self.pos] == name:
                self.pos += 1
            self.schedule = self.schedule[: self.pos] + [n for n in self.schedule[self.pos :] if n not in self.done]
            if self.pos >= len(self.schedule):
                self.round += 1
                live = [n for n in self.names if n not in self.done]
                self.schedule, self.pos = (live if self.round % 2 == 0 else live[::-1]), 0
            self.cond.notify_all()


def build(source: str, model_dir: Path, data, args, turns: Turns, log: dict):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    rollout = None
    if source != "trl":
        from decodekit.integrations.trl import rollout_func
        from decodekit.rollout.tree import TreeRollout

        tree = TreeRollout(segment_len=args.segment_len, branch_factor=2, first_split=2)
        rollout = rollout_func("tree" if source == "tree" else "independent", tree=tree, seed=args.seed)
    config = GRPOConfig(output_dir=str(Path(args.work) / source), per_device_train_batch_size=args.prompts * args.width,
                        num_generations=args.width, max_completion_length=args.max_tokens, max_steps=args.steps,
                        learning_rate=args.lr, temperature=args.temperature, beta=0.0, bf16=False,
                        gradient_checkpointing=False, use_cpu=True, logging_steps=1, report_to="none",
                        save_strategy="no", seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
                        disable_tqdm=True, log_completions=False)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = True
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = timed_class(source, rollout, log)(
        model=model, reward_funcs=[recording(log, args.width)], args=config, train_dataset=Dataset.from_list(data),
        processing_class=tokenizer, rollout_func=rollout, callbacks=[clock(source, turns, log)])
    return trainer, rollout


def clock(source: str, turns: Turns, log: dict):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            turns.wait(source)
            log["begin"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            log["step_s"].append(time.perf_counter() - log["begin"] - log.pop("check_s", 0.0))
            turns.next(source, finished=state.global_step >= state.max_steps)

    return Clock()


def timed_class(source: str, rollout, log: dict):
    """The source's trainer class, timing each part of a step into ``log["parts"]``."""
    from trl import GRPOTrainer

    from decodekit.integrations.trl import TreePOTrainer

    class Timed(TreePOTrainer if source == "tree" else GRPOTrainer):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            log["rollout_s"].append(time.perf_counter() - t0)
            log["tokens"].append(sum(len(c) for c in out[1]) / len(out[1]))
            return out

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            part = {"rollout": log["rollout_s"][-1], "score": time.perf_counter() - t0 - log["rollout_s"][-1]}
            log["parts"].append(part)
            if rollout is not None and len(log["rollout_s"]) <= 2:  # the check is not part of the step
                t1 = time.perf_counter()
                log["logprob_diff"].append(logprob_diff(self, out))
                log["check_s"] = time.perf_counter() - t1
            return out

        def compute_loss(self, model, inputs, *a, **kw):
            t0 = time.perf_counter()
            loss = super().compute_loss(model, inputs, *a, **kw)
            log["parts"][-1]["forward"] = time.perf_counter() - t0
            return loss

        def training_step(self, model, inputs, *a, **kw):
            t0 = time.perf_counter()
            out = super().training_step(model, inputs, *a, **kw)
            part = log["parts"][-1]
            total = time.perf_counter() - t0 - log.get("check_s", 0.0)
            part["backward"] = total - part["rollout"] - part["score"] - part["forward"]
            part["training_step"] = total
            return out

    return Timed


def logprob_diff(trainer, out) -> float:
    """Largest |sampling logprob - TRL's recomputation| (``GRPOTrainer._get_per_token_logps_and_entropies``,
    TRL's own per-row forward even in the tree trainer) on the batch."""
    import torch
    from trl import GRPOTrainer

    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    with torch.no_grad():
        width = out["completion_ids"].size(1)
        theirs, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, width)
    keep = out["completion_mask"].bool()
    return float((out["sampling_per_token_logps"] - theirs)[keep].abs().max())


def run(args) -> dict:
    """One seed: every source trained ``args.steps`` steps, taking turns; the per-step logs per source."""
    import torch

    from decodekit.models import hf_dir

    torch.set_num_threads(args.threads)
    model_dir = hf_dir(args.model)
    data = arithmetic(max(64, args.steps * args.prompts), args.seed, args.task)
    turns = Turns(list(SOURCES))
    logs = {s: {"rollout_s": [], "step_s": [], "tokens": [], "logprob_diff": [], "parts": [], "prompt_reward": []}
            for s in SOURCES}
    trainers = {s: build(s, model_dir, data, args, turns, logs[s]) for s in SOURCES}
    errors: dict[str, BaseException] = {}

    def train(source):
        try:
            trainers[source][0].train()
        except BaseException as err:  # noqa: BLE001 - reported after the others stop
            errors[source] = err
            turns.next(source, finished=True)

    threads = [threading.Thread(target=train, args=(s,), daemon=True) for s in SOURCES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next(iter(errors.values()))
    for s in SOURCES:
        trainer, rollout = trainers[s]
        logs[s].pop("begin", None)
        logs[s]["reward"] = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        logs[s]["pack_tokens"] = list(getattr(trainer, "pack_stats", []))  # (TRL's row tokens, packed tokens)
        if rollout is not None:
            logs[s]["forward_tokens"] = [c.forward_tokens for c in rollout.calls]
    return logs


def window(xs: list, first: bool) -> list:
    """The first / last third of the steps (at least one)."""
    k = max(1, len(xs) // 3)
    return xs[:k] if first else xs[-k:]


def mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def median(xs) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def interval(xs: list[float]) -> list[float]:
    """mean +- 1.96 standard errors."""
    m = mean(xs)
    if len(xs) < 2:
        return [round(m, 3), round(m, 3)]
    se = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5
    return [round(m - 1.96 * se, 3), round(m + 1.96 * se, 3)]


def final_groups(runs: list[dict], source: str) -> list[float]:
    """Each prompt's mean reward over the last third of the steps, over every seed (a prompt = 1 sample)."""
    return [r for run in runs for step in window(run[source]["prompt_reward"], False) for r in step]


def summarize(runs: list[dict]) -> tuple[dict, dict]:
    """The last-line summary over the seeds' runs, and the details (medians over every step of every seed)."""
    pooled = {s: {k: [x for run in runs for x in run[s][k]] for k in ("rollout_s", "step_s", "logprob_diff")}
              for s in SOURCES}
    med = {s: median(pooled[s]["rollout_s"]) for s in SOURCES}
    step = {s: median(pooled[s]["step_s"]) for s in SOURCES}
    first_last = {s: [round(mean([mean(window(run[s]["reward"], first)) for run in runs]), 3)
                      for first in (True, False)] for s in SOURCES}
    groups = {s: final_groups(runs, s) for s in SOURCES}
    diff = [t - r for t, r in zip(groups["tree"], groups["trl"])]  # paired: same seed, step and prompt
    diffs = pooled["independent"]["logprob_diff"] + pooled["tree"]["logprob_diff"]
    summary = {"bench": NAME, "rollout_s_per_step": {s: round(med[s], 3) for s in SOURCES},
               "step_s": {"trl": round(step["trl"], 3), "tree": round(step["tree"], 3)},
               "tree_vs_trl_rollout": round(med["tree"] / med["trl"], 3),
               "tree_vs_trl_step": round(step["tree"] / step["trl"], 3),
               "reward_first_last": {"trl": first_last["trl"], "tree": first_last["tree"]},
               "final_reward_interval": {"trl": interval(groups["trl"]), "tree": interval(groups["tree"])},
               "final_reward_tree_minus_trl": interval(diff), "final_reward_groups": len(diff),
               "seeds": len(runs), "logprob_match_max_abs": float(f"{max(diffs):.3g}")}
    details = {"step_parts_s": {s: parts_median(runs, s) for s in SOURCES},
               "reward_first_last": first_last, "step_s": step, "final_reward_interval_per_source":
               {s: interval(groups[s]) for s in SOURCES}}
    return summary, details


def parts_median(runs: list[dict], source: str) -> dict:
    parts = [p for run in runs for p in run[source]["parts"] if "training_step" in p]
    return {k: round(median([p[k] for p in parts]), 3) for k in ("rollout", "score", "forward", "backward")}


def options():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per seed (default 2 quick, 6 full)")
    p.add_argument("--task", choices=sorted(TASKS), default="steps")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 1 quick, 2 full)")
    p.add_argument("--width", type=int, default=8, help="completions per prompt (num_generations)")
    p.add_argument("--max-tokens", type=int, default=None, help="max_completion_length (default 64 quick, 128 full)")
    p.add_argument("--segment-len", type=int, default=None,
                   help="tree segment length (default max_tokens // 4: the tree is 2, 4, 8 wide after three segments; "
                        "with fewer segments than that it widens by fallback branches that add sequential steps)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 on a shared machine: HF generate on 2 oversubscribed threads ran ~4x slower)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "decodekit-rl-rollout"),
                   help="trainer output folders (nothing is saved) and each seed's run_seed<K>.json")
    p.add_argument("--run-only", action="store_true", help="write <work>/run_seed<K>.json, no summary")
    p.add_argument("--combine", nargs="+", default=None, help="summarize these run_seed<K>.json files (no training)")
    args = p.parse_args()
    args.steps = args.steps or (2 if args.quick else 6)
    args.prompts = args.prompts or (1 if args.quick else 2)
    args.max_tokens = args.max_tokens or (64 if args.quick else 128)
    args.segment_len = args.segment_len or max(1, args.max_tokens // 4)
    return args


def settings_of(args, seeds: list[int]) -> str:
    return (f"{args.model}, float32, KV cache on, no gradient checkpointing, {args.threads} torch thread(s); seeds "
            f"{seeds}, each: {args.steps} GRPO steps x {args.prompts} prompts x {args.width} completions, "
            f"max_completion_length={args.max_tokens}, temperature={args.temperature}, lr={args.lr}, beta=0; tree: "
            f"segment_len={args.segment_len}, branch_factor=2, first_split=2, TreePO advantages, packed loss forward. "
            f"Task {args.task!r}: single-digit addition ({TASKS[args.task]!r}), reward = last number correct. "
            "Times: medians over every step of every seed; reward first/last: mean of the first / last third of "
            "the steps; intervals: mean +- 1.96 s.e. over (seed, step, prompt) groups of the last third, the "
            "difference paired by seed, step and prompt (the same prompts for every source).")


def report(runs: list[dict], args, out: Path, name: str) -> None:
    summary, details = summarize(runs)
    settings = settings_of(args, [r["seed"] for r in runs])
    rows = [[s, summary["rollout_s_per_step"][s], details["step_s"][s], *details["step_parts_s"][s].values(),
             mean([t for r in runs for t in r[s]["tokens"]]), *details["reward_first_last"][s],
             str(details["final_reward_interval_per_source"][s])] for s in SOURCES]
    header = ["source", "rollout s", "step s", "parts: rollout", "score", "loss forward", "backward",
              "tokens/completion", "reward first", "reward last", "final 95% interval"]
    packed = [p for r in runs for p in r["tree"]["pack_tokens"]]
    note = (f"\n\nTree loss forward: {mean([b for _, b in packed]):.0f} packed tokens vs "
            f"{mean([a for a, _ in packed]):.0f} in TRL's rows per step. Final reward tree - trl (paired): "
            f"{summary['final_reward_tree_minus_trl']}.")
    plot(runs, out / f"{name}.png", args)
    write_results(name, summary, settings + "\n\n" + md_table(header, rows) + note, out,
                  details={"settings": settings, **details, "runs": runs})


def main() -> None:
    args = options()
    if args.combine:
        runs = [json.loads(Path(f).read_text()) for f in sorted(args.combine)]
        vars(args).update(runs[0]["args"])
        return report(runs, args, Path(args.out), NAME)
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("rl_rollout needs TRL: pip install 'decodekit[rl]' (make setup installs it)")
    kept = {k: v for k, v in vars(args).items() if k not in ("combine", "out")}
    logs = {"seed": args.seed, "args": kept, **run(args)}
    path = Path(args.work) / f"run_seed{args.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(logs))
    if args.run_only:
        return print(json.dumps({"bench": NAME, "run": str(path), "seed": args.seed}))
    report([logs], args, Path(args.out), f"{NAME}_quick" if args.quick else NAME)


def plot(runs: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for s, style in zip(SOURCES, ["k-o", "b-s", "g-^"]):
        steps = len(runs[0][s]["reward"])
        per_step = [mean([r[s]["reward"][i] for r in runs if i < len(r[s]["reward"])]) for i in range(steps)]
        ax.plot(range(1, steps + 1), per_step, style, label=s, markersize=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward over seeds")
    ax.set_title(f"{args.model}: {len(runs)} seed(s), {args.prompts} prompts x {args.width} completions per step")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
