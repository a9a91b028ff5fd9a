"""A ``rollout_func`` for TRL's ``GRPOTrainer``: tree rollouts (or independent samples) on the policy being trained.

TRL 1.16 calls ``rollout_func(prompts, trainer)`` with each prompt repeated ``num_generations`` times in a
row (its ``RepeatSampler`` repeats them). The function groups them, rolls out once per prompt on the
trainer's own module (``LLM.from_module``: no copy, the module's mode restored after each forward, the
prefix cache dropped after an optimizer step) and returns, in TRL's order, ``prompt_ids``,
``completion_ids`` (with the EOS token that ended a completion, as TRL's own generation keeps it) and
``logprobs``: per completion token ``log_softmax(logits / temperature)``, what TRL recomputes. Stop
rules are TRL's: its EOS ids and ``max_completion_length``, no early stops. The extra field
``tree_path`` (each completion's node path) reaches the reward functions and ``TreePOTrainer``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace

from decodekit.api import LLM
from decodekit.rollout.tree import TreeRollout
from decodekit.types import SamplingParams

TREE_PATH = "tree_path"
MODES = ("tree", "independent")
SEED_STRIDE = 1 << 16  # seeds of one prompt's paths: seed + path index, well below the next prompt's


@dataclass
class RolloutCall:
    """Counters of one ``rollout_func`` call."""

    num_prompts: int
    num_completions: int
    wall_s: float
    forward_tokens: int
    completion_tokens: list[int] = field(default_factory=list)
    weights_synced: bool = False

    @property
    def mean_completion_tokens(self) -> float:
        return sum(self.completion_tokens) / max(1, len(self.completion_tokens))


class DecodekitRollout:
    """``GRPOTrainer(..., rollout_func=DecodekitRollout(...))``; ``rollout_func(...)`` builds one.

    ``mode="tree"``: TreePO segment trees of width ``num_generations`` (``tree``: a ``TreeRollout`` whose
    ``segment_len``, ``branch_factor``, ``first_split``, ``budget_split`` and ``fallback`` are used; its
    width is the trainer's ``num_generations``, early stops and constraints are off so completions stop
    where TRL's would). ``mode="independent"``: ``num_generations`` independent samples per prompt through
    the same engine. ``llm``: an ``LLM`` to sample from instead of the trainer's module (a separate
    inference copy: call ``llm.update_weights(model.state_dict())`` after each step); by default the
    trainer's own module is wrapped on the first call. ``seed``: the base of every prompt's own seed
    (one per prompt and call).
    After each call ``last_results`` holds the per-prompt ``RolloutResult``s and ``calls`` the counters.
    """

    def __init__(self, mode: str = "tree", *, tree: TreeRollout | None = None, llm: LLM | None = None,
                 seed: int = 0, cache_tokens: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if tree is not None and not isinstance(tree, TreeRollout):
            raise ValueError(f"tree must be a TreeRollout, got {tree!r}")
        if tree is not None and tree.constraint is not None:
            raise ValueError("a constrained tree samples by AWRS, not the trainer's distribution: "
                             "constraint must be None")
        if llm is not None and getattr(llm.backend, "create_engine", None) is not None:  # request-level: vLLM
            raise ValueError(f"backend {llm.backend.name!r} cannot run the trainer's rollouts: vLLM does not share "
                             "a training module (use TRL's use_vllm, or the transformers backend)")
        self.mode, self.tree, self.llm, self.seed, self.cache_tokens = mode, tree, llm, seed, cache_tokens
        self._last_step: int | None = None
        self.last_results: list = []
        self.calls: list[RolloutCall] = []

    def __call__(self, prompts: list, trainer) -> dict:
        groups = group_prompts(prompts, num_generations(trainer))
        width = len(groups[0][1])
        llm = self._engine(trainer, len(prompts))
        step = trainer.state.global_step  # an optimizer step since the last call: the cached K/V is stale
        synced = llm.sync_weights(force=self._last_step is not None and step != self._last_step)
        self._last_step = step
        unique = [prompts[start] for start, _ in groups]
        prompt_ids, _, _ = trainer._tokenize_prompts(unique)  # TRL's own chat template / tokenization
        prompt_ids = [list(map(int, ids)) for ids in prompt_ids]
        params = self.params(trainer, seed=0)
        # prompt j of call k: its own seed (paths i use seed + i), so prompts of a call draw independent streams
        first = self.seed + len(self.calls) * SEED_STRIDE * len(unique)
        seeds = [first + j * SEED_STRIDE for j in range(len(unique))]
        started = time.perf_counter()
        texts = [p[-1]["content"] if isinstance(p, list) else str(p) for p in unique]
        results = llm.rollout(list(zip(texts, prompt_ids)), tree=self.config(width),
                              seeds=seeds, **params)
        wall = time.perf_counter() - started
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], TREE_PATH: []}
        lengths = []
        for ids, result in zip(prompt_ids, results):
            if len(result.trajectories) != width:
                raise RuntimeError(f"the rollout returned {len(result.trajectories)} completions for a prompt, "
                                   f"not num_generations={width}")
            for t in result.trajectories:
                completion, logps = completion_of(t)
                out["prompt_ids"].append(list(ids))
                out["completion_ids"].append(completion)
                out["logprobs"].append(logps)
                out[TREE_PATH].append(list(t.path))
                lengths.append(len(completion))
        self.last_results = results
        self.calls.append(RolloutCall(len(unique), len(lengths), wall,
                                      sum(r.stats["forward_tokens"] for r in results), lengths, synced))
        return out

    def config(self, width: int) -> TreeRollout:
        """The ``TreeRollout`` run for ``width`` completions per prompt (TRL's stop rules: no early stops)."""
        if self.mode == "independent":
            return TreeRollout(segment_len=1 << 20, branch_factor=1, max_width=width, first_split=width,
                               early_stop=None, fallback=False)
        base = self.tree or TreeRollout(segment_len=32, branch_factor=2, first_split=2)
        return replace(base, max_width=width, first_split=min(base.first_split, width), early_stop=None)

    @staticmethod
    def params(trainer, seed: int) -> dict:
        """The trainer's generation settings as decodekit sampling parameters, as TRL's own generation takes them
        (``GRPOConfig``'s fields, then ``generation_kwargs`` over them); ``ValueError`` for any that decodekit
        would not honour the way TRL's generation does."""
        if not trainer.temperature > 0:
            raise ValueError("temperature must be > 0: TRL's logprobs are log_softmax(logits / temperature)")
        gen = generation_settings(trainer)
        return {"max_new_tokens": int(trainer.max_completion_length), "temperature": float(trainer.temperature),
                "top_p": float(gen["top_p"]), "top_k": int(gen["top_k"] or 0), "min_p": float(gen["min_p"] or 0.0),
                "repetition_penalty": float(gen["repetition_penalty"]), "seed": seed,
                "stop_token_ids": tuple(int(t) for t in trainer.eos_token_ids), "ignore_eos": True}

    def _engine(self, trainer, num_rows: int) -> LLM:
        if self.llm is None:
            if trainer.accelerator.num_processes != 1:
                raise ValueError("decodekit rollouts run in one process: TRL splits a prompt's group across processes")
            if getattr(trainer.args, "bf16", False) or getattr(trainer.args, "fp16", False):
                warnings.warn("the trainer recomputes log-probabilities under bf16/fp16 autocast (GRPOConfig's bf16 "
                              "defaults to True); decodekit samples the module as it is, so its logprobs match the "
                              "trainer's only to that precision: set bf16=False for float32", stacklevel=3)
            model = trainer.accelerator.unwrap_model(trainer.model)
            # every row's worst case (a tree reserves max_width x max_new_tokens) plus prompts, twice over
            tokens = self.cache_tokens or max(16384, 2 * num_rows * (trainer.max_completion_length + 512))
            self.llm = LLM.from_module(model, trainer.processing_class, cache_tokens=tokens)
        return self.llm


def rollout_func(mode: str = "tree", **options) -> DecodekitRollout:
    """A ``rollout_func`` for ``trl.GRPOTrainer``: ``mode`` "tree" (TreePO) or "independent" (see
    ``DecodekitRollout``)."""
    return DecodekitRollout(mode, **options)


def num_generations(trainer) -> int:
    return trainer.num_generations if trainer.model.training else trainer.num_generations_eval


def group_prompts(prompts: list, width: int) -> list[tuple[int, list]]:
    """``(start, block)`` per prompt: TRL hands each prompt ``width`` times in a row."""
    if not prompts or len(prompts) % width:
        raise ValueError(f"rollout_func got {len(prompts)} prompts, not a multiple of num_generations={width}")
    groups = [(i, prompts[i:i + width]) for i in range(0, len(prompts), width)]
    for start, block in groups:
        if any(p != block[0] for p in block):
            raise ValueError(f"prompts {start}..{start + width - 1} are not one prompt repeated num_generations="
                             f"{width} times (TRL's RepeatSampler order); decodekit rolls out once per prompt")
    return groups


def completion_of(trajectory) -> tuple[list[int], list[float]]:
    """TRL's completion ids (the stop token included) and their sampling log-probabilities."""
    ids, logps = list(trajectory.token_ids), list(trajectory.sample_logprobs)
    if trajectory.stop_token is not None:
        ids.append(trajectory.stop_token)
        logps.append(trajectory.stop_logprob)
    if trajectory.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"a completion ended by {trajectory.finish_reason!r}, a stop TRL would not make")
    return ids, logps


