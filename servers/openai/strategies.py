"""Per-request strategy choice: the ``decodekit`` body field and ``response_format``.

Strategy instances are cached per option set (the engine batches sequences per instance). Models
are the operator's choice: request options name a draft source or a second model only among those
the server was started with (``Models``), never a path or a hub id, and each model or draft copy is
built once and shared by every strategy instance, so distinct option sets cost no model memory.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from decodekit.servers.openai.errors import APIError, bad_value
from decodekit.servers.openai.limits import Limits, check_nesting

from decodekit.strategies.registry import by_name, entry

MAX_CACHED = 64
BUILTIN_DRAFTS = ("ngram", "forced", "int8", "head")


class Models:
    """The models a server may use beyond its own: named at start (``--draft-model``, ``--small-model``,
    ``--allow-models``), loaded there; plus shared draft sources built once on first use."""

    def __init__(self, llm, extra: dict | None = None, small: str | None = None):
        self.llm = llm
        self.extra = dict(extra or {})  # name -> Backend
        self.small = small
        self._drafters: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(self.extra)

    def backend(self, name, param: str):
        """The served model (its name stays a name) or an operator's model; 400 for anything else."""
        main = self.llm.backend
        if not isinstance(name, str):
            raise bad_value(f"{param} must be a model name", param)
        if name in (main.name, main.name.rsplit(":", 1)[0], self.llm.model_name):
            return name
        if name in self.extra:
            return self.extra[name]
        raise bad_value(f"model {name!r} is not served here; {param} may name {self._allowed()} "
                        "(the operator adds models with --draft-model / --small-model / --allow-models)", param)

    def drafter(self, spec, options: dict):
        """A draft source for a request's ``draft`` option: ``ngram`` / ``forced`` as they are
        (stateless), model sources as shared ``Drafter``s; 400 for an unknown source."""
        from decodekit.drafting.drafters import LookupThenModel, NgramDrafter

        if not isinstance(spec, str):
            raise bad_value("decodekit.draft must be a string", "decodekit.draft")
        if spec in ("ngram", "forced"):
            return spec  # the strategy builds it with the request's n-gram options
        if spec.startswith("ngram+"):  # the lookup with the request's options, beside the shared model
            lookup = {k: options[k] for k in ("max_ngram", "min_ngram") if k in options}
            if "match_caps" in options:
                if not isinstance(options["match_caps"], list):
                    raise bad_value("decodekit.match_caps must be a list of integers", "decodekit.match_caps")
                lookup["match_caps"] = tuple(options["match_caps"])
            return LookupThenModel(NgramDrafter(**lookup), self._shared(spec.removeprefix("ngram+")))
        return self._shared(spec)

    def _shared(self, spec: str):
        from decodekit.strategies.speculative import make_drafter

        if spec not in ("int8", "head") and spec not in self.extra:
            raise bad_value(f"draft {spec!r} is not available; choose one of {self._drafts()}", "decodekit.draft")
        with self._lock:
            if spec not in self._drafters:
                source = self.extra.get(spec, spec)
                try:
                    self._drafters[spec] = make_drafter(source, self.llm.backend)
                except ValueError as e:
                    raise bad_value(f"draft {spec!r}: {e}", "decodekit.draft") from None
            return self._drafters[spec]

    def _allowed(self) -> list[str]:
        return [self.llm.model_name, *self.names]

    def _drafts(self) -> list[str]:
        return [*BUILTIN_DRAFTS, *self.names, *(f"ngram+{n}" for n in ("int8", "head", *self.names))]


def json_constraint_available() -> bool:
    try:
        import decodekit.constraints  # noqa: F401
        from decodekit.constraints import JsonSchema  # noqa: F401
        from decodekit.strategies.constrained import Constrained  # noqa: F401
    except ImportError:
        return False
    return True


