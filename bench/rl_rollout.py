"""GRPO with TRL on SmolLM2-135M: TRL's own generation vs decodekit rollouts (independent / tree) as its rollout_func.

Task: templated single-digit addition ("What is 3 + 5?"), reward 1 when the completion's last number is
the sum (the base model scores ~0.3 at temperature 0.7). Three sources, the same settings (float32, KV
cache on, no gradient checkpointing, the same prompts, seed, completions per prompt, steps):
- ``trl``: ``GRPOTrainer``'s own generation (transformers ``generate``);
- ``independent``: ``GRPOTrainer`` with ``rollout_func("independent")`` (num_generations samples per prompt);
- ``tree``: ``TreePOTrainer`` with ``rollout_func("tree")`` (TreePO segment trees of width num_generations and
  TreePO's segment-level advantages).
Each source trains its own fresh copy of the model; the three trainers take turns step by step (one
runs at a time, ABBA order per round), so slow drift of a shared machine spreads over all of them.
Measured per step: rollout wall (``_generate``: prompts in, completions out), whole step wall, reward;
and for the decodekit sources the largest |logprob - TRL's own recomputation| over the first two steps.

    .venv/bin/python bench/rl_rollout.py [--quick]
"""

from __future__ import annotations

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


def arithmetic(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}? Answer with the number only."}],
                     "answer": str(a + b)})
    return rows


def last_number(text: str) -> str | None:
    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


def correct(completions, answer, **kwargs) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(last_number(t) == a) for t, a in zip(texts, answer)]


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
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from decodekit.integrations.trl import TreePOTrainer, rollout_func
    from decodekit.rollout.tree import TreeRollout

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            turns.wait(source)
            log["begin"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            log["step_s"].append(time.perf_counter() - log["begin"] - log.pop("check_s", 0.0))
            turns.next(source, finished=state.global_step >= state.max_steps)

    rollout = None
    if source != "trl":
        tree = TreeRollout(segment_len=args.segment_len, branch_factor=2, first_split=2)
        rollout = rollout_func("tree" if source == "tree" else "independent", tree=tree, seed=args.seed)
    base = TreePOTrainer if source == "tree" else GRPOTrainer

    class Timed(base):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            log["rollout_s"].append(time.perf_counter() - t0)
            log["tokens"].append(sum(len(c) for c in out[1]) / len(out[1]))
            return out

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if rollout is not None and len(log["rollout_s"]) <= 2:
                t0 = time.perf_counter()
                log["logprob_diff"].append(logprob_diff(self, out))
                log["check_s"] = time.perf_counter() - t0
            return out

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
    trainer = Timed(model=model, reward_funcs=[correct], args=config, train_dataset=Dataset.from_list(data),
                    processing_class=tokenizer, rollout_func=rollout, callbacks=[Clock()])
    return trainer, rollout


def logprob_diff(trainer, out) -> float:
    """Largest |sampling logprob - TRL's recomputation| (``_get_per_token_logps_and_entropies``) on the batch."""
    import torch

    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    with torch.no_grad():
        width = out["completion_ids"].size(1)
        theirs, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, width)
    keep = out["completion_mask"].bool()
    return float((out["sampling_per_token_logps"] - theirs)[keep].abs().max())


def run(args) -> dict:
    import torch

    from decodekit.models import hf_dir

    torch.set_num_threads(args.threads)
    model_dir = hf_dir(args.model)
    data = arithmetic(max(64, args.steps * args.prompts), args.seed)
    turns = Turns(list(SOURCES))
    logs = {s: {"rollout_s": [], "step_s": [], "tokens": [], "logprob_diff": []} for s in SOURCES}
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
        logs[s]["reward"] = [h["reward"] for h in trainers[s][0].state.log_history if "reward" in h]
        rollout = trainers[s][1]
        if rollout is not None:
            logs[s]["forward_tokens"] = [c.forward_tokens for c in rollout.calls]
    return logs


def window(xs: list[float], first: bool) -> list[float]:
    k = max(1, len(xs) // 5)
    return xs[:k] if first else xs[-k:]


def mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def interval(xs: list[float]) -> list[float]:
    """mean +- 1.96 standard errors over the last window's steps (each step: its prompts' completions)."""
    m = mean(xs)
    if len(xs) < 2:
        return [round(m, 3), round(m, 3)]
    se = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5
    return [round(m - 1.96 * se, 3), round(m + 1.96 * se, 3)]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--prompts", type=int, default=None, help="prompts per step")
    p.add_argument("--width", type=int, default=8, help="completions per prompt (num_generations)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_completion_length")
    p.add_argument("--segment-len", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 on a shared machine: HF generate on 2 oversubscribed threads ran ~4x slower)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "decodekit-rl-rollout"),
                   help="trainer output folders (nothing is saved)")
    args = p.parse_args()
    args.steps = args.steps or (2 if args.quick else 20)
    args.prompts = args.prompts or (1 if args.quick else 2)
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("rl_rollout needs TRL: pip install 'decodekit[rl]' (make setup installs it)")
    logs = run(args)
    med = {s: sorted(logs[s]["rollout_s"])[len(logs[s]["rollout_s"]) // 2] for s in SOURCES}
    step = {s: sorted(logs[s]["step_s"])[len(logs[s]["step_s"]) // 2] for s in SOURCES}
    first_last = {s: [round(mean(window(logs[s]["reward"], first)), 3) for first in (True, False)] for s in SOURCES}
    diffs = [d for s in ("independent", "tree") for d in logs[s]["logprob_diff"]]
    summary = {"bench": NAME, "rollout_s_per_step": {s: round(med[s], 3) for s in SOURCES},
               "step_s": {"trl": round(step["trl"], 3), "tree": round(step["tree"], 3)},
               "tree_vs_trl_rollout": round(med["tree"] / med["trl"], 3),
               "tree_vs_trl_step": round(step["tree"] / step["trl"], 3),
               "reward_first_last": {"trl": first_last["trl"], "tree": first_last["tree"]},
               "logprob_match_max_abs": float(f"{max(diffs):.3g}")}
    settings = (f"{args.model}, float32, KV cache on, no gradient checkpointing, {args.threads} torch threads; "
                f"{args.steps} GRPO steps x {args.prompts} prompts x {args.width} completions, max_completion_length="
                f"{args.max_tokens}, temperature={args.temperature}, lr={args.lr}, beta=0, seed={args.seed}; tree: "
                f"segment_len={args.segment_len}, branch_factor=2, first_split=2, TreePO advantages. Task: "
                "single-digit addition, reward = last number correct. Medians over steps; reward first/last = mean "
                "of the first / last fifth of the steps.")
    rows = [[s, med[s], step[s], mean(logs[s]["tokens"]), *first_last[s],
             str(interval(window(logs[s]["reward"], False)))] for s in SOURCES]
    header = ["source", "rollout s/step", "step s", "tokens/completion", "reward first", "reward last",
              "last-window 95% interval"]
    out = Path(args.out)
    name = f"{NAME}_quick" if args.quick else NAME
    plot(logs, out / f"{name}.png", args)
    write_results(name, summary, settings + "\n\n" + md_table(header, rows), out,
                  details={"settings": settings, "per_step": logs,
                           "final_reward_interval": {s: interval(window(logs[s]["reward"], False)) for s in SOURCES}})


def plot(logs: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for s, style in zip(SOURCES, ["k-o", "b-s", "g-^"]):
        ax.plot(range(1, len(logs[s]["reward"]) + 1), logs[s]["reward"], style, label=s, markersize=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward (fraction correct)")
    ax.set_title(f"{args.model}: {args.prompts} prompts x {args.width} completions per step")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
