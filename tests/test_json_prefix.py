"""The JSON Schema prefix checker: every prefix of a valid document accepted (any layout), invalid
documents refused, early rejection per keyword, the JSON-Schema-Test-Suite, and generation."""

from __future__ import annotations

import json
import os
import string

import jsonschema
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from decodekit.backends.mock import MockBackend
from decodekit.constraints import JsonSchema
from decodekit.constraints.json_prefix import JsonPrefixChecker
from decodekit.constraints.json_prefix.numbers import min_integer
from decodekit.constraints.json_schema import _format_checker
from decodekit.strategies.constrained import Constrained

EXAMPLES = int(os.environ.get("JSON_PREFIX_EXAMPLES", 300))  # more for a longer hunt
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = ["a", "b", "ab", "name", "nämé", "x y"]
PATTERNS = ["^[a-z]*$", "^a", "b$", "[0-9]{2}", "^(ab|cd)+$"]
WS = " \t\n\r"


# ---- random schemas, and documents built from them -------------------------------------------
def _numbers():
    bound = st.one_of(st.integers(-50, 50), st.floats(-50, 50, allow_nan=False).map(lambda x: round(x, 2)))
    return st.fixed_dictionaries({}, optional={"type": st.sampled_from(["integer", "number", ["integer", "null"]]),
                                               "minimum": bound, "maximum": bound, "exclusiveMinimum": bound,
                                               "exclusiveMaximum": bound, "multipleOf": st.sampled_from([1, 2, 0.5])})


def _strings():
    return st.fixed_dictionaries({"type": st.just("string")}, optional={
        "minLength": st.integers(0, 3), "maxLength": st.integers(0, 8), "pattern": st.sampled_from(PATTERNS)})


def _leaves():
    literal = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(["", "a", "ab", "é"]))
    return st.one_of(_numbers(), _strings(), st.just({}), st.just({"type": "boolean"}), st.just({"type": "null"}),
                     st.lists(literal, min_size=1, max_size=3).map(lambda v: {"enum": v}),
                     literal.map(lambda v: {"const": v}), st.booleans())


def _extend(children):
    objects = st.builds(_object, st.dictionaries(st.sampled_from(NAMES), children, max_size=3),
                        st.sampled_from([None, False, True, {"type": "integer"}]), st.data())
    arrays = st.builds(_array, children, st.lists(children, max_size=2), st.integers(0, 2), st.integers(0, 4),
                       st.booleans())
    combos = st.builds(lambda k, xs: {k: xs}, st.sampled_from(["anyOf", "oneOf", "allOf"]),
                       st.lists(children, min_size=1, max_size=3))
    negated = children.map(lambda s: {"not": s})
    conditional = st.builds(lambda i, t, e: {"if": i, "then": t, "else": e}, children, children, children)
    return st.one_of(objects, arrays, combos, negated, conditional)


def _object(props, additional, data):
    schema = {"type": "object", "properties": props}
    if props:
        schema["required"] = data.draw(st.lists(st.sampled_from(sorted(props)), unique=True, max_size=len(props)))
    if additional is not None:
        schema["additionalProperties"] = additional
    return schema


def _array(items, prefix, min_items, max_items, unique):
    schema = {"type": "array", "items": items, "minItems": min_items, "maxItems": max(min_items, max_items)}
    if prefix:
        schema["prefixItems"] = prefix
    if unique:
        schema["uniqueItems"] = True
    return schema


SCHEMAS = st.recursive(_leaves(), _extend, max_leaves=6)


def _instance(schema, draw, depth=0):
    """A value meant to satisfy ``schema`` (validity is checked afterwards)."""
    if schema is True or schema == {} or depth > 4:
        return draw(st.sampled_from([None, 1, "a", [], {}]))
    if schema is False:
        return None
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return _instance(draw(st.sampled_from(schema[key])), draw, depth + 1)
    if "allOf" in schema:
        return _instance(schema["allOf"][0], draw, depth + 1)
    if "if" in schema:
        return _instance(draw(st.sampled_from([schema["then"], schema["else"]])), draw, depth + 1)
    if "not" in schema:
        return draw(st.sampled_from([None, 3, "zz", [1], {"q": 1}]))
    if "enum" in schema:
        return draw(st.sampled_from(schema["enum"]))
    if "const" in schema:
        return schema["const"]
    return _typed(schema, draw, depth)


