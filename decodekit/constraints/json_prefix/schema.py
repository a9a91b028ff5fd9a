"""Compiled subschemas and their alternatives: what a value at one position of a document must satisfy.

A ``Sub`` is one subschema with its ``$ref`` resolver (``referencing``, as ``jsonschema`` reads it);
it reads only the keywords its draft's validator knows. ``Sub.expand()`` turns the in-place
applicators (``allOf``, ``anyOf``, ``oneOf``, ``$ref``, ``if``/``then``/``else``) into alternatives:
a tuple of conjunctions, each a tuple of ``Sub``s whose own keywords must all hold. The expansion
is a relaxation where it must be: ``oneOf`` acts as ``anyOf`` and ``if`` as ``(if and then) or else``
until the value closes, ``not``, ``$dynamicRef`` and ``unevaluated*`` count as true, a ``$ref``
cycle that descends into no value counts as true, and an expansion past ``MAX_ALTERNATIVES`` drops
the applicator. Dropping a conjunct can only keep more prefixes alive; a closed value is then
checked exactly by ``jsonschema`` (``Sub.valid``).
"""

from __future__ import annotations

import itertools
import json

import jsonschema
import referencing.jsonschema
import regex as re
from referencing.exceptions import Unresolvable

from decodekit.constraints.base import ConstraintTimeout
from decodekit.constraints.regex import TimedPattern

MAX_ALTERNATIVES = 64
PATTERN_TIMEOUT = 0.05  # seconds per partial match; past it the pattern counts as satisfiable
OLD_DRAFTS = (jsonschema.Draft3Validator, jsonschema.Draft4Validator, jsonschema.Draft6Validator,
              jsonschema.Draft7Validator)  # drafts where "$ref" hides its sibling keywords
_VALID_MEMO = 4096
# formats whose every valid string fully matches the pattern (the format check at completion stays exact),
# so a string prefix must partially match it
FORMAT_PREFIXES = {  # \d as in the checks (Unicode digits)
    "date-time": r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})",
    "time": r"\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})",
    "ipv4": r"[0-9]{1,3}(\.[0-9]{1,3}){3}",
}
FLAT_KEYWORDS = frozenset({  # the keywords a prefix is checked against (the rest decide at completion)
    "type", "enum", "const", "properties", "patternProperties", "additionalProperties", "propertyNames",
    "maxProperties", "prefixItems", "items", "additionalItems", "maxItems", "uniqueItems", "maxLength",
    "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})


class Context:
    """Per-schema state shared by all subschemas: the validator class, caches, the format checker."""

    def __init__(self, schema, format_checker):
        self.cls = jsonschema.validators.validator_for(schema)
        self.root_validator = self.cls(schema, format_checker=format_checker)
        meta_id = self.cls.META_SCHEMA.get("$schema") or self.cls.META_SCHEMA.get("$id") or ""
        self.spec = referencing.jsonschema.specification_with(meta_id, default=referencing.Specification.OPAQUE)
        # "then" / "else" are read by the "if" validator, not validators of their own
        self.known = frozenset(self.cls.VALIDATORS) | ({"then", "else"} if "if" in self.cls.VALIDATORS else set())
        asserted = getattr(format_checker, "checkers", {})
        self.formats = {name: re.compile(p) for name, p in FORMAT_PREFIXES.items() if name in asserted}
        self.subs: dict[tuple, Sub] = {}
        self.patterns: dict[str, TimedPattern | None] = {}
        self.alts: dict[tuple, tuple] = {}  # interned conjunctions (tuples of Subs) by member ids
        # $dynamicRef / $recursiveRef depend on the path taken: only the whole document is checked exactly
        self.dynamic = any(k in self.known for k in ("$dynamicRef", "$recursiveRef")) and _mentions_dynamic(schema)
        self.root = self.sub(schema, self.root_validator._resolver)

    def sub(self, schema, resolver) -> Sub:
        key = (id(schema), getattr(resolver, "_base_uri", ""))
        if key not in self.subs:
            self.subs[key] = Sub(self, schema, resolver)
        return self.subs[key]

    def child(self, schema, resolver) -> Sub:
        """The subschema ``schema`` found under a keyword of a schema read with ``resolver``."""
        if isinstance(schema, dict):
            resolver = resolver.in_subresource(self.spec.create_resource(schema))
        return self.sub(schema, resolver)

    def synthetic(self, schema: dict) -> Sub:
        """A schema built here (enum of the values an ``enum`` allows at one position); kept alive."""
        key = ("synthetic", json.dumps(schema, sort_keys=True, default=str))
        if key not in self.subs:
            self.subs[key] = Sub(self, schema, self.root.resolver)
        return self.subs[key]

    def pattern(self, source: str) -> TimedPattern | None:
        """The compiled pattern, or None where the ``regex`` module cannot read it (then unchecked)."""
        if source not in self.patterns:
            try:
                self.patterns[source] = TimedPattern(re.compile(source), PATTERN_TIMEOUT, "a schema pattern")
            except (re.error, TypeError, ValueError, OverflowError):
                self.patterns[source] = None
        return self.patterns[source]

    def conj(self, subs) -> tuple:
        unique = tuple(dict.fromkeys(subs))
        key = tuple(id(s) for s in unique)
        return self.alts.setdefault(key, unique)


def _mentions_dynamic(schema) -> bool:
    text = json.dumps(schema, default=str)
    return "$dynamicRef" in text or "$recursiveRef" in text


def partial_search(pattern: TimedPattern | None, text: str) -> bool:
    """Can ``text`` be extended to contain a match of ``pattern`` (``re.search`` semantics)?"""
    if pattern is None:
        return True
    try:
        return pattern._call("search", text, 0, len(text), partial=True) is not None
    except ConstraintTimeout:
        return True


def full_search(pattern: TimedPattern | None, text: str) -> bool:
    if pattern is None:
        return True
    try:
        return pattern._call("search", text, 0, len(text)) is not None
    except ConstraintTimeout:
        return True


def kind_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), "other")


