"""JSON-schema constraint: outlines-core compiles the schema to a regex; ``jsonschema`` validates outputs.

Generation follows the compiled regex (property order as in the schema, at most one space
between tokens), so every generated document has the layout the regex describes; a complete
output must also pass full ``jsonschema`` validation (keywords the regex cannot express, such as
``uniqueItems``, are enforced there: EOS is refused until they hold).
"""

from __future__ import annotations

import json

import jsonschema

from decodekit.constraints.base import Constraint, as_bytes, decode_complete
from decodekit.constraints.regex import ByteDFA


def _schema_dict(schema) -> dict:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"schema is not valid JSON: {e}") from None
    elif isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # a pydantic model class
        schema = schema.model_json_schema()
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"schema must be a dict, a JSON string or a pydantic model class, got {type(schema).__name__}")
    return schema


class JsonSchema(Constraint):
    """``JsonSchema(schema)``: the output is one JSON document valid under ``schema``.

    Raises ``ValueError`` for an invalid schema or one outlines-core cannot compile.
    ``whitespace`` is the regex for optional whitespace between JSON tokens.
    """

    name = "json_schema"

    def __init__(self, schema, *, whitespace: str | None = r"[ ]?"):
        super().__init__()
        self.schema = _schema_dict(schema)
        try:
            jsonschema.validators.validator_for(self.schema).check_schema(self.schema)
        except jsonschema.SchemaError as e:
            raise ValueError(f"invalid JSON schema: {e.message}") from None
        self._validator = jsonschema.validators.validator_for(self.schema)(self.schema)
        from outlines_core.json_schema import build_regex_from_schema

        try:
            self.regex = build_regex_from_schema(json.dumps(self.schema), whitespace)
        except Exception as e:  # outlines-core raises its own error types
            raise ValueError(f"JSON schema not supported by outlines-core: {e}") from None
        self._dfa: ByteDFA | None = None  # built on first check: large schemas take seconds

    @property
    def dfa(self) -> ByteDFA:
        if self._dfa is None:
            self._dfa = ByteDFA(self.regex)
        return self._dfa

    # the checks work on bytes directly: the automaton is over bytes
    def prefix_ok(self, text) -> bool:
        return self.dfa.prefix_ok(as_bytes(text))

    def complete_ok(self, text) -> bool:
        text = as_bytes(text)
        s = decode_complete(text)
        return s is not None and self.dfa.complete_ok(text) and self.valid(s)

    def prefix_ok_text(self, text: str) -> bool:
        return self.prefix_ok(text.encode())

    def complete_ok_text(self, text: str) -> bool:
        return self.complete_ok(text.encode())

    def valid(self, text: str) -> bool:
        """Full ``jsonschema`` validation of ``text`` (whatever its layout)."""
        try:
            return self._validator.is_valid(json.loads(text))
        except (json.JSONDecodeError, RecursionError):
            return False

    def automaton(self) -> str:
        return self.regex