def _typed(schema, draw, depth):
    kind = schema.get("type")
    kind = draw(st.sampled_from(kind)) if isinstance(kind, list) else kind
    if kind == "object":
        value = {k: _instance(s, draw, depth + 1) for k, s in schema["properties"].items() if draw(st.booleans())
                 or k in schema.get("required", [])}
        if schema.get("additionalProperties") in (None, True):
            value.update(draw(st.dictionaries(st.sampled_from(["zz", "ab c"]), st.integers(), max_size=1)))
        return dict(draw(st.permutations(list(value.items()))))
    if kind == "array":
        n = draw(st.integers(schema["minItems"], schema["maxItems"]))
        subs = schema.get("prefixItems", []) + [schema["items"]] * n
        return [_instance(subs[i], draw, depth + 1) for i in range(n)]
    if kind == "string":
        return draw(st.text(alphabet="abcd019é😀\"\\\n", max_size=6) | st.from_regex(schema.get("pattern", "a*"),
                                                                                        fullmatch=True))
    if kind in ("integer", "number", None) and any(k in schema for k in ("minimum", "maximum", "type")):
        lo = max([schema[k] for k in ("minimum", "exclusiveMinimum") if k in schema], default=-60)
        hi = min([schema[k] for k in ("maximum", "exclusiveMaximum") if k in schema], default=60)
        assume(lo < hi)
        return draw(st.integers(int(lo) - 1, int(hi) + 1) | st.floats(lo, hi).map(lambda x: round(x, 3)))
    return draw(st.sampled_from([None, True, False, 0]))


def _dump(value, draw, ascii_only: bool) -> str:
    """``value`` as JSON text with random whitespace between tokens."""
    def ws():
        return draw(st.text(alphabet=WS, max_size=2))

    if isinstance(value, dict):
        inner = ",".join(f"{ws()}{json.dumps(k, ensure_ascii=ascii_only)}{ws()}:{ws()}{_dump(v, draw, ascii_only)}"
                         f"{ws()}" for k, v in value.items())
        return "{" + (inner or ws()) + "}"
    if isinstance(value, list):
        return "[" + (",".join(f"{ws()}{_dump(v, draw, ascii_only)}{ws()}" for v in value) or ws()) + "]"
    if isinstance(value, float) and draw(st.booleans()):
        return f"{value:e}" if float(f"{value:e}") == value else json.dumps(value)
    return json.dumps(value, ensure_ascii=ascii_only)


def _validator(schema):
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=_format_checker())


def _all_prefixes_ok(checker: JsonPrefixChecker, text: str) -> int | None:
    """The first rejected prefix length, or None."""
    return next((i for i in range(len(text) + 1) if not checker.prefix_ok(text[:i])), None)


# ---- properties -------------------------------------------------------------------------------
@PROPERTY
@given(SCHEMAS, st.data(), st.booleans())
def test_every_prefix_of_a_valid_document_is_accepted(schema, data, ascii_only):
    value = _instance(schema, data.draw)
    assume(_validator(schema).is_valid(value))
    text = data.draw(st.sampled_from(WS)) + _dump(value, data.draw, ascii_only)
    c = JsonSchema(schema, automaton=False)
    assert _all_prefixes_ok(c._checker, text) is None, (schema, text)
    assert c.complete_ok(text), (schema, text)
    raw = text.encode()
    assert all(c.prefix_ok(raw[:i]) for i in range(len(raw) + 1)), (schema, text)


@PROPERTY
@given(SCHEMAS, st.data())
def test_generation_layout_accepts_every_prefix_of_a_compact_document(schema, data):
    """The checker's generation layout (compact, canonical escapes) keeps every byte prefix of a valid
    document written as ``json.dumps(ensure_ascii=False)`` writes it, control characters included."""
    value = _instance(schema, data.draw)
    assume(_validator(schema).is_valid(value))
    raw = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    c = JsonSchema(schema, automaton=False)
    assert all(c.generation_prefix_ok(raw[:i]) for i in range(len(raw) + 1)), (schema, raw)