class StrategyCache:
    """Builds and caches strategies; thread-safe (built off the event loop: loading can be slow)."""

    def __init__(self, on_evict=None, max_cached: int = MAX_CACHED, models: Models | None = None,
                 limits: Limits | None = None):
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._on_evict = on_evict
        self.max_cached = max_cached
        self.models = models
        self.limits = limits or Limits()

    def resolve(self, options: dict | None, response_format=None, guided: dict | None = None):
        """The strategy for a request (None: the engine default). Raises ``APIError`` 400.

        ``guided``: vLLM-style constraint fields (``{"regex": ...}``, ``json``, ``choice``, ``grammar``).
        """
        options = dict(options or {})
        if not isinstance(options.get("strategy", ""), str):
            raise bad_value("decodekit.strategy must be a string", "decodekit.strategy")
        name = options.pop("strategy", None)
        self._check_options(options)
        spec = constraint_spec(response_format, guided, self.limits)
        if spec is not None:
            base = "sample" if name in (None, "constrained") else name  # "constrained": plain sampling, wrapped
            found = _entry(base)
            if found.constraint != "wraps":
                raise bad_value(f"constrained output composes with decodekit.strategy 'constrained' or 'speculative', "
                                f"got {name!r} ({found.hint})", "decodekit.strategy")
            own = self._with_models(base, options)
            return self._get((name or "constrained", spec, options),
                             lambda: self._prepared(_constrained(spec, own, found, self.limits)))
        if name is None:
            if options:
                raise bad_value(f"decodekit options {sorted(options)} need a decodekit.strategy", "decodekit")
            return None
        return self._get((name, options), lambda: _named(name, self._with_models(name, options)))

    def _prepared(self, strategy):
        """Build the constraint's automata here, off the engine thread (a JSON schema's byte automaton
        and token index take seconds), instead of at the request's first step."""
        constraint = strategy.constraint
        llm = self.models.llm if self.models is not None else None
        if llm is not None and not llm.engine.token_level:
            return strategy  # a request-level engine (vLLM) compiles its own structured outputs
        tokenizer = llm.tokenizer if llm is not None else None
        try:
            constraint.byte_dfa()
            if tokenizer is not None and strategy._uses_index():
                constraint.index(tokenizer)
        except ValueError as e:
            raise bad_value(f"constraint does not compile: {e}", "response_format") from None
        return strategy

    def _check_options(self, options: dict) -> None:
        particles = options.get("num_particles", 1)
        if isinstance(particles, int) and not isinstance(particles, bool) and particles > self.limits.max_particles:
            raise bad_value(f"num_particles is at most {self.limits.max_particles} on this server", "decodekit")

    def _with_models(self, name: str, options: dict) -> dict:
        """Options with model names replaced by the server's own (shared) backends and drafters."""
        if self.models is None:
            return options
        options = dict(options)
        if name == "speculative":
            options["draft"] = self.models.drafter(options.get("draft", "ngram"), options)
        elif name == "entropy":
            for role in ("small", "large"):
                if options.get(role) is not None:
                    options[role] = self.models.backend(options[role], f"decodekit.{role}")
            if options.get("small") is None and options.get("large") is None:
                if self.models.small is None:
                    raise bad_value("entropy switching needs a second model: start the server with --small-model "
                                    "NAME, or name one with decodekit.small / decodekit.large", "decodekit.strategy")
                options["small"] = self.models.backend(self.models.small, "decodekit.small")
        return options

    def _get(self, key, build):
        text = json.dumps(key, sort_keys=True, default=str)
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
            strategy = build()
            self._cache[text] = strategy
            while len(self._cache) > self.max_cached:
                _, old = self._cache.popitem(last=False)
                if self._on_evict is not None:
                    self._on_evict(old)
            return strategy


def _entry(name: str):
    try:
        return entry(name)
    except ValueError as e:
        raise bad_value(str(e), "decodekit.strategy") from None


def _named(name: str, options: dict):
    try:
        return by_name(name, **options)
    except ValueError as e:
        raise bad_value(str(e), "decodekit.strategy" if "unknown strategy" in str(e) else "decodekit") from None
    except TypeError as e:  # an option the strategy does not take
        raise bad_value(f"strategy {name!r}: {e}", "decodekit") from None