# generation_kwargs TRL's own generation (transformers ``generate``) applies and decodekit applies the same way;
# repetition_penalty as transformers' RepetitionPenaltyLogitsProcessor: every prompt and completion token, before
# temperature (transformers' batch also penalises the left padding of shorter prompts: decodekit never pads)
MAPPED_KWARGS = ("repetition_penalty", "top_p", "top_k", "min_p")


def generation_settings(trainer) -> dict:
    """``repetition_penalty``, ``top_p``, ``top_k``, ``min_p`` as TRL's generation sees them: the trainer's, then
    ``generation_kwargs`` (TRL updates its generate kwargs with them); other kwargs are refused by name."""
    settings = {k: getattr(trainer, k) for k in MAPPED_KWARGS}
    extra = dict(getattr(trainer.args, "generation_kwargs", None) or {})
    if extra.pop("do_sample", True) is not True:
        raise ValueError("generation_kwargs do_sample=False: GRPO samples; decodekit rollouts always sample")
    if "temperature" in extra and extra.pop("temperature") != trainer.temperature:
        raise ValueError("generation_kwargs temperature differs from GRPOConfig.temperature, which TRL's logprobs "
                         "divide by: set GRPOConfig.temperature instead")
    unknown = sorted(set(extra) - set(MAPPED_KWARGS))
    if unknown:
        raise ValueError(f"generation_kwargs {unknown} are not mapped to decodekit rollouts (mapped: "
                         f"{', '.join(MAPPED_KWARGS)}, do_sample=True, temperature equal to the config's)")
    settings.update(extra)
    return settings


def sampling_params(trainer, seed: int = 0) -> SamplingParams:
    """``DecodekitRollout.params`` as a ``SamplingParams`` (for checks and benchmarks)."""
    return SamplingParams(**DecodekitRollout.params(trainer, seed))