def test_unfinished_escape_needs_a_completion():
    """Regression (the 40-schema generation set ended ``{"name\\u002`` as a dead end): the checker
    cannot judge a character before its escape ends, so generation keeps an unfinished escape only
    where one of its completions is a valid prefix."""
    c = JsonSchema({"type": "object", "properties": {"name": {"type": "string"}, "path": {"type": "string"}},
                    "additionalProperties": False}, engine="checker")
    assert c.prefix_ok(b'{"name\\u002') and not c.generation_prefix_ok(b'{"name\\u002')
    assert not c.generation_prefix_ok(b'{"name\\') and not c.generation_prefix_ok(b'{"name\\u')
    for ok in (b'{"name":"a\\', b'{"name":"a\\u00', b'{"name":"a\\u001', b'{"name":"a\\u001f"', b'{"name":"a\\\\'):
        assert c.generation_prefix_ok(ok), ok
    assert not c.generation_prefix_ok(b'{"name":"a\\u00e')  # printable: written as itself, not escaped
    slash = JsonSchema({"type": "string", "enum": ["a/"]}, engine="checker")  # "\\/" completes; "\\u002f" not canonical
    assert slash.generation_prefix_ok(b'"a\\') and not slash.generation_prefix_ok(b'"a\\u')
    newline = JsonSchema({"type": "string", "enum": ["a\n"]}, engine="checker")  # "\\n" and "\\u000a" both do
    assert newline.generation_prefix_ok(b'"a\\u000') and not newline.generation_prefix_ok(b'"a\\u001')


@PROPERTY
@given(SCHEMAS, st.recursive(st.none() | st.booleans() | st.integers(-60, 60) | st.text("ab1", max_size=3),
                             lambda xs: st.lists(xs, max_size=3) | st.dictionaries(st.sampled_from(NAMES), xs,
                                                                                   max_size=3), max_leaves=5))
def test_complete_ok_is_jsonschema_and_prefixes_agree(schema, value):
    c = JsonSchema(schema, automaton=False)
    text = json.dumps(value)
    valid = _validator(schema).is_valid(value)
    assert c.complete_ok(text) == valid, (schema, text)
    if valid:
        assert _all_prefixes_ok(c._checker, text) is None, (schema, text)
    else:
        assert not c._checker.prefix_ok(text) or text[-1].isdigit(), (schema, text)  # a number may still grow


