"""The Python API: ``generate()`` and the ``LLM`` facade that keeps a model loaded."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

from decodekit.driver import Driver
from decodekit.engine import Engine
from decodekit.models import DEFAULT_MODEL, load_backend
from decodekit.strategies.base import Strategy
from decodekit.types import Completion, SamplingParams, TokenEvent


class LLM:
    """A loaded model with its engine. ``LLM(backend=...)`` wraps an existing backend (tests, mocks)."""

    def __init__(self, model: str = DEFAULT_MODEL, *, backend=None, dtype: str | None = None,
                 device: str | None = None, cache_tokens: int = 16384, max_batch_size: int = 32,
                 prefix_cache: bool = True, max_prefill_tokens: int | None = None, **engine_args):
        """``backend``: None or "hf" (transformers, dtype float32 by default), "vllm" (dtype bfloat16 by
        default; ``engine_args`` go to ``vllm.LLM``: tensor_parallel_size, ...), "llamacpp" (a GGUF model
        on llama.cpp, weights as quantized; ``engine_args``: ``n_ctx`` KV cells (default ``cache_tokens``),
        ``n_threads``, ``n_gpu_layers``), or a Backend instance.
        ``max_prefill_tokens``: prompt tokens prefilled per step while other sequences decode (default
        256 on CPU, 2048 on CUDA)."""
        if backend == "vllm":
            from decodekit.integrations.vllm.backend import VLLMBackend

            backend = VLLMBackend(model, dtype=dtype or "bfloat16", **engine_args)
        elif backend == "llamacpp":
            backend = _llamacpp_backend(model, dtype, cache_tokens, prefix_cache, engine_args)
        elif engine_args:
            raise ValueError(f"unknown argument(s) {sorted(engine_args)}: engine arguments need backend='vllm' "
                             "(or 'llamacpp': n_ctx, n_threads, n_gpu_layers)")
        elif backend not in (None, "hf") and isinstance(backend, str):
            raise ValueError(f"backend must be 'hf', 'vllm', 'llamacpp' or a Backend instance, got {backend!r}")
        if backend is None or backend == "hf":
            backend = load_backend(model, dtype=dtype or "float32", device=device, cache_tokens=cache_tokens,
                                   prefix_cache=prefix_cache)
        self.model_name = model if backend is None or model != DEFAULT_MODEL else backend.name
        self.backend = backend
        self.tokenizer = backend.tokenizer
        make_engine = getattr(backend, "create_engine", None)  # request-level backends (vLLM) bring their own
        self.engine = make_engine(max_batch_size=max_batch_size) if make_engine else Engine(
            backend, max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens)
        # streams, generate() and rollout() calls share the engine, from any thread: none loses an event
        self.driver = Driver(self.engine)

    @classmethod
    def from_module(cls, model, tokenizer, *, backend: str = "hf", cache_tokens: int = 16384,
                    prefix_cache: bool = True, max_batch_size: int = 32, **options) -> LLM:
        """An engine on an existing transformers module and tokenizer (a trainer's policy), no copy:
        its mode is restored after every forward, and each call first drops the prefix cache if the
        parameters changed since the last one (``models.wrap_module``). Only ``backend="hf"``."""
        from decodekit.models import wrap_module

        wrapped = wrap_module(model, tokenizer, backend=backend, cache_tokens=cache_tokens, prefix_cache=prefix_cache)
        return cls(backend=wrapped, max_batch_size=max_batch_size, **options)

    def sync_weights(self, force: bool = False) -> bool:
        """Drop the prefix cache if the model's weights changed since the last call, or when ``force``
        (an optimizer step happened); True when dropped. Each generate / stream / rollout call runs it."""
        sync = getattr(self.backend, "sync_weights", None)
        return bool(sync(force)) if sync is not None and not self.engine.has_unfinished() else False

    def update_weights(self, state_dict, strict: bool = True) -> None:
        """Load a trained policy's ``state_dict`` into this engine's own copy and drop the prefix cache."""
        update = getattr(self.backend, "update_weights", None)
        if update is None:
            raise ValueError(f"backend {self.backend.name!r} does not take new weights")
        update(state_dict, strict=strict)

    def generate(self, prompts, strategy: Strategy | str | None = None, **sampling):
        """Complete one prompt (-> ``Completion``) or a list of prompts (-> list, one batch).

        A prompt is a string or a list of chat messages (``{"role", "content"}`` dicts).
        """
        single = _is_single(prompts)
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("prompts is empty")
        strategy = resolve_strategy(strategy, sampling)
        params = sampling_params(**sampling)
        done = self._complete(batch, params, strategy)
        return done[0] if single else done

    def _complete(self, batch, params, strategy) -> list[Completion]:
        """Add every prompt (a prompt, or a ready ``(text, ids)`` pair), step until they are done; a bad
        prompt or a failed step leaves nothing of this call in the engine. ``params``: one for all, or a list."""
        for p in params if isinstance(params, list) else [params]:
            check_penalties(strategy, p, self.engine)
        self.sync_weights()
        items = [p if isinstance(p, tuple) else self.encode_prompt(p) for p in batch]
        return self.driver.complete(items, params, strategy)

    def stream(self, prompt, strategy: Strategy | str | None = None, **sampling) -> Iterator[TokenEvent]:
        """Yield ``TokenEvent``s (text deltas per choice) as tokens are accepted. Other calls on this
        ``LLM`` (streams, ``generate``, from any thread) may run meanwhile: every event still arrives."""
        if not _is_single(prompt):
            raise ValueError("stream takes one prompt (a string or a list of chat messages)")
        strategy = resolve_strategy(strategy, sampling)
        params = sampling_params(**sampling)
        check_penalties(strategy, params, self.engine)
        self.sync_weights()
        (request,) = self.driver.add([self.encode_prompt(prompt)], params, strategy, stream=True)
        yield from self.driver.events(request.request_id)

    def rollout(self, prompts, tree=None, *, seeds: list[int] | None = None, **sampling):
        """Tree-structured segment rollouts (TreePO): ``max_width`` trajectories per prompt sharing
        prefixes in the KV cache. One prompt -> ``RolloutResult``, a list (of prompts or ready
        ``(text, token_ids)`` pairs) -> list; ``tree`` is a ``TreeRollout`` (default settings when None);
        ``seeds``: one seed per prompt instead of ``seed`` for all. Each prompt is one engine request (its
        leaves ride in the engine's shared forward), so rollouts run beside other requests; on vLLM through
        ``decodekit.integrations.vllm.rollouts`` (one vLLM request per segment, prefix caching).
        """
        from decodekit.rollout.tree import TreeRollout
        from decodekit.strategies.tree_strategy import TreeStrategy

        single = _is_single(prompts)
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("prompts is empty")
        tree = tree or TreeRollout()
        params = sampling_params(**sampling)
        strategy = TreeStrategy(tree)
        check_penalties(strategy, params, self.engine)  # also before a request-level backend's own driver
        encoded = [p if isinstance(p, tuple) else self.encode_prompt(p) for p in batch]  # or ready (text, ids)
        if getattr(self.backend, "tree_rollout", None) is not None:  # a request-level backend's own driver
            if seeds is not None:
                raise ValueError("seeds= is not mapped to this backend's rollouts (vLLM): use seed=")
            results = tree.run(self.backend, [ids for _, ids in encoded], params, texts=[t for t, _ in encoded])
            return results[0] if single else results
        if seeds is not None:
            if len(seeds) != len(batch):
                raise ValueError(f"seeds has {len(seeds)} entries for {len(batch)} prompts")
            params = [dataclasses.replace(params, seed=s) for s in seeds]
        done = self._complete([(text, ids) for text, ids in encoded], params, strategy)
        results = [c.stats.extra["rollout"] for c in done]
        return results[0] if single else results

    def score(self, prompt, top_logprobs: int = 0, chunk_tokens: int = 128) -> list:
        """Log-probabilities of the prompt's own tokens (a string, chat messages or token ids): None for
        the first, then ``scoring.PromptLogprob`` (token id, logprob, rank, top) per position, computed
        in chunks of ``chunk_tokens`` positions (``decodekit.backends.scoring``)."""
        from decodekit.backends.scoring import score

        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            ids = self.encode_prompt(prompt)[1]
        return score(self.backend, ids, top_n=top_logprobs, chunk_tokens=chunk_tokens)

    def encode_prompt(self, prompt) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        messages = _check_messages(prompt)
        return messages[-1]["content"], self.tokenizer.apply_chat_template(messages)

def sampling_params(**sampling) -> SamplingParams:
    """``SamplingParams`` from keyword arguments; an unknown name raises ``ValueError``."""
    known = SamplingParams.__dataclass_fields__
    unknown = sorted(set(sampling) - set(known))
    if unknown:
        raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
    return SamplingParams(**sampling)


def resolve_strategy(strategy: Strategy | str | None, sampling: dict | None = None) -> Strategy | None:
    """A Strategy from an instance or a registered name; ``constraint=`` (with optional ``sampler=``,
    ``particles=``) in ``sampling`` is popped and wraps it as the registry says (plain sampling ->
    ``Constrained``, ``Speculative`` -> ``ConstrainedSpeculative``; others say where the constraint goes)."""
    from decodekit.strategies.registry import by_name, entry, with_constraint

    constraint = sampling.pop("constraint", None) if sampling is not None else None
    options = {k: sampling.pop(k) for k in ("sampler", "particles") if sampling and k in sampling}
    if isinstance(strategy, str):
        if constraint is not None and entry(strategy).constraint != "wraps":
            raise ValueError(entry(strategy).hint)
        strategy = by_name(strategy)
    if constraint is not None:
        own = {"sampler": options.get("sampler", "awrs"), "num_particles": options.get("particles", 1)}
        return with_constraint(constraint, strategy, **own)
    if options:
        raise ValueError(f"{sorted(options)} only apply together with constraint=")
    return strategy


def penalty_problem(strategy: Strategy | None, engine) -> str | None:
    """Why penalties / ``logit_bias`` cannot be honoured by ``strategy`` on ``engine``, or None when they can
    (the registry says which strategies form every distribution with its own history)."""
    from decodekit.strategies.registry import REGISTRY, entry_of

    if not engine.token_level:
        return "presence/frequency/repetition penalties and logit_bias are not mapped to this engine (vLLM) yet"
    found = entry_of(strategy)
    if not found.penalties:
        honour = ", ".join(name for name, e in REGISTRY.items() if e.penalties)
        return (f"presence/frequency/repetition penalties and logit_bias are not applied by strategy {found.name!r} "
                f"yet (they are by {honour})")
    return None


def check_penalties(strategy: Strategy | None, params: SamplingParams, engine) -> None:
    """``ValueError`` rather than penalties silently ignored."""
    if params.has_penalties and (why := penalty_problem(strategy, engine)) is not None:
        raise ValueError(why)


@functools.lru_cache(maxsize=2)
def _loaded(model: str) -> LLM:
    return LLM(model)


def generate(prompt_or_messages, model: str = DEFAULT_MODEL, strategy: Strategy | str | None = None,
             **sampling) -> Completion | list[Completion]:
    """Generate with ``model`` (kept loaded between calls); see ``LLM.generate``."""
    return _loaded(model).generate(prompt_or_messages, strategy=strategy, **sampling)


LLAMACPP_ARGS = ("n_ctx", "n_threads", "n_gpu_layers", "n_batch")


def _llamacpp_backend(model: str, dtype, cache_tokens: int, prefix_cache: bool, engine_args: dict):
    from decodekit.models import load_llamacpp_backend

    if dtype is not None:
        raise ValueError("dtype has no meaning on backend='llamacpp': the GGUF's weights run as quantized")
    unknown = sorted(set(engine_args) - set(LLAMACPP_ARGS))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for backend='llamacpp' (takes {', '.join(LLAMACPP_ARGS)})")
    return load_llamacpp_backend(model, prefix_cache=prefix_cache, **{"n_ctx": cache_tokens, **engine_args})


def _is_single(prompts) -> bool:
    return isinstance(prompts, str) or (isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], dict))


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs string 'role' and 'content', got {m!r}")
    return messages
