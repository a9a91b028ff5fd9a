"""``decodekit distill``: a few-layer student cut from a teacher and fine-tuned on its own generations.

Recipe (reproducible from the seed on one machine):

1. **Cut**: the student keeps ``K`` of the teacher's decoder layers, evenly spaced and always the first
   and the last; embeddings, final norm and the (tied) head are copied too. Embeddings and head stay
   frozen, so the student speaks in the teacher's token space and stays a cheap draft model.
2. **Data**: the teacher samples answers to synthetic instructions (arithmetic word problems, short
   explanations, translations, summaries; built from templates, so disjoint from GSM8K and Spec-Bench).
   Its raw logits at every generated position come out of generation for free; the top ``k`` log-probs
   plus the leftover tail mass are kept as the target.
3. **Fit**: minimise KL(teacher || student) over the coarsened distributions (top-k and one tail bucket)
   on the generated positions, AdamW with linear warm-up and decay.

The result is a plain Hugging Face directory under ``~/.cache/decodekit/distill/<teacher>-distill-<K>l``
(with ``recipe.json``), loadable by that name through ``decodekit.models``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace

import torch

from decodekit.models import student_name

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jon", "Kai", "Lena"]
ITEMS = ["apples", "marbles", "books", "stickers", "cookies", "pencils", "coins", "cards", "shells", "eggs"]
TOPICS = ["photosynthesis", "gravity", "the water cycle", "compound interest", "machine learning",
          "volcanoes", "the immune system", "recycling", "the stock market", "black holes", "democracy",
          "climate change", "electric cars", "sleep", "the internet", "vaccines", "the moon", "bees",
          "inflation", "exercise", "coffee", "the Roman Empire", "solar panels", "chess", "rainbows"]
SENTENCES = ["The weather is nice today.", "I would like a cup of tea, please.", "Where is the train station?",
             "My brother plays the guitar every evening.", "We are going to the beach this weekend.",
             "This book is very interesting.", "Can you help me with my homework?"]
LANGUAGES = ["French", "Spanish", "German", "Italian"]


@dataclass(frozen=True)
class DistillConfig:
    layers: int = 8
    num_prompts: int = 384
    gen_tokens: int = 64
    gen_batch: int = 8
    gen_temperature: float = 0.8
    top_k: int = 64
    epochs: int = 3
    batch_size: int = 4
    lr: float = 3e-4
    warmup: int = 10
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for name in ("layers", "num_prompts", "gen_tokens", "gen_batch", "top_k", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.gen_temperature <= 0 or self.lr <= 0:
            raise ValueError("gen_temperature and lr must be > 0")


def synthetic_prompts(n: int, seed: int) -> list[str]:
    """``n`` instructions from templates, deterministic in ``seed``."""
    rng = random.Random(seed)

    def word_problem():
        who, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(5, 60), rng.randint(2, 30), rng.randint(2, 9)
        forms = [
            f"{who} has {a} {item} and buys {b} more. Then {who} gives away {c}. How many {item} are left?",
            f"{who} buys {c} boxes of {item} with {b} {item} in each box and already had {a}. How many now?",
            f"A shop sells {item} for ${c} each. {who} buys {b} of them and pays with ${a * 10}. "
            f"How much change does {who} get?",
            f"{who} reads {b} pages a day for {c} days. The book has {a * 10} pages. How many pages are left?",
        ]
        return rng.choice(forms) + " Think step by step."

    def instruction():
        topic = rng.choice(TOPICS)
        forms = [f"Explain {topic} in simple terms.", f"Give three facts about {topic}.",
                 f"Write a short paragraph about {topic}.", f"What are the pros and cons of {topic}?",
                 f"Summarize what {topic} is in two sentences.",
                 f"Translate into {rng.choice(LANGUAGES)}: {rng.choice(SENTENCES)}",
                 f"Write a short poem about {topic}."]
        return rng.choice(forms)

    return [word_problem() if i % 2 == 0 else instruction() for i in range(n)]


def layer_indices(num_teacher: int, k: int) -> list[int]:
    """``k`` evenly spaced layer indices out of ``num_teacher``, keeping the first and the last."""
    if not 1 <= k <= num_teacher:
        raise ValueError(f"layers must be in [1, {num_teacher}], got {k}")
    if k == 1:
        return [num_teacher - 1]
    return sorted({round(i * (num_teacher - 1) / (k - 1)) for i in range(k)})


def cut_student(teacher, k: int):
    """A ``k``-layer copy of ``teacher`` (same class): chosen layers, embeddings, norm and head copied."""
    from transformers import AutoModelForCausalLM

    keep = layer_indices(teacher.config.num_hidden_layers, k)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = k
    if getattr(config, "layer_types", None):
        config.layer_types = [teacher.config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, tensor in teacher.state_dict().items():
        parts = name.split(".")
        if "layers" in parts:
            pos = parts.index("layers") + 1
            if int(parts[pos]) not in keep:
                continue
            parts[pos] = str(keep.index(int(parts[pos])))
        state[".".join(parts)] = tensor.detach().clone().float()
    student.load_state_dict(state, strict=True)
    student.config.distill_layers = keep
    return student


@torch.no_grad()
def teacher_samples(teacher, prompt_ids: list[list[int]], cfg: DistillConfig, pad_id: int, eos_ids, progress):
    """Sampled continuations with the teacher's top-k log-probs (and tail mass) at each generated position."""
    samples = []
    for start in range(0, len(prompt_ids), cfg.gen_batch):
        batch = prompt_ids[start : start + cfg.gen_batch]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = teacher.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.gen_temperature,
                               top_k=0, top_p=1.0, max_new_tokens=cfg.gen_tokens, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=pad_id, eos_token_id=sorted(eos_ids))
        logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)  # (B, T, V), raw (before temperature)
        top_lp, top_id = logp.topk(cfg.top_k, dim=-1)
        for b, prompt in enumerate(batch):
            gen = out.sequences[b, width:].tolist()
            n = next((i + 1 for i, t in enumerate(gen) if t in eos_ids), len(gen))
            samples.append({"ids": prompt + gen[:n], "prompt_len": len(prompt),
                            "top_lp": top_lp[b, :n].clone(), "top_id": top_id[b, :n].clone()})
        progress.update(len(batch))
    return samples