TREE = {"$defs": {"node": {"type": "object", "properties": {
    "v": {"type": "integer", "maximum": 9},
    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
    "required": ["v"], "additionalProperties": False}}, "$ref": "#/$defs/node"}


def _trees(depth=3):
    leaf = st.builds(lambda v: {"v": v}, st.integers(-20, 9))
    return st.recursive(leaf, lambda kids: st.builds(lambda v, k: {"v": v, "kids": k}, st.integers(-5, 9),
                                                     st.lists(kids, max_size=2)), max_leaves=6)


@settings(max_examples=60, deadline=None)
@given(_trees(), st.data())
def test_recursive_ref_documents(tree, data):
    text = _dump(tree, data.draw, False)
    c = JsonSchema(TREE, automaton=False)
    assert _all_prefixes_ok(c._checker, text) is None and c.complete_ok(text), text


# ---- early rejection, keyword by keyword -------------------------------------------------------
REJECTED = [
    ({"type": "integer", "maximum": 5}, "12"),
    ({"type": "integer", "minimum": 2}, "-"),
    ({"minimum": 2}, "-"),
    ({"maximum": 10}, "1e2"),
    ({"type": "number"}, "1e309"),
    ({"type": "string"}, "1"),
    ({"type": ["string", "null"]}, "t"),
    ({"maxItems": 1}, "[1,"),
    ({"type": "array", "maxItems": 0}, "[1"),
    ({"prefixItems": [{"type": "string"}]}, "[1"),
    ({"items": [{"type": "string"}], "additionalItems": False, "$schema": "http://json-schema.org/draft-07/schema#"},
     '["a",'),
    ({"uniqueItems": True}, "[1, 1.0,"),
    ({"type": "object", "properties": {"name": {}}, "additionalProperties": False}, '{"nx'),
    ({"type": "object", "patternProperties": {"^x": {}}, "additionalProperties": False}, '{"y'),
    ({"propertyNames": {"maxLength": 2}}, '{"abc'),
    ({"maxProperties": 1}, '{"a": 1, "'),
    ({"properties": {"a": {"type": "string"}}}, '{"a": 1'),
    ({"properties": {"a": False}}, '{"a"'),
    ({"required": ["a"]}, "{}"),
    ({"enum": ["red", "green"]}, '"b'),
    ({"enum": [[1, 2], {"k": 1}]}, "[2"),
    ({"enum": [{"k": 1}]}, '{"j'),
    ({"const": 10}, "2"),
    ({"type": "string", "maxLength": 2}, '"abc'),
    ({"type": "string", "maxLength": 1}, '"\\ud83d\\ude00x'),
    ({"type": "string", "pattern": "^[0-9]+$"}, '"12a'),
    ({"anyOf": [{"type": "string"}, {"type": "integer", "maximum": 3}]}, "7"),
    ({"allOf": [{"maximum": 10}, {"minimum": 20}]}, "1"),
    ({"oneOf": [{"const": 1}, {"const": 2}]}, "3"),
    ({"not": {"type": "null"}}, "null"),
    ({"if": {"type": "string"}, "then": {"maxLength": 1}, "else": {"type": "integer"}}, '"ab'),
    ({"items": {"multipleOf": 2, "type": "integer"}}, "[3]"),
    ({"format": "date"}, '"2020-13-01"'),
    ({"format": "date-time"}, '"2018-02-12T21:23:11.19B'),
    (TREE, '{"v": 1, "kids": [{"v": 12'),
    (TREE, '{"v": 1, "kids": [{"v": 1, "w'),
    (False, "1"),
    ({}, "01"),
    ({}, "[1 2"),
    ({}, '"\x01'),
    ({}, '"\\x'),
    ({}, '{"a": 1, "a"'),
    ({}, "N"),
    ({}, "1 2"),
]


@pytest.mark.parametrize("schema, text", REJECTED, ids=[t for _, t in REJECTED])
def test_early_rejection(schema, text):
    c = JsonSchema(schema, automaton=False)
    assert c._checker.prefix_ok(text[:-1]), "the prefix before the last character should still be alive"
    assert not c._checker.prefix_ok(text)
    assert not c._checker.prefix_ok(text + "1") and not c._checker.prefix_ok(text + " 1")  # dead stays dead


KEPT = [  # prefixes that look wrong but have valid completions
    ({"type": "integer", "maximum": 5}, "1", "1"),
    ({"type": "integer", "maximum": 5}, "10", "10e-1"),
    ({"type": "integer"}, "1.5", "1.5e1"),
    ({"maximum": 5}, "12", "12e-1"),
    ({"minimum": 100}, "1", "1e2"),
    ({"enum": [20]}, "2", "2e1"),
    ({"type": "string", "maxLength": 1}, '"\\ud83d', '"\\ud83d\\ude00"'),
    ({"type": "object", "properties": {"name": {}}, "additionalProperties": False}, '{"na', '{"name": 1}'),
    ({"anyOf": [{"type": "string"}, {"type": "integer", "maximum": 3}]}, '"x', '"x"'),
    ({}, "-0", "-0.0e+00"),
]


@pytest.mark.parametrize("schema, prefix, document", KEPT, ids=[p for _, p, _ in KEPT])
def test_prefixes_with_valid_completions_are_kept(schema, prefix, document):
    c = JsonSchema(schema, automaton=False)
    assert c._checker.prefix_ok(prefix) and c.complete_ok(document)
    assert _all_prefixes_ok(c._checker, document) is None


def test_min_integer_of_a_significand():
    assert min_integer("12") == 12 and min_integer("10") == 1 and min_integer("5") == 5
    assert min_integer("9" * 20) == 1  # 0.999...9 rounds to the double 1.0


# ---- the constraint ----------------------------------------------------------------------------
def test_engines_llguidance_by_default_outlines_only_when_asked():
    fast = JsonSchema({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert fast.engine == "llguidance" and fast.mask_grammar() and fast.automaton() is None  # no silent outlines
    outlines = JsonSchema({"type": "object", "properties": {"a": {"type": "integer"}}}, engine="outlines")
    assert outlines.engine == "outlines" and outlines.automaton() is not None and outlines.byte_dfa() is not None
    slow = JsonSchema({"type": "array", "maxItems": 2, "items": {"minimum": 2}}, engine="outlines")
    assert slow.automaton() is None and slow.byte_dfa() is None and "outlines-core" in slow.automaton_error
    assert slow.prefix_ok(b"[3, ") and not slow.prefix_ok(b"[3, 4,") and slow.complete_ok(b"[3,\n 4]")
    unique = JsonSchema({"type": "array", "uniqueItems": True})  # llguidance ignores uniqueItems: the checker
    assert unique.engine == "checker" and "uniqueItems" in unique.route and not unique.has_mask
    forced = JsonSchema({"type": "object", "properties": {"a": {"type": "integer"}}}, automaton=False)
    assert forced.engine == "checker" and forced.automaton() is None and forced.complete_ok('{ "a" :\t1 }')
    assert not forced.generation_prefix_ok('{ "a"') and forced.generation_prefix_ok('{"a":1')  # compact layout
    assert JsonSchema({"type": "object"}, automaton=False, whitespace="flexible").generation_prefix_ok('{ ')
    with pytest.raises(ValueError, match="llguidance cannot model"):
        JsonSchema({"type": "array", "uniqueItems": True}, engine="llguidance")


def test_schema_errors_name_keyword_and_path():
    with pytest.raises(ValueError, match=r"keyword 'minimum' at /properties/a/minimum"):
        JsonSchema({"properties": {"a": {"minimum": "x"}}})
    with pytest.raises(ValueError, match=r"keyword 'required' at /required"):
        JsonSchema({"required": "a"})


def test_strict_documents():
    c = JsonSchema({}, automaton=False)
    for text in ["NaN", "Infinity", "1e400", "1e-400", '{"a": 1, "a": 2}']:
        assert not c.complete_ok(text), text
    assert c.complete_ok("0e-400") and c.complete_ok('"\\ud800"')


def test_utf8_bytes_cut_inside_a_character():
    c = JsonSchema({"type": "string", "pattern": "^é+$"}, automaton=False)
    raw = '"éé"'.encode()
    assert all(c.prefix_ok(raw[:i]) for i in range(len(raw) + 1))
    assert not c.prefix_ok(b'"a')


# ---- JSON-Schema-Test-Suite (shipped in the jsonschema sdist; downloaded once) ------------------
def _suite():
    from decodekit.bench.json_schema_coverage import suite_groups

    groups, why = suite_groups()
    return groups, why


def test_json_schema_test_suite():
    groups, why = _suite()
    if groups is None:
        pytest.skip(why)
    from decodekit.bench.json_schema_coverage import judge_suite_group

    wrong = []
    for g in groups:
        if g["remote"]:
            continue
        result = judge_suite_group(g)
        assert result["accepted"], (g["file"], g["description"], result.get("error"))
        wrong += [(g["file"], g["description"], d) for d in result["wrong"]]
        assert not result["prefix_rejected"], (g["file"], g["description"], result["prefix_rejected"])
    assert not wrong, wrong[:5]


# ---- generation --------------------------------------------------------------------------------
def test_generation_with_a_schema_outlines_refuses():
    from decodekit.api import LLM

    schema = {"anyOf": [{"minimum": 2, "maximum": 40}, {"const": None}]}  # no "type": outlines-core refuses it
    constraint = JsonSchema(schema)
    assert constraint.automaton() is None
    llm = LLM(backend=MockBackend(vocab_size=len(string.ascii_lowercase + string.digits) + 8, seed=3))
    finished = 0
    for seed in range(8):
        c = llm.generate("a", strategy=Constrained(constraint), max_new_tokens=8, seed=seed)
        if c.finish_reason != "constraint_failed":  # a dead end ends so, never with invalid text
            assert constraint.complete_ok(c.text) and _validator(schema).is_valid(json.loads(c.text)), c.text
            finished += 1
    assert finished >= 2


def test_server_and_vllm_paths_refuse_what_needs_the_checker_clearly():
    from decodekit.servers.openai.errors import APIError
    from decodekit.servers.openai.strategies import _constrained

    from decodekit.integrations.vllm.strategies import structured_from_constraint

    with pytest.raises(APIError, match="without a mask engine") as e:
        _constrained(("json", {"uniqueItems": True}), {"sampler": "masked"})
    assert e.value.status == 400
    assert not _constrained(("json", {"uniqueItems": True}), {}).constraint.has_mask  # AWRS: served
    with pytest.raises(ValueError, match="transformers backend"):
        structured_from_constraint(JsonSchema({"uniqueItems": True}))
    assert structured_from_constraint(JsonSchema({"type": "integer"})).json_schema == {"type": "integer"}
