"""``decodekit draft-head``: train the EAGLE-style draft head of ``decodekit.drafting.head`` on a
target's own answers (see that module for the architecture), and build a labeled quick stand-in
for benchmark runs on a fresh machine."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from decodekit.drafting.head import DraftHead, HeadShape, head_path, save_head

# ---- training ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadRecipe:
    vocab: int = 8192
    epochs: int = 3
    lr: float = 1e-3
    warmup: int = 50
    feature_weight: float = 1.0
    noise: float = 0.05  # uniform feature noise (x the features' RMS) on the target's features
    passes: int = 3  # chained draft steps trained together (later ones read the head's own predictions)
    max_len: int = 768
    val_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab", "epochs", "max_len", "passes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@torch.inference_mode()
def target_features(model, sequences: list[list[int]], max_len: int, batch: int = 1, log=print,
                    prompt_lens: list[int] | None = None) -> list[dict]:
    """Teacher-forced final hidden states (float16) and argmax tokens of the target per sequence.

    Sequences run in length-sorted, right-padded batches (causal attention: padding after a
    sequence cannot change its positions).
    """
    sequences = [ids[:max_len] for ids in sequences]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[dict | None] = [None] * len(sequences)
    t0 = time.perf_counter()
    for done, start in enumerate(range(0, len(order), batch)):
        group = order[start : start + batch]
        width = max(len(sequences[i]) for i in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        hidden = model.model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).last_hidden_state
        for row, i in enumerate(group):  # row by row: a whole batch's logits would not fit
            n = len(sequences[i])
            argmax = model.lm_head(hidden[row, :n]).argmax(-1)
            out[i] = {"ids": torch.tensor(sequences[i]), "features": hidden[row, :n].half(), "argmax": argmax,
                      "loss_from": prompt_lens[i] - 1 if prompt_lens else 1}
        if log and (done + 1) % max(1, 100 // batch) == 0:
            log(f"features {min(start + batch, len(order))}/{len(order)} ({time.perf_counter() - t0:.0f} s)")
    return out


def top_vocab(records: list[dict], size: int) -> torch.Tensor:
    counts = torch.zeros(int(max(int(r["argmax"].max()) for r in records)) + 1, dtype=torch.long)
    for r in records:
        counts += torch.bincount(r["argmax"], minlength=len(counts))[: len(counts)]
    size = min(size, int((counts > 0).sum()))
    return counts.topk(size).indices.sort().values


def unrolled(head: DraftHead, ids: torch.Tensor, feats: torch.Tensor, passes: int, noise: float = 0.0,
             starts: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Predicted features of ``passes`` chained drafts, as drafting sees them.

    Entry j reads token j and the feature at j - 1 and predicts the feature at j. Pass 1 reads the
    target's features at every entry (causal). A chain starting at entry c continues it: its p-th
    draft is entry c + p - 1, reads the (p-1)-th draft's predicted feature, and attends to the
    target-fed entries up to c and to its own chain, exactly the keys a p-th chained draft sees at
    inference. ``starts``: the chains to unroll (default: every start whose chain fits).
    Returns pass 1's (T - 1, h) predictions (row r: entry r + 1) and, per later pass, (chains, h).
    """
    t = len(ids)
    inputs = feats[:-1]
    if noise:
        inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * noise * inputs.pow(2).mean().sqrt()
    entries = torch.arange(1, t, device=ids.device)
    x, q, k, v = head.project(ids[1:].unsqueeze(0), inputs.unsqueeze(0), entries)
    causal = torch.ones(t - 1, t - 1, dtype=torch.bool, device=ids.device).tril()
    outs = [head.attend(x, q, k, v, causal)[0]]
    if starts is None:
        starts = torch.arange(1, t - passes + 1, device=ids.device)
    if passes < 2 or len(starts) == 0:
        return outs
    keys, values, prev = [k], [v], outs[0][starts - 1]
    target_fed = entries.unsqueeze(0) <= starts.unsqueeze(1)  # (chains, T - 1)
    own = torch.eye(len(starts), dtype=torch.bool, device=ids.device)
    for p in range(2, passes + 1):
        at = starts + p - 1
        x, q, k, v = head.project(ids[at].unsqueeze(0), prev.unsqueeze(0), at)
        keys.append(k)
        values.append(v)
        mask = torch.cat([target_fed] + [own] * (p - 1), dim=1)
        prev = head.attend(x, q, torch.cat(keys, dim=2), torch.cat(values, dim=2), mask)[0]
        outs.append(prev)
    return outs


def _tensors(record: dict, device):
    return record["ids"].to(device), record["features"].float().to(device), record["argmax"].to(device)


def _answer_start(record: dict) -> int:
    """The first entry whose prediction is an answer token (entry j predicts token j + 1)."""
    return max(1, record.get("loss_from", 1))


