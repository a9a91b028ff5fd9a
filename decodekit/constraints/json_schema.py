"""JSON-schema constraint: llguidance's exact mask where it models the schema, decodekit's JSON prefix
checker elsewhere; ``jsonschema`` validates every output.

Engines (``engine=``): ``"auto"`` (default) routes each schema (``json_route.route``): llguidance
where it compiles the schema with no warning and the schema has none of the keywords llguidance was
found to model inexactly, the prefix checker (``json_prefix.JsonPrefixChecker``, any schema
``jsonschema`` accepts) elsewhere; ``"llguidance"`` / ``"checker"`` force one; ``"outlines"`` is
outlines-core's regex automaton (the older default; it fixes property order and whitespace and is
unsound on some schemas, so it is only an explicit choice).

Two questions, answered apart. *Validation* (``valid``, ``prefix_ok``, ``complete_ok``) is exact in
any layout and property order. *Generation* keeps a canonical layout: compact (no whitespace
outside strings) unless ``whitespace=`` loosens it, on both paths; llguidance's mask also writes
properties in the schema's order (``properties`` first, in order, then the others). EOS is allowed
only where ``complete_ok`` holds, so the mask never makes an invalid document final.
"""

from __future__ import annotations

import datetime
import json
import re

import jsonschema

from decodekit.constraints.base import Constraint, as_bytes, decode_complete
from decodekit.constraints.json_keys import NameGuard
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
    rejects. ``engine``: ``"auto"`` | ``"llguidance"`` | ``"checker"`` | ``"outlines"`` (module doc);
    ``automaton=False`` means ``"checker"``. ``whitespace``: the generation layout: None (default)
    compact, ``"flexible"`` any JSON whitespace, or a regex for the whitespace between tokens
    (llguidance and outlines-core; the checker then allows any whitespace). ``self.engine`` is the
    engine chosen, ``self.route`` why.
    """

    name = "json_schema"

    def __init__(self, schema, *, whitespace: str | None = None, max_recursion_depth: int = 3,
                 automaton: bool = True, engine: str = "auto"):
        super().__init__()
        from decodekit.constraints.guidance import check_engine
        from decodekit.constraints.json_route import route

        engine = check_engine(engine, automaton)
        if whitespace is not None and not isinstance(whitespace, str):
            raise ValueError(f"whitespace must be None (compact), 'flexible' or a regex, got {whitespace!r}")
        self.schema = _schema_dict(schema)
        format_checker = _format_checker()  # "format" is asserted, not noted
        cls = _validator_class(self.schema)
        _check_local_refs(self.schema, cls)
        self._validator = cls(self.schema, format_checker=format_checker)
        self._format_checker = format_checker
        self.whitespace = whitespace
        self.regex: str | None = None
        self._grammar: str | None = None
        self.automaton_error: str | None = f"engine={engine!r}" if engine != "outlines" else None
        if engine == "outlines":
            self.engine, self.route = "checker", "outlines-core refused the schema"
            try:
                outlines_ws = {None: "", "flexible": None}.get(whitespace, whitespace)
                self.regex = _compile(self.schema, outlines_ws, max_recursion_depth)
                self.engine, self.route = "outlines", "engine='outlines'"
            except ValueError as e:
                self.automaton_error = str(e)
        elif engine == "checker":
            self.engine, self.route = "checker", "engine='checker'"
        else:
            self.engine, self._grammar, self.route = route(self.schema, whitespace)
            if engine == "llguidance" and self._grammar is None:
                raise ValueError(f"llguidance cannot model this schema exactly: {self.route}")
        self._dfa: ByteDFA | None = None  # built on first check: large schemas take seconds
        self._checker: JsonPrefixChecker | None = None if self.regex is not None else self._new_checker()
        self._layout: dict[bytes, int] = {}  # text -> scan state (generation layout), bounded
        self._strings: dict[bytes, int] = {}  # text -> string scan state (the exponent filter), bounded
        self._names: NameGuard | None = None  # repeated member names (the mask path), built on first use

    def _new_checker(self) -> JsonPrefixChecker:
        return JsonPrefixChecker(self.schema, self._format_checker)

    @property
    def dfa(self) -> ByteDFA | None:
        if self._dfa is None and self.regex is not None:
            try:
                self._dfa = ByteDFA(self.regex)
            except ValueError as e:  # the regex compiled but its automaton does not: the checker serves
                self.regex, self.automaton_error, self._checker = None, str(e), self._new_checker()
                self.engine = "checker"
        return self._dfa

    @property
    def uses_automaton(self) -> bool:
        """outlines-core's automaton checks prefixes (``engine="outlines"`` only)."""
        return self.dfa is not None

    def mask_grammar(self) -> str | None:
        return self._grammar

    def mask_filter(self, text: bytes, ids, pieces):
        """The mask's ids narrowed to the canonical layout where llguidance's grammar allows texts strict
        JSON refuses only once the document is complete (dead ends): no number exponents, no repeated
        member names (``json_keys``)."""
        if self._names is None:
            self._names = NameGuard()
        return self._names.drop(text, self._drop_exponents(text, ids, pieces), pieces)

    def _drop_exponents(self, text: bytes, ids, pieces):
        """The ids without tokens that write a number exponent (``1e5``): the canonical layout writes
        numbers in plain decimal, and llguidance's unbounded numbers would reach exponents past a double
        (``1e999``)."""
        import torch

        risky = self._exponent_tokens(pieces)
        state = self._string_state(text)
        after_digit = state == 0 and text[-1:] in _NUMBER_TAIL
        cand = ids[risky[ids] if not after_digit else (risky | self._e_tokens)[ids]]
        if cand.numel() == 0:
            return ids
        drop = [t for t in cand.tolist() if _writes_exponent(state, text[-1:], pieces[t] or b"")]
        return ids[~torch.isin(ids, torch.tensor(drop, dtype=ids.dtype))] if drop else ids

    def _exponent_tokens(self, pieces):
        """(V,) bool: tokens with a digit or '.' then e / E inside (``1e``, ``.5E``); and, apart,
        tokens starting with e / E (an exponent only right after a number's digit)."""
        import torch

        if getattr(self, "_risky_for", None) is not pieces:
            inner = [bool(p) and _INNER_EXPONENT.search(p) is not None for p in pieces]
            self._risky = torch.tensor(inner, dtype=torch.bool)
            self._e_tokens = torch.tensor([bool(p) and p[:1] in (b"e", b"E") for p in pieces], dtype=torch.bool)
            self._risky_for = pieces
        return self._risky

    def _string_state(self, text: bytes) -> int:
        """0 outside strings, 1 in a string, 2 after a backslash in one; memoised by prefix."""
        memo = self._strings
        cut = len(text)
        while cut > 0 and len(text) - cut <= 64 and text[:cut] not in memo:
            cut -= 1
        if cut > 0 and text[:cut] in memo:
            state = string_scan(memo[text[:cut]], text[cut:])
        else:
            state = string_scan(0, text)
        if len(memo) > 50_000:
            memo.clear()
        memo[text] = state
        return state

    # the automaton checks work on bytes directly: it is over bytes
    def prefix_ok(self, text) -> bool:
        if self.uses_automaton:
            return self.dfa.prefix_ok(as_bytes(text))
        return super().prefix_ok(text)

    def generation_prefix_ok(self, text) -> bool:
        """``prefix_ok`` in the generation layout (compact by default: no whitespace outside strings)."""
        text = as_bytes(text)
        if self.whitespace is None and not self._compact_ok(text):  # cheap first
            return False
        return self.prefix_ok(text) and self._escape_viable(text)

    def _escape_viable(self, text: bytes) -> bool:
        """An unfinished escape at the end of ``text`` (``\\``, ``\\u00``) is kept only where one of
        its completions is a valid prefix: the checker cannot judge the character before the escape
        ends, and a prefix no completion continues is a dead end (``"name\\u002`` where only ``name``
        may follow). Generation writes escapes canonically, as ``json.dumps(ensure_ascii=False)`` does
        (short escapes; ``\\u00XX`` only for control characters: 32 completions at most)."""
        tail = _OPEN_ESCAPE.search(text[-6:])
        if tail is None or not self._escaping(text, len(text) - len(tail.group(0))):
            return True
        digits = tail.group(1)[1:].lower() if tail.group(1) else None
        ends = [e for e in _ESCAPE_ENDS if digits is None or (e[:1] == b"u" and e[1:].startswith(digits))]
        rest = len(digits) + 1 if digits is not None else 0
        return any(self.prefix_ok(text + e[rest:]) for e in ends)

    def _escaping(self, text: bytes, at: int) -> bool:
        """Whether the backslash at ``at`` starts an escape inside a string (not an escaped one)."""
        run = len(text[:at]) - len(text[:at].rstrip(b"\\"))
        return run % 2 == 0 and self._string_state(text[: at - run]) == 1

    def _compact_ok(self, text: bytes) -> bool:
        """No JSON whitespace outside strings in ``text``; scan states memoised by prefix."""
        cut = len(text)
        while cut > 0 and text[:cut] not in self._layout:
            cut -= 1
            if len(text) - cut > 64:  # no memo nearby: scan from the start
                cut = 0
                break
        state = self._layout.get(text[:cut], 0) if cut else 0
        state = compact_scan(state, text[cut:])
        if len(self._layout) > 50_000:
            self._layout.clear()
        self._layout[text] = state
        return state >= 0

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


