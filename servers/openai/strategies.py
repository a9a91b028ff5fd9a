"""Per-request strategy choice: the ``decodekit`` body field and ``response_format``.

Strategy instances are cached per option set, so a draft model loads once and every request with
the same options shares one instance (the engine batches sequences per strategy instance).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from decodekit.api import NO_CONSTRAINT_COMPOSITION
from decodekit.strategies import by_name
from servers.openai.errors import APIError, bad_value

MAX_CACHED = 64


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

    def __init__(self, on_evict=None, max_cached: int = MAX_CACHED):
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._on_evict = on_evict
        self.max_cached = max_cached

    def resolve(self, options: dict | None, response_format=None, guided: dict | None = None):
        """The strategy for a request (None: the engine default). Raises ``APIError`` 400.

        ``guided``: vLLM-style constraint fields (``{"regex": ...}``, ``json``, ``choice``, ``grammar``).
        """
        options = dict(options or {})
        if not isinstance(options.get("strategy", ""), str):
            raise bad_value("decodekit.strategy must be a string", "decodekit.strategy")
        name = options.pop("strategy", None)
        spec = constraint_spec(response_format, guided)
        if spec is not None:
            if name not in (None, "constrained", "speculative"):
                why = NO_CONSTRAINT_COMPOSITION.get(name, "")
                raise bad_value(f"constrained output composes with decodekit.strategy 'constrained' or 'speculative', "
                                f"got {name!r}" + (f" ({why})" if why else ""), "decodekit.strategy")
            speculative = name == "speculative"
            return self._get((name or "constrained", spec, options), lambda: _constrained(spec, options, speculative))
        if name is None:
            if options:
                raise bad_value(f"decodekit options {sorted(options)} need a decodekit.strategy", "decodekit")
            return None
        return self._get((name, options), lambda: _named(name, options))

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


def _named(name: str, options: dict):
    try:
        return by_name(name, **options)
    except ValueError as e:
        raise bad_value(str(e), "decodekit.strategy" if "unknown strategy" in str(e) else "decodekit") from None
    except TypeError as e:  # an option the strategy does not take
        raise bad_value(f"strategy {name!r}: {e}", "decodekit") from None


def constraint_spec(response_format, guided: dict | None) -> tuple[str, object] | None:
    """(kind, value) of the one constraint a request asks for, or None; 400 for two or an invalid schema."""
    specs = [(k, v) for k, v in (guided or {}).items() if v is not None]
    schema = json_schema_of(response_format)
    if schema is not None:
        specs.append(("json", schema))
    if len(specs) > 1:
        raise bad_value(f"give one output constraint, got {[k for k, _ in specs]}", "response_format")
    if not specs:
        return None
    kind, value = specs[0]
    if kind == "json":
        value = _parse_schema(value)
    return kind, value


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


CONSTRAINED_OPTIONS = ("sampler", "num_particles", "ess_threshold", "resampling", "exact_weights")


def _constrained(spec: tuple[str, object], options: dict, speculative: bool = False):
    if not json_constraint_available():
        raise APIError(400, "constrained output (response_format json, guided_*) needs decodekit.constraints, "
                            "which this build lacks", param="response_format", code="unsupported")
    from decodekit import constraints as C
    from decodekit.strategies.constrained import Constrained

    kind, value = spec
    builders = {"json": C.JsonSchema, "regex": C.Regex, "choice": C.OneOf, "grammar": C.Grammar}
    options = {"sampler": "awrs", **options}
    try:
        constraint = builders[kind](value)
        if speculative:  # the constraint's options to it, the rest to the draft source
            from decodekit.strategies.constrained_speculative import ConstrainedSpeculative
            from decodekit.strategies.speculative import Speculative

            own = {k: v for k, v in options.items() if k in CONSTRAINED_OPTIONS}
            drafting = Speculative(**{k: v for k, v in options.items() if k not in CONSTRAINED_OPTIONS})
            return ConstrainedSpeculative(constraint, drafting, **own)
        return Constrained(constraint, **options)
    except ValueError as e:
        raise bad_value(f"invalid {kind} constraint or options: {e}", "response_format" if kind == "json"
                        else f"guided_{kind}") from None
    except TypeError as e:
        raise bad_value(f"constrained strategy: {e}", "decodekit") from None
