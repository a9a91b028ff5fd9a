"""JSON-schema constraint: outlines-core compiles the schema to a regex; ``jsonschema`` validates outputs.

Generation follows the compiled regex (property order as in the schema, at most one space
between tokens), so every generated document has the layout the regex describes; a complete
output must also pass full ``jsonschema`` validation (keywords the regex cannot express, such as
``uniqueItems``, are enforced there: EOS is refused until they hold).
"""

from __future__ import annotations

import datetime
import json
import re

import jsonschema

from decodekit.constraints.base import Constraint, as_bytes, decode_complete
from decodekit.constraints.regex import ByteDFA

MAX_REGEX = 1_000_000  # characters of compiled regex; larger automata take minutes to build


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


_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_TIME = re.compile(r"\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _format_checker() -> jsonschema.FormatChecker:
    """jsonschema's checkers plus RFC 3339 date-time / date / time (its own need extra packages)."""
    checker = jsonschema.FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def date_time(value) -> bool:
        if not isinstance(value, str):
            return True
        if not _DATE_TIME.fullmatch(value):
            return False
        datetime.datetime.fromisoformat(value.upper().replace("Z", "+00:00").replace(" ", "T"))
        return True

    @checker.checks("date", raises=ValueError)
    def date(value) -> bool:
        return not isinstance(value, str) or (len(value) == 10 and bool(datetime.date.fromisoformat(value)))

    @checker.checks("time", raises=ValueError)
    def time(value) -> bool:
        return not isinstance(value, str) or bool(_TIME.fullmatch(value))

    return checker


def _compile(schema, whitespace: str | None, max_depth: int) -> str:
    """The schema's regex, unrolling recursive ``$ref``s one level at a time while the regex stays small.

    outlines-core's size grows geometrically with the recursion depth (a recursive theme schema:
    4 MB at depth 1, no answer within a minute at depth 2), so a deeper level is built only when
    its predicted size stays under ``MAX_REGEX``.
    """
    from outlines_core.json_schema import build_regex_from_schema

    text = json.dumps(schema)
    sizes: list[int] = []
    regex = ""
    for depth in range(1, max_depth + 1):
        if len(sizes) >= 2 and sizes[-1] == sizes[-2]:
            break  # not recursive: deeper levels change nothing
        if len(sizes) >= 2 and sizes[-1] ** 2 / max(sizes[-2], 1) > MAX_REGEX:
            break
        try:
            regex = build_regex_from_schema(text, whitespace, depth)
        except Exception as e:  # outlines-core raises its own error types
            raise ValueError(f"JSON schema not supported by outlines-core: {e}") from None
        sizes.append(len(regex))
        if len(regex) > MAX_REGEX:
            raise ValueError(f"JSON schema too large for the automaton: its regex has {len(regex)} characters "
                             f"(limit {MAX_REGEX})")
    return regex


class JsonSchema(Constraint):
    """``JsonSchema(schema)``: the output is one JSON document valid under ``schema``.

    Raises ``ValueError`` for an invalid schema or one outlines-core cannot compile.
    ``whitespace`` is the regex for optional whitespace between JSON tokens.
    """

    name = "json_schema"

    def __init__(self, schema, *, whitespace: str | None = r"[ ]?", max_recursion_depth: int = 3):
        super().__init__()
        self.schema = _schema_dict(schema)
        try:
            jsonschema.validators.validator_for(self.schema).check_schema(self.schema)
        except jsonschema.SchemaError as e:
            raise ValueError(f"invalid JSON schema: {e.message}") from None
        cls = jsonschema.validators.validator_for(self.schema)
        self._validator = cls(self.schema, format_checker=_format_checker())  # "format" is asserted, not noted
        self.regex = _compile(self.schema, whitespace, max_recursion_depth)
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
        return s is not None and self.valid(s) and self.dfa.complete_ok(text)  # cheap check first

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

    def byte_dfa(self) -> ByteDFA:
        return self.dfa
