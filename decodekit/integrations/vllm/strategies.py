"""How each decodekit strategy runs on vLLM, per request.

- ``Sample`` (plain, greedy): native ``vllm.SamplingParams`` (seed ``seed + index`` per sample).
- ``Speculative``: native and engine-wide: vLLM's ``speculative_config`` (``ngram`` / ``draft_model``),
  given when the backend is built (``speculative_config(strategy)`` converts a ``Speculative``).
- ``Structured``, or any strategy holding a ``Regex`` / ``JsonSchema`` / ``Grammar`` / ``OneOf``
  constraint: native vLLM structured outputs (token masks from its grammar backend); a ``JsonSchema``
  outlines-core cannot compile is refused (decodekit's prefix checker needs the transformers backend).
- tree rollouts, entropy switching: segment level, ``decodekit.integrations.vllm.rollouts`` (one vLLM
  request per segment, prefixes shared through automatic prefix caching).

AWRS / SMC need the next-token distribution at every step and per-particle importance weights; vLLM
serves a constraint as a mask applied inside its sampler, so on vLLM a constrained request takes the
automaton (masking) path: valid output, but not AWRS's unbiased weights. Use the transformers
backend for AWRS / SMC.
"""

from __future__ import annotations

from dataclasses import dataclass

from decodekit.strategies.base import Strategy
from decodekit.strategies.registry import entry_of
from decodekit.types import SamplingParams

SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")


@dataclass(frozen=True)
class Structured(Strategy):
    """Constrained decoding through vLLM structured outputs: exactly one of ``regex``, ``json_schema``
    (a dict or JSON string), ``grammar`` (the grammar backend's syntax: EBNF / GBNF for xgrammar, Lark
    for guidance) or ``choice`` (a list of strings)."""

    regex: str | None = None
    json_schema: dict | str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None
    name = "structured"

    def __post_init__(self):
        given = [k for k in ("regex", "json_schema", "grammar", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"Structured needs exactly one of regex, json_schema, grammar, choice; got {given}")
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))

    def step(self, engine, seqs):
        raise ValueError("Structured runs on the vLLM backend only (LLM(model, backend='vllm'))")

    def params(self):
        from vllm.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams(regex=self.regex, json=self.json_schema, grammar=self.grammar,
                                       choice=list(self.choice) if self.choice is not None else None)


def structured_from_constraint(constraint) -> Structured:
    """A decodekit constraint as vLLM structured outputs; ``ValueError`` for one vLLM cannot mask."""
    from decodekit.constraints import Grammar, JsonSchema, OneOf, Regex

    if isinstance(constraint, Regex):
        if getattr(constraint, "engine", None) == "checker":  # look-around, back-references: no mask engine
            raise ValueError(f"regex {constraint.pattern!r} needs decodekit's checker (token-level control): use "
                             f"the transformers backend; llguidance: {getattr(constraint, 'engine_error', None)}")
        return Structured(regex=constraint.pattern)
    if isinstance(constraint, JsonSchema):
        if not constraint.has_mask:  # vLLM's `guidance` backend is llguidance: the schemas it models exactly
            raise ValueError("this JSON schema is routed to decodekit's prefix checker, which needs token-level "
                             "control (AWRS / SMC): use the transformers backend (LLM(model)); why: "
                             f"{constraint.route}")
        return Structured(json_schema=constraint.schema)
    if isinstance(constraint, OneOf):
        return Structured(choice=tuple(constraint.options))
    if isinstance(constraint, Grammar) and hasattr(constraint, "lark_text"):
        return Structured(grammar=constraint.lark_text)
    name = type(constraint).__name__
    raise ValueError(f"constraint {name} has no vLLM structured-outputs form (a Python predicate needs "
                     "token-level control): use the transformers backend")


def request_options(backend, params: SamplingParams, strategy, index: int, final_only: bool = False):
    """``vllm.SamplingParams`` for sample ``index`` of a request under ``strategy``; ``final_only``:
    vLLM returns the finished output once instead of a delta per step."""
    from vllm import SamplingParams as VParams
    from vllm.sampling_params import RequestOutputKind

    structured = _structured(backend, strategy)
    seed = params.seed + index if params.seed is not None else None
    return VParams(n=1, max_tokens=params.max_new_tokens, temperature=params.temperature, top_k=params.top_k,
                   top_p=params.top_p, min_p=params.min_p, seed=seed, stop=list(params.stop) or None,
                   stop_token_ids=list(params.stop_token_ids) or None, ignore_eos=params.ignore_eos,
                   logprobs=params.logprobs, structured_outputs=structured,
                   detokenize=bool(params.stop),
                   output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA)


def _structured(backend, strategy):
    """Structured-outputs params for a strategy, or None for plain / speculative decoding (its registry
    entry's ``on_vllm`` form)."""
    if isinstance(strategy, Structured):
        return strategy.params()
    found = entry_of(strategy)
    forms = found.vllm_forms
    if "speculative_config" in forms and backend.speculative_config is None:
        raise ValueError("vLLM sets speculative decoding per engine: build the backend with "
                         "speculative_config={'method': 'ngram', 'num_speculative_tokens': 4, "
                         "'prompt_lookup_max': 3} (LLM(model, backend='vllm', speculative_config=...))")
    if "structured_outputs" in forms:
        return structured_from_constraint(strategy.constraint).params()
    if "native" in forms or "speculative_config" in forms:
        return None
    raise ValueError(f"strategy {found.name!r} has no per-request vLLM form; tree rollouts and entropy switching run "
                     "at segment level through decodekit.integrations.vllm.rollouts")


def strategy_stats(backend, request) -> dict:
    """Per-request extras: speculative acceptance from vLLM's counters (deltas over the request's life;
    engine-wide, so shared with requests that ran concurrently)."""
    out = {"backend": "vllm"}
    if backend.speculative_config is None:
        return out
    now = backend.metrics()
    drafts, draft_tokens, accepted = (now.get(k, 0) - request.metrics_before.get(k, 0) for k in SPEC_COUNTERS)
    out.update(num_drafts=int(drafts), num_draft_tokens=int(draft_tokens), num_accepted_tokens=int(accepted),
               acceptance_rate=accepted / draft_tokens if draft_tokens else 0.0,
               mean_accepted_length=accepted / drafts if drafts else 0.0)
    return out


def speculative_config(strategy) -> dict:
    """vLLM ``speculative_config`` for a decodekit ``Speculative`` strategy (n-gram or a draft model)."""
    k = strategy.start_k if not strategy.adaptive else 4
    draft = strategy.draft
    if draft == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": strategy.max_ngram,
                "prompt_lookup_min": 1}
    if isinstance(draft, str) and not draft.startswith(("ngram+", "int8")):
        from decodekit.integrations.vllm.prep import prepare

        return {"method": "draft_model", "model": prepare(draft).path, "num_speculative_tokens": k}
    raise ValueError(f"draft {draft!r} has no vLLM speculative_config form (use 'ngram' or a model name)")