def constraint_spec(response_format, guided: dict | None, limits: Limits | None = None) -> tuple[str, object] | None:
    """(kind, value) of the one constraint a request asks for, or None; 400 for two, an invalid schema
    or one past the server's limits."""
    limits = limits or Limits()
    specs = [(k, v) for k, v in (guided or {}).items() if v is not None]
    schema = json_schema_of(response_format)
    if schema is not None:
        specs.append(("json", schema))
    if len(specs) > 1:
        raise bad_value(f"give one output constraint, got {[k for k, _ in specs]}", "response_format")
    if not specs:
        return None
    kind, value = specs[0]
    _check_size(kind, value, limits)
    if kind == "json":
        value = _parse_schema(value)
    return kind, value


def _check_size(kind: str, value, limits: Limits) -> None:
    if kind == "json":
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > limits.max_schema_bytes:
            raise bad_value(f"JSON schema has {len(text)} characters; the limit is {limits.max_schema_bytes}",
                            "response_format")
        check_nesting(value, limits.max_schema_depth, "response_format")
    elif kind == "choice":
        if isinstance(value, list) and len(value) > limits.max_choices:
            raise bad_value(f"guided_choice has {len(value)} options; the limit is {limits.max_choices}",
                            "guided_choice")
        if isinstance(value, list) and any(isinstance(o, str) and len(o) > limits.max_choice_chars for o in value):
            raise bad_value(f"guided_choice options are at most {limits.max_choice_chars} characters", "guided_choice")
    elif kind in ("regex", "grammar") and isinstance(value, str):
        limit = limits.max_pattern_chars if kind == "regex" else limits.max_grammar_chars
        if len(value) > limit:
            raise bad_value(f"guided_{kind} has {len(value)} characters; the limit is {limit}", f"guided_{kind}")


def json_schema_of(response_format) -> dict | None:
    """The JSON schema a ``response_format`` asks for (None for text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    spec = response_format.json_schema
    if spec is None or spec.schema_ is None:
        raise bad_value("response_format json_schema needs json_schema.schema", "response_format.json_schema")
    return spec.schema_


def _parse_schema(schema) -> dict:
    import jsonschema

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise bad_value(f"JSON schema is not valid JSON: {e}", "guided_json") from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise bad_value(f"invalid JSON schema: {e.message}", "response_format.json_schema.schema") from None
    return schema


def tool_constraint(spec: dict):
    """``guided["tools"]`` (``tools.ToolPlan.spec``): the call list's schema, free text before it or not."""
    from decodekit.constraints import JsonSchema
    from decodekit.constraints.tool_call import ToolCall

    return ToolCall(JsonSchema(spec["schema"]), text_allowed=spec["text"])


def _constrained(spec: tuple[str, object], options: dict, found=None, limits: Limits | None = None):
    """The constrained strategy for ``spec``: ``found`` (a registry entry; default plain sampling) wrapped."""
    found = found or entry("sample")
    if not json_constraint_available():
        raise APIError(400, "constrained output (response_format json, guided_*) needs decodekit.constraints, "
                            "which this build lacks", param="response_format", code="unsupported")
    from decodekit import constraints as C

    kind, value = spec
    limits = limits or Limits()
    builders = {"json": C.JsonSchema, "regex": lambda v: C.Regex(v, timeout=limits.check_timeout_s),
                "choice": C.OneOf, "grammar": lambda v: C.Grammar(v, timeout=limits.check_timeout_s),
                "tools": tool_constraint}
    options = {"sampler": "awrs", **options}
    try:
        constraint = builders[kind](value)
        if options["sampler"] == "masked" and not constraint.has_mask:
            raise bad_value(f"sampler 'masked' checks every token of the vocabulary per step; a {kind} constraint "
                            "without a mask engine would stall the server: use sampler 'awrs'", "decodekit.sampler")
        return found.wrap(constraint, options)  # the constraint's options to it, the rest to the wrapped strategy
    except ValueError as e:
        raise bad_value(f"invalid {kind} constraint or options: {e}", "response_format" if kind == "json"
                        else "tools" if kind == "tools" else f"guided_{kind}") from None
    except TypeError as e:
        raise bad_value(f"constrained strategy: {e}", "decodekit") from None