def _answer_passes(outs: list[torch.Tensor], starts: torch.Tensor, first: int, length: int):
    """(pass, predictions, positions whose target features / argmax they predict), answer positions only."""
    for p, pred in enumerate(outs, start=1):
        if p == 1:
            yield p, pred[first - 1 :], torch.arange(first, length, device=pred.device)
        else:
            yield p, pred, starts + p - 1


PASS_WEIGHT = 0.8  # pass p's loss weight is PASS_WEIGHT ** (p - 1)


TRAIN_CHAINS = 64  # chains unrolled per sequence in training (pass 1 covers every position)


def sequence_loss(head: DraftHead, record: dict, lookup: torch.Tensor, recipe: HeadRecipe, device):
    """Cross-entropy on the target's argmax (head vocabulary) + smooth-L1 on its features, per pass,
    on the answer's positions (``record["loss_from"]``: drafting only ever continues answers)."""
    ids, feats, argmax = _tensors(record, device)
    first = _answer_start(record)
    fits = len(ids) - recipe.passes - first + 1  # chain starts first .. len - passes
    if fits > TRAIN_CHAINS:
        starts = (torch.randperm(fits, device=device)[:TRAIN_CHAINS] + first).sort().values
    else:
        starts = torch.arange(first, first + max(fits, 0), device=device)
    total, first_ce = 0.0, None
    outs = unrolled(head, ids, feats, recipe.passes, recipe.noise, starts)
    for p, pred, at in _answer_passes(outs, starts, first, len(ids)):
        labels = lookup[argmax[at]]  # -1 where the target's token is outside the head's vocabulary
        keep = labels >= 0
        ce = F.cross_entropy(head.logits(pred[keep]), labels[keep]) if keep.any() else pred.sum() * 0
        first_ce = ce if first_ce is None else first_ce
        total = total + PASS_WEIGHT ** (p - 1) * (ce + recipe.feature_weight * F.smooth_l1_loss(pred, feats[at]))
    return total, first_ce