def coarse_kl(student_logits: torch.Tensor, top_lp: torch.Tensor, top_id: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over positions, on the teacher's top-k tokens plus one tail bucket.

    ``student_logits`` (N, V); ``top_lp`` / ``top_id`` (N, k) the teacher's top-k log-probs and ids.
    """
    lq = torch.log_softmax(student_logits.float(), -1).gather(-1, top_id)  # (N, k)
    p = top_lp.exp()
    p_tail = (1.0 - p.sum(-1)).clamp_min(1e-8)
    q_tail = (1.0 - lq.exp().sum(-1)).clamp_min(1e-8)
    kl = (p * (top_lp - lq)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    return kl.mean()


def _batch_loss(student, batch: list[dict], pad_id: int) -> tuple[torch.Tensor, float]:
    """Coarse KL on one right-padded batch, and the student's top-1 agreement with the teacher."""
    width = max(len(s["ids"]) for s in batch)
    ids = torch.tensor([s["ids"] + [pad_id] * (width - len(s["ids"])) for s in batch])
    mask = torch.tensor([[1] * len(s["ids"]) + [0] * (width - len(s["ids"])) for s in batch])
    logits = student(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
    # position prompt_len - 1 + t predicts generated token t
    rows = torch.cat([logits[b, s["prompt_len"] - 1 : len(s["ids"]) - 1] for b, s in enumerate(batch)])
    top_lp = torch.cat([s["top_lp"][: len(s["ids"]) - s["prompt_len"]] for s in batch])
    top_id = torch.cat([s["top_id"][: len(s["ids"]) - s["prompt_len"]] for s in batch])
    agree = float((rows.argmax(-1) == top_id[:, 0]).float().mean())
    return coarse_kl(rows, top_lp, top_id), agree


@torch.no_grad()
def evaluate(student, samples: list[dict], pad_id: int, batch_size: int) -> dict:
    if not samples:
        return {}
    kls, agrees, weights = [], [], []
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        kl, agree = _batch_loss(student, batch, pad_id)
        n = sum(len(s["ids"]) - s["prompt_len"] for s in batch)
        kls.append(float(kl) * n), agrees.append(agree * n), weights.append(n)
    total = sum(weights)
    return {"kl": sum(kls) / total, "top1_agreement": sum(agrees) / total}


def train(student, samples: list[dict], cfg: DistillConfig, pad_id: int, progress) -> list[float]:
    """AdamW on everything but the embeddings and head; returns the loss per step."""
    student.train()
    student.get_input_embeddings().weight.requires_grad_(False)
    student.get_output_embeddings().weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / cfg.warmup, max(0.0, (total - s) / max(1, total - cfg.warmup))))
    rng = random.Random(cfg.seed)
    losses = []
    for _ in range(cfg.epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            loss, _ = _batch_loss(student, [samples[j] for j in order[i : i + cfg.batch_size]], pad_id)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            progress.update(1)
            progress.set_postfix(kl=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)
    return losses


def distill(teacher, tokenizer, cfg: DistillConfig, prompts: list[str] | None = None, show_progress: bool = True):
    """Cut a ``cfg.layers``-layer student from ``teacher`` and fit it; returns (student, report dict).

    ``tokenizer`` is a decodekit ``Tokenizer`` (or anything with ``apply_chat_template`` / ``encode``
    and ``eos_token_ids``).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    prompts = prompts if prompts is not None else synthetic_prompts(cfg.num_prompts, cfg.seed)
    use_chat = getattr(tokenizer, "has_chat_template", False)
    prompt_ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) if use_chat
                  else tokenizer.encode(p) for p in prompts]
    eos_ids = set(tokenizer.eos_token_ids)
    pad_id = min(eos_ids)
    started = time.perf_counter()
    with tqdm(total=len(prompt_ids), desc="teacher generations", disable=not show_progress) as bar:
        samples = teacher_samples(teacher, prompt_ids, cfg, pad_id, eos_ids, bar)
    samples = [s for s in samples if len(s["ids"]) > s["prompt_len"]]
    num_val = int(len(samples) * cfg.val_fraction)
    val, fit = samples[:num_val], samples[num_val:]
    student = cut_student(teacher, cfg.layers)
    before = evaluate(student, val, pad_id, cfg.batch_size)
    steps = math.ceil(len(fit) / cfg.batch_size) * cfg.epochs
    with tqdm(total=steps, desc=f"distilling {cfg.layers} layers", disable=not show_progress) as bar:
        losses = train(student, fit, cfg, pad_id, bar)
    report = {"config": asdict(cfg), "kept_layers": student.config.distill_layers,
              "num_train_sequences": len(fit), "num_val_sequences": len(val),
              "num_train_tokens": sum(len(s["ids"]) - s["prompt_len"] for s in fit),
              "val_before": before, "val_after": evaluate(student, val, pad_id, cfg.batch_size),
              "first_losses": losses[:5], "last_losses": losses[-5:],
              "student_params": sum(p.numel() for p in student.parameters()),
              "teacher_params": sum(p.numel() for p in teacher.parameters()),
              "wall_time_s": round(time.perf_counter() - started, 1)}
    return student, report


# A stand-in student for smoke runs (``decodekit bench --quick`` on a fresh machine): the same cut,
# fitted on 16 teacher answers of 24 tokens for one epoch, ~20-40 s on CPU. Results made with it say so.
QUICK_CONFIG = DistillConfig(num_prompts=16, gen_tokens=24, epochs=1, warmup=2, val_fraction=0.0)


def student_dir(name: str):
    from decodekit.models import cache_root

    return cache_root() / "distill" / name


def build_student(teacher: str, cfg: DistillConfig, directory, show_progress: bool = True) -> dict:
    """Distill ``cfg.layers`` layers of ``teacher`` into ``directory`` (written atomically); returns its report."""
    from transformers import AutoTokenizer

    from decodekit.models import hf_dir, load_backend

    backend = load_backend(teacher)  # resolves the alias and builds the plain HF directory once
    student, report = distill(backend.model, backend.tokenizer, cfg, show_progress=show_progress)
    tmp = directory.with_name(directory.name + ".tmp")
    student.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(hf_dir(teacher)).save_pretrained(tmp)
    report["teacher"] = teacher
    (tmp / "recipe.json").write_text(json.dumps(report, indent=2))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    tmp.rename(directory)
    return report


def ensure_student(name: str, *, quick: bool = False, log=print) -> tuple[str, dict]:
    """(a loadable model spec, what was done) for the distilled student ``name`` (``<alias>-distill-<K>l``).

    Built already: ``name`` itself. Missing: the full mode builds it with the default recipe (minutes
    on CPU), saying so and how long it took; ``quick`` builds (or reuses) a labeled stand-in
    (``QUICK_CONFIG``) under ``<name>-quick`` and returns its directory. Other names pass through."""
    import re

    match = re.fullmatch(r"(.+)-distill-(\d+)l", name)
    if match is None or (student_dir(name) / "config.json").exists():
        return name, {"student": name, "built_now": False, "quick_stand_in": False}
    teacher, layers = match.group(1), int(match.group(2))
    directory = student_dir(name + "-quick") if quick else student_dir(name)
    info = {"student": name + "-quick" if quick else name, "built_now": False, "quick_stand_in": quick}
    if not (directory / "config.json").exists():
        cfg = replace(QUICK_CONFIG if quick else DistillConfig(), layers=layers)
        kind = "a quick stand-in student (16 prompts, 1 epoch)" if quick else "the distilled student (default recipe)"
        log(f"{name} is not built: building {kind} from {teacher} ...")
        started = time.perf_counter()
        build_student(teacher, cfg, directory)
        info.update(built_now=True, build_seconds=round(time.perf_counter() - started, 1))
        log(f"built {directory} in {info['build_seconds']:.0f} s")
    return str(directory), info


def run(args) -> int:
    cfg = DistillConfig(layers=args.layers, num_prompts=args.prompts, gen_tokens=args.gen_tokens,
                        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    target = student_dir(student_name(args.teacher, args.layers))
    if (target / "config.json").exists() and not args.force:
        print(f"{target} already exists (use --force to rebuild)")
        return 0
    torch.set_num_threads(args.threads) if args.threads else None
    report = build_student(args.teacher, cfg, target)
    print(json.dumps({"student": str(target), **{k: report[k] for k in ("val_before", "val_after", "wall_time_s")}}))
    return 0


def add_distill(sub) -> None:
    p = sub.add_parser("distill", help="distill a few-layer student (small / draft model) from a teacher, on CPU")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=DistillConfig.layers, help="decoder layers the student keeps")
    p.add_argument("--prompts", type=int, default=DistillConfig.num_prompts, help="teacher generations to fit on")
    p.add_argument("--gen-tokens", type=int, default=DistillConfig.gen_tokens)
    p.add_argument("--epochs", type=int, default=DistillConfig.epochs)
    p.add_argument("--batch-size", type=int, default=DistillConfig.batch_size)
    p.add_argument("--lr", type=float, default=DistillConfig.lr)
    p.add_argument("--seed", type=int, default=DistillConfig.seed)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--force", action="store_true", help="rebuild even if the student is cached")
    p.set_defaults(func=run)