_KINDS = {"integer": "number", "number": "number", "string": "string", "object": "object", "array": "array",
          "boolean": "boolean", "null": "null"}


class Sub:
    """One subschema: its own (non-applicator) keywords read once, its alternatives on demand."""

    def __init__(self, ctx: Context, schema, resolver):
        self.ctx, self.schema, self.resolver = ctx, schema, resolver
        self._expanded: tuple | None = None
        self._expanding = False
        self._validator = None
        self._valid: dict[str, bool] = {}
        self.kw = self._own_keywords(schema)
        self.kinds = self._kinds()
        self.enums = self._enums()
        self.integer = self.kinds == frozenset({"number"}) and "number" not in _as_list(self.kw.get("type"))
        self.flat = any(k in FLAT_KEYWORDS for k in self.kw)

    # ---- reading the schema ---------------------------------------------------------------
    def _own_keywords(self, schema) -> dict:
        if not isinstance(schema, dict):
            return {}
        kw = {k: v for k, v in schema.items() if k in self.ctx.known}
        if "$ref" in kw and self.ctx.cls in OLD_DRAFTS:
            return {"$ref": kw["$ref"]}
        return kw

    def _kinds(self) -> frozenset | None:
        types = self.kw.get("type")
        if types is None:
            return None
        return frozenset(_KINDS[t] for t in _as_list(types) if t in _KINDS)

    def _enums(self) -> tuple:
        """Each ``enum`` / ``const`` as a list of allowed values (all must hold)."""
        out = []
        if isinstance(self.kw.get("enum"), list):
            out.append(self.kw["enum"])
        if "const" in self.kw:
            out.append([self.kw["const"]])
        return tuple(out)

    def at(self, schema) -> Sub:
        return self.ctx.child(schema, self.resolver)

    # ---- alternatives ---------------------------------------------------------------------
    def expand(self) -> tuple:
        """Alternatives (tuple of conjunctions); ``()`` when nothing is allowed."""
        if self._expanded is None:
            if self._expanding:  # a $ref cycle that descends into no value: relax to true
                return ((),)
            self._expanding = True
            try:
                self._expanded = self._compute_expand()
            finally:
                self._expanding = False
        return self._expanded

    def _compute_expand(self) -> tuple:
        if self.schema is False:
            return ()
        alts = [(self,)] if self.flat else [()]
        for part in self._applicator_parts():
            joined = _product(alts, part)
            if len(joined) <= MAX_ALTERNATIVES:
                alts = joined
        return tuple(dict.fromkeys(self.ctx.conj(a) for a in alts))

    def _applicator_parts(self):
        kw = self.kw
        if "$ref" in kw:
            target = self._resolve(kw["$ref"])
            if target is not None:
                yield target.expand()
        for m in _as_list(kw.get("allOf")):
            yield self.at(m).expand()
        for key in ("anyOf", "oneOf"):
            if isinstance(kw.get(key), list):
                yield tuple(a for m in kw[key] for a in self.at(m).expand())
        if "if" in kw and "else" in kw:
            branch = self.at(kw["if"]).expand()
            if "then" in kw:
                branch = tuple(_product(branch, self.at(kw["then"]).expand()))
            yield branch + self.at(kw["else"]).expand()
        elif "if" in kw and "then" in kw:
            pass  # (if and then) or (not if): anything, until the value closes

    def _resolve(self, ref) -> Sub | None:
        try:
            resolved = self.resolver.lookup(ref)
        except (Unresolvable, TypeError, ValueError):  # a remote or broken $ref: decided at completion
            return None
        return self.ctx.sub(resolved.contents, resolved.resolver)

    # ---- the exact check of a closed value --------------------------------------------------
    def valid(self, value) -> bool:
        if self.ctx.dynamic:
            return True  # only the whole document is checked (dynamic scopes)
        key = json.dumps(value, sort_keys=True)
        hit = self._valid.get(key)
        if hit is None:
            hit = self._check(value)
            if len(self._valid) > _VALID_MEMO:
                self._valid.clear()
            self._valid[key] = hit
        return hit

    def _check(self, value) -> bool:
        if self._validator is None:
            self._validator = self.ctx.root_validator.evolve(schema=self.schema, _resolver=self.resolver)
        try:
            return self._validator.is_valid(value)
        except Exception:  # an unresolvable $ref, a pattern `re` rejects: the document check decides
            return True


def _as_list(x) -> list:
    if x is None:
        return []
    return x if isinstance(x, list) else [x]


def _product(alts, part) -> list:
    return [a + b for a, b in itertools.product(alts, part)]


def union_of_products(groups) -> tuple:
    """Alternatives of ``or`` over groups of ``and``-ed Subs (each group: a tuple of Subs), capped:
    a conjunct whose alternatives would pass ``MAX_ALTERNATIVES`` is left out (a relaxation)."""
    out: dict = {}
    for subs in groups:
        alts: list = [()]
        for s in subs:
            joined = _product(alts, s.expand())
            if len(joined) <= MAX_ALTERNATIVES:
                alts = joined
        for a in alts:
            conj = s.ctx.conj(a) if subs else a
            out[conj] = True
    return tuple(out)