def fit_head(head: DraftHead, records: list[dict], recipe: HeadRecipe, log=print, max_seconds: float = 0) -> dict:
    """AdamW on cross-entropy (target argmax) + smooth-L1 (target features); returns validation metrics.

    ``max_seconds`` (0: none) stops training early, e.g. on a borrowed machine."""
    device = head.fc.weight.device
    records = [r for r in records if len(r["ids"]) - _answer_start(r) > recipe.passes]  # answers cut off
    rng = random.Random(recipe.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    n_val = int(len(order) * recipe.val_fraction)
    val, train = [records[i] for i in order[:n_val]], [records[i] for i in order[n_val:]]
    lookup = torch.full((head.embed.shape[0],), -1, dtype=torch.long, device=device)
    lookup[head.vocab_ids] = torch.arange(len(head.vocab_ids), device=device)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    total = recipe.epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / recipe.warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * s / total))))
    from tqdm.auto import tqdm

    t0, step = time.perf_counter(), 0
    bar = tqdm(total=total, desc="draft head", unit="step", disable=log is None)
    for epoch in range(recipe.epochs):
        rng.shuffle(train)
        for record in train:
            loss, ce = sequence_loss(head, record, lookup, recipe, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if max_seconds and time.perf_counter() - t0 > max_seconds:
                break
            if log and step % 200 == 0:
                log(f"epoch {epoch} step {step}/{total} ce {ce.item():.3f} ({time.perf_counter() - t0:.0f} s)")
        if log and val:
            log(f"epoch {epoch}: validation {evaluate_head(head, val, lookup)}")
        if max_seconds and time.perf_counter() - t0 > max_seconds:
            log and log(f"stopped at {max_seconds:.0f} s (step {step}/{total})")
            break
    bar.close()
    return evaluate_head(head, val or train[:20], lookup)


@torch.no_grad()
def evaluate_head(head: DraftHead, records: list[dict], lookup: torch.Tensor, passes: int = 3) -> dict:
    """Teacher-forced top-1 agreement with the target's argmax of the 1st, 2nd, ... chained draft on
    the answers' positions, and the expected accepted drafts per verify (greedy, chain of ``passes``)."""
    device = head.fc.weight.device
    hits, counts, chain = [0] * passes, [0] * passes, []
    for record in records:
        ids, feats, argmax = _tensors(record, device)
        first = _answer_start(record)
        starts = torch.arange(first, len(ids) - passes + 1, device=device)
        outs = unrolled(head, ids, feats, passes, starts=starts)
        ok = []
        for p, pred, at in _answer_passes(outs, starts, first, len(ids)):
            right = head.vocab_ids[head.logits(pred).argmax(-1)] == argmax[at]
            hits[p - 1] += int(right.sum())
            counts[p - 1] += len(right)
            ok.append(right)
        # a chain from entry c: its first draft is pass 1's row c - 1, its p-th is row c - 1 of pass p
        n = len(starts)
        if n and len(ok) == passes:
            run = torch.ones(n, dtype=torch.bool, device=device)
            accepted = torch.zeros(n, device=device)
            for right in ok:
                run = run & right[:n]
                accepted += run
            chain.append(accepted)
    rates = [h / c if c else 0.0 for h, c in zip(hits, counts)]
    mean_chain = float(torch.cat(chain).mean()) if chain else 0.0
    return {"top1_agreement": rates[0], "agreement_by_draft": [round(r, 4) for r in rates],
            "mean_accepted_chain": round(mean_chain, 3), "positions": counts[0]}


# ---- the `decodekit draft-head` command -------------------------------------------------------------

HOLDOUT_PER_CATEGORY = 5  # Spec-Bench prompts per category kept out of training (the benchmark uses the first 2)


def default_prompts(num_gsm8k: int = 600) -> list[str]:
    """Spec-Bench first turns minus the first ``HOLDOUT_PER_CATEGORY`` of each category, and GSM8K questions."""
    from decodekit.paths import data_dir

    data = data_dir()
    spec, gsm = data / "spec_bench" / "question.jsonl", data / "gsm8k" / "test.jsonl"
    if not spec.exists() or not gsm.exists():
        raise ValueError(f"default training prompts need Spec-Bench and GSM8K under {data} "
                         "(set DECODEKIT_DATA, or pass --prompts / --data)")
    seen: dict[str, int] = {}
    prompts = []
    for line in spec.read_text().splitlines():
        q = json.loads(line)
        seen[q["category"]] = seen.get(q["category"], 0) + 1
        if seen[q["category"]] > HOLDOUT_PER_CATEGORY:
            prompts.append(q["turns"][0])
    prompts += [json.loads(line)["question"] for line in gsm.read_text().splitlines()[:num_gsm8k]]
    return prompts


def read_prompts(path: str) -> list[str]:
    """One prompt per line: a JSON object with "prompt" (or "question", or "turns") or plain text."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            out.append(line)
            continue
        out.append(row.get("prompt") or row.get("question") or row["turns"][0] if isinstance(row, dict) else str(row))
    return out


def generate_sequences(model_name: str, prompts: list[str], max_new_tokens: int, *, temperatures=(0.0, 0.8),
                       device: str | None = None, batch: int = 32, log=print) -> list[tuple[list[int], int]]:
    """(prompt + answer token ids, prompt length), one answer per prompt and temperature, by decodekit itself."""
    from decodekit.api import LLM

    llm = LLM(model_name, device=device, max_batch_size=batch, cache_tokens=batch * (max_new_tokens + 1024))
    chats = [[{"role": "user", "content": p}] for p in prompts]
    out = []
    for temperature in temperatures:
        t0 = time.perf_counter()
        for start in range(0, len(chats), batch):
            for c in llm.generate(chats[start : start + batch], temperature=temperature,
                                  max_new_tokens=max_new_tokens, seed=start):
                out.append((list(c.prompt_token_ids) + list(c.choices[0].token_ids), len(c.prompt_token_ids)))
        log(f"generated {len(chats)} answers at temperature {temperature} ({time.perf_counter() - t0:.0f} s)")
    return out


def train(args, prompts: list[str] | None = None) -> Path:
    """Generate answers, take the target's features and fit a head per ``args`` (the CLI's options);
    ``prompts`` overrides the prompt source."""
    from decodekit.models import load_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = HeadRecipe(vocab=args.vocab, epochs=args.epochs, lr=args.lr, seed=args.seed, passes=args.passes)
    sequences, prompt_lens = [], []
    for path in args.data or []:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        sequences += [r["prompt_ids"] + r["output_ids"] for r in rows]
        prompt_lens += [len(r["prompt_ids"]) for r in rows]
    if not args.data or args.prompts or args.generate or prompts:
        prompts = prompts or (read_prompts(args.prompts) if args.prompts else default_prompts(args.gsm8k))
        temps = tuple(float(t) for t in args.temperatures.split(","))
        for ids, prompt_len in generate_sequences(args.model, prompts, args.gen_tokens, temperatures=temps,
                                                  device=args.device, batch=args.gen_batch):
            sequences.append(ids)
            prompt_lens.append(prompt_len)
    backend = load_backend(args.model, device=args.device)
    model = backend.model
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    records = target_features(model, sequences, recipe.max_len, batch=args.gen_batch, prompt_lens=prompt_lens)
    head = DraftHead(HeadShape.of(model.config), top_vocab(records, recipe.vocab)).to(model.device).bind(model)
    head.init_from(model.model.layers[-1])
    metrics = fit_head(head, records, recipe, max_seconds=args.max_seconds)
    print(f"validation: {metrics}")
    recipe_info = {"recipe": asdict(recipe), "sequences": len(sequences), "tokens": sum(len(r["ids"]) for r in records),
                   "seconds": round(time.perf_counter() - t0), "device": str(model.device), "validation": metrics,
                   "data": args.data or args.prompts or "default (Spec-Bench minus holdout, GSM8K)"}
    return save_head(head.cpu(), args.name or args.model, recipe_info, args.out)


# A stand-in head for benchmark runs on a fresh machine: 16 training prompts, greedy 32-token answers,
# 15 s of fitting (~1 minute on CPU). Results made with it say so; `decodekit draft-head` trains the real one.
QUICK_HEAD = {"prompts": 16, "gen_tokens": 32, "max_seconds": 15.0}


def ensure_head(model_name: str, *, device: str | None = None, log=print) -> tuple[Path, dict]:
    """(path, what was done) of a draft head for ``model_name``: the trained one where it exists, else a
    labeled quick stand-in (``QUICK_HEAD``), built here once and reused."""
    path = head_path(model_name)
    if (path / "head.safetensors").exists():
        return path, {"head": "trained", "built_now": False, "quick_stand_in": False}
    path = path.with_name(path.name + "-quick")
    info = {"head": "quick stand-in", "built_now": False, "quick_stand_in": True}
    if not (path / "head.safetensors").exists():
        log(f"no draft head for {model_name!r}: building a quick stand-in ({QUICK_HEAD}); "
            f"train the real one with `decodekit draft-head --model {model_name}`")
        started = time.perf_counter()
        args = quick_head_args(model_name, device, str(path))
        train(args, prompts=default_prompts(num_gsm8k=QUICK_HEAD["prompts"])[-QUICK_HEAD["prompts"]:])
        info.update(built_now=True, build_seconds=round(time.perf_counter() - started, 1))
        log(f"built {path} in {info['build_seconds']:.0f} s")
    return path, info


def quick_head_args(model_name: str, device: str | None, out: str):
    import argparse

    return argparse.Namespace(
        model=model_name, device=device, out=out, name=None, data=None, prompts=None, generate=False, gsm8k=0,
        temperatures="0", gen_tokens=QUICK_HEAD["gen_tokens"], gen_batch=QUICK_HEAD["prompts"],
        max_seconds=QUICK_HEAD["max_seconds"], vocab=HeadRecipe.vocab, epochs=3, lr=HeadRecipe.lr,
        seed=HeadRecipe.seed, passes=HeadRecipe.passes, threads=0)


def run(args) -> int:
    path = Path(args.out) if args.out else head_path(args.name or args.model)
    if (path / "head.safetensors").exists() and not args.force:
        print(f"draft head already at {path} (--force to retrain)")
        return 0
    print(f"draft head saved at {train(args)}")
    return 0


def add_draft_head(sub) -> None:
    p = sub.add_parser("draft-head", help="train a draft head (EAGLE-style) on a target's hidden states, on CPU")
    p.add_argument("--model", default="smollm2-135m", help="the target model (transformers backend)")
    p.add_argument("--prompts", default=None, help="prompts file (JSONL or text lines); default: Spec-Bench "
                   f"minus its first {HOLDOUT_PER_CATEGORY} per category, plus 600 GSM8K questions")
    p.add_argument("--data", nargs="*", default=None,
                   help="JSONL files of ready {prompt_ids, output_ids} (no generation unless --prompts is given too)")
    p.add_argument("--generate", action="store_true", help="generate answers to the prompts as well as --data")
    p.add_argument("--gsm8k", type=int, default=600, help="GSM8K questions among the default prompts")
    p.add_argument("--temperatures", default="0,0.8", help="one answer per prompt at each of these temperatures")
    p.add_argument("--gen-tokens", type=int, default=200)
    p.add_argument("--gen-batch", type=int, default=32, help="batch size of generation and feature passes")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--max-seconds", type=float, default=0, help="stop training after this long (0: no limit)")
    p.add_argument("--name", default=None, help="save as the head of this model name (default: --model)")
    p.add_argument("--out", default=None, help="directory to save to (default: ~/.cache/decodekit/draft_heads/<name>)")
    p.add_argument("--vocab", type=int, default=HeadRecipe.vocab, help="draft vocabulary: most frequent target tokens")
    p.add_argument("--epochs", type=int, default=HeadRecipe.epochs)
    p.add_argument("--lr", type=float, default=HeadRecipe.lr)
    p.add_argument("--seed", type=int, default=HeadRecipe.seed)
    p.add_argument("--passes", type=int, default=HeadRecipe.passes, help="chained draft steps trained together")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--force", action="store_true", help="retrain even if a head is saved")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m decodekit.training.draft_head")
    add_draft_head(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["draft-head", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
