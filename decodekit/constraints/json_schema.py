"""JSON-schema constraint: an exact automaton where outlines-core compiles the schema, a prefix checker
for every other schema ``jsonschema`` accepts; ``jsonschema`` validates every output.

Fast path: outlines-core compiles the schema to a regex, so generation follows it (property order
as in the schema, at most one space between tokens) and the ``masked`` sampler and vLLM get exact
token masks; keywords the regex cannot express, such as ``uniqueItems``, are enforced by the final
check (EOS is refused until they hold). Where outlines-core refuses the schema (no ``type``,
``maxItems``, ``anyOf`` without types, ...) or ``automaton=False``, ``json_prefix.JsonPrefixChecker``
checks prefixes of any layout against the whole schema; there is then no automaton (``automaton()``
is None: the AWRS and SMC samplers work, ``masked`` does not).
"""

from __future__ import annotations

import datetime
import json
import re

import jsonschema

from decodekit.constraints.base import Constraint, as_bytes, decode_complete
from decodekit.constraints.json_prefix import JsonPrefixChecker, strictly_valid
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
# RFC 3986 absolute URI: a scheme, then only URI characters (jsonschema's own check needs rfc3987)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")  # OpenAPI "byte"


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

    @checker.checks("uri")
    def uri(value) -> bool:
        return not isinstance(value, str) or bool(_URI.fullmatch(value))

    @checker.checks("byte")
    def byte(value) -> bool:
        return not isinstance(value, str) or bool(_BASE64.fullmatch(value))

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


def _validator_class(schema):
    """``jsonschema``'s validator class for ``schema``; ``ValueError`` naming the keyword and its path
    where the schema is not valid under its own draft's meta-schema."""
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        path = [str(p) for p in e.path]
        keyword = next((p for p in reversed(path) if not p.isdigit()), e.validator)
        where = "/" + "/".join(path)
        raise ValueError(f"invalid JSON schema: keyword {keyword!r} at {where}: {e.message}") from None
    return cls


def _check_local_refs(schema, cls) -> None:
    """``ValueError`` for a ``$ref`` into this document (``#...``) that points nowhere. Only where no
    nested ``$id`` changes what ``#`` means (then ``jsonschema`` itself decides, at validation)."""
    from referencing import Registry
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012, specification_with

    refs = list(_local_refs(schema))
    if not refs:
        return
    spec = specification_with(cls.META_SCHEMA.get("$schema", ""), default=DRAFT202012)
    resolver = Registry().with_resource("urn:decodekit:root", spec.create_resource(schema)).resolver(
        "urn:decodekit:root")
    for where, ref in refs:
        try:
            resolver.lookup(ref)
        except Unresolvable:
            raise ValueError(f"invalid JSON schema: keyword '$ref' at {where}: {ref!r} points nowhere "
                             "in the schema") from None


def _local_refs(schema):
    """(path, ref) of every ``#...`` ``$ref``; nothing when a nested ``$id`` rebases them."""
    stack, found = [(schema, "")], []
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            if where and "$id" in node:
                return []
            if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
                found.append((where + "/$ref", node["$ref"]))
            stack.extend((v, f"{where}/{k}") for k, v in node.items()
                         if k not in ("enum", "const", "examples", "default"))
        elif isinstance(node, list):
            stack.extend((v, f"{where}/{i}") for i, v in enumerate(node))
    return found


class JsonSchema(Constraint):
    """``JsonSchema(schema)``: the output is one JSON document valid under ``schema``.

    Any schema ``jsonschema`` accepts works; ``ValueError`` names the keyword and path of one it
    rejects. ``automaton=True`` (default) uses outlines-core's automaton where it compiles the schema
    (``whitespace``: its regex for optional whitespace between tokens); otherwise, or with
    ``automaton=False``, the JSON prefix checker serves (``automaton()`` None, why in ``automaton_error``).
    """

    name = "json_schema"

    def __init__(self, schema, *, whitespace: str | None = r"[ ]?", max_recursion_depth: int = 3,
                 automaton: bool = True):
        super().__init__()
        self.schema = _schema_dict(schema)
        format_checker = _format_checker()  # "format" is asserted, not noted
        cls = _validator_class(self.schema)
        _check_local_refs(self.schema, cls)
        self._validator = cls(self.schema, format_checker=format_checker)
        self.regex: str | None = None
        self.automaton_error: str | None = "automaton=False" if not automaton else None
        if automaton:
            try:
                self.regex = _compile(self.schema, whitespace, max_recursion_depth)
            except ValueError as e:
                self.automaton_error = str(e)
        self._format_checker = format_checker
        self._dfa: ByteDFA | None = None  # built on first check: large schemas take seconds
        self._checker: JsonPrefixChecker | None = None if self.regex is not None else self._new_checker()

    def _new_checker(self) -> JsonPrefixChecker:
        return JsonPrefixChecker(self.schema, self._format_checker)

    @property
    def dfa(self) -> ByteDFA | None:
        if self._dfa is None and self.regex is not None:
            try:
                self._dfa = ByteDFA(self.regex)
            except ValueError as e:  # the regex compiled but its automaton does not: the checker serves
                self.regex, self.automaton_error, self._checker = None, str(e), self._new_checker()
        return self._dfa

    @property
    def uses_automaton(self) -> bool:
        return self.dfa is not None

    # the automaton checks work on bytes directly: it is over bytes
    def prefix_ok(self, text) -> bool:
        if self.uses_automaton:
            return self.dfa.prefix_ok(as_bytes(text))
        return super().prefix_ok(text)

    def complete_ok(self, text) -> bool:
        text = as_bytes(text)
        s = decode_complete(text)
        if s is None or not self.valid(s):  # cheap check first
            return False
        return not self.uses_automaton or self.dfa.complete_ok(text)

    def prefix_ok_text(self, text: str) -> bool:
        if self.uses_automaton:
            return self.dfa.prefix_ok(text.encode())
        return self._checker.prefix_ok(text)

    def complete_ok_text(self, text: str) -> bool:
        return self.complete_ok(text.encode())

    def valid(self, text: str) -> bool:
        """Full ``jsonschema`` validation of ``text`` (whatever its layout; strict JSON, see ``load_strict``)."""
        return strictly_valid(self._validator, text)

    def automaton(self) -> str | None:
        return self.regex if self.uses_automaton else None

    def byte_dfa(self) -> ByteDFA | None:
        return self.dfa