_WS = frozenset(b" \t\n\r")
_OPEN_ESCAPE = re.compile(rb"\\(u[0-9a-fA-F]{0,3})?$")
# the escapes generation writes: short ones, and \u00XX for the other control characters
_ESCAPE_ENDS = tuple([bytes([c]) for c in b'"\\/bfnrt'] + [b"u00" + f"{i:02x}".encode() for i in range(32)])
_NUMBER_TAIL = tuple(bytes([b]) for b in b"0123456789.")
_INNER_EXPONENT = re.compile(rb"[0-9.][eE]")


def string_scan(state: int, data: bytes) -> int:
    """``compact_scan`` without the layout rule: where ``data`` leaves the string state."""
    for b in data:
        if state == 0:
            state = 1 if b == 0x22 else 0
        elif state == 1:
            state = 2 if b == 0x5C else (0 if b == 0x22 else 1)
        else:
            state = 1
    return state


def _writes_exponent(state: int, last: bytes, piece: bytes) -> bool:
    """Whether ``piece`` after text ending in ``last`` (string state ``state``) writes e / E right after a
    digit or '.' outside strings."""
    prev = last[0] if last else 0
    for b in piece:
        if state == 0:
            if b in b"eE" and prev in b"0123456789.":
                return True
            state = 1 if b == 0x22 else 0
        elif state == 1:
            state = 2 if b == 0x5C else (0 if b == 0x22 else 1)
        else:
            state = 1
        prev = b
    return False


def compact_scan(state: int, data: bytes) -> int:
    """Scan ``data`` from ``state`` (0: outside strings, 1: in a string, 2: after a backslash in one);
    -1 once whitespace appears outside a string."""
    if state < 0:
        return state
    for b in data:
        if state == 0:
            if b in _WS:
                return -1
            if b == 0x22:
                state = 1
        elif state == 1:
            state = 2 if b == 0x5C else (0 if b == 0x22 else 1)
        else:
            state = 1
    return state
