"""Soundness as a property: for generated schemas and documents, the default engine's decisions
agree with ``jsonschema`` on every complete document (any layout, for validation; the canonical
layout, for the generation mask), and a valid document is never refused on the way (every prefix
of its canonical form is taken by llguidance's mask, every prefix of any layout by the checker)."""

from __future__ import annotations

import json

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decodekit.constraints import JsonSchema
from decodekit.constraints.guidance import ByteMatcher
from decodekit.constraints.json_route import canonical_json

NAMES = st.sampled_from(["a", "b", "name", "x y", "é"])
TEXT = st.text(alphabet='ab cé"\\/', max_size=5)
FLOATS = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-50, 50) | FLOATS | TEXT,
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(NAMES, c, max_size=3), max_leaves=8)


def _leaf():
    string = st.fixed_dictionaries({"type": st.just("string")},
                                   optional={"minLength": st.integers(0, 2), "maxLength": st.integers(2, 5)})
    integer = st.fixed_dictionaries({"type": st.just("integer")},
                                    optional={"minimum": st.integers(-10, 0), "maximum": st.integers(0, 30)})
    number = st.fixed_dictionaries({"type": st.just("number")},
                                   optional={"minimum": st.sampled_from([-1.5, 0, 2]),
                                             "exclusiveMaximum": st.sampled_from([10, 99.5])})
    enum = st.fixed_dictionaries({"enum": st.lists(st.none() | st.integers(0, 3) | TEXT, min_size=1, max_size=3,
                                                   unique_by=json.dumps)})
    simple = st.sampled_from([{"type": "boolean"}, {"type": "null"}, {}])
    return string | integer | number | enum | simple


def _compound(children):
    obj = st.builds(lambda props, req, extra: {"type": "object", "properties": props,
                                               "required": sorted(set(req) & set(props)),
                                               "additionalProperties": extra},
                    st.dictionaries(NAMES, children, max_size=3), st.lists(NAMES, max_size=3), st.booleans())
    arr = st.builds(lambda items, lo, hi: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + hi},
                    children, st.integers(0, 1), st.integers(0, 3))
    any_of = st.lists(children, min_size=2, max_size=2).map(lambda alts: {"anyOf": alts})
    return obj | arr | any_of


SCHEMAS = st.recursive(_leaf(), _compound, max_leaves=5)


@st.composite
def instance_of(draw, schema):
    """A document shaped by ``schema`` (often valid, sometimes not: bounds are not respected exactly)."""
    if "enum" in schema:
        return draw(st.sampled_from(schema["enum"]))
    if "anyOf" in schema:
        return draw(instance_of(draw(st.sampled_from(schema["anyOf"]))))
    kind = schema.get("type")
    if kind == "object":
        props = schema["properties"]
        keys = [k for k in props if k in schema["required"] or draw(st.booleans())]
        doc = {k: draw(instance_of(props[k])) for k in draw(st.permutations(keys))}
        if schema["additionalProperties"] and draw(st.booleans()):
            doc.setdefault("zz", draw(VALUES))
        return doc
    if kind == "array":
        return draw(st.lists(instance_of(schema["items"]), min_size=schema["minItems"], max_size=schema["maxItems"]))
    if kind == "string":
        return draw(st.text(alphabet='ab cé"\\', min_size=schema.get("minLength", 0), max_size=schema.get(
            "maxLength", 5)))
    if kind == "integer":
        return draw(st.integers(schema.get("minimum", -20), schema.get("maximum", 40)))
    if kind == "number":
        return draw(st.floats(schema.get("minimum", -100), 100, allow_nan=False) | st.integers(-3, 12))
    return draw(VALUES)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(schema=SCHEMAS, data=st.data())
def test_default_engine_agrees_with_jsonschema(schema, data):
    constraint = JsonSchema(schema)
    validator = jsonschema.validators.validator_for(schema)(schema)
    for doc in (data.draw(instance_of(schema)), data.draw(VALUES)):
        valid = validator.is_valid(doc)
        for text in (json.dumps(doc, ensure_ascii=False), json.dumps(doc, indent=2)):  # validation: any layout
            assert constraint.complete_ok(text) == valid, (schema, text)
        if constraint.engine == "llguidance":
            canonical = canonical_json(doc, schema).encode()
            taken, complete = ByteMatcher(constraint.mask_grammar()).accepts(canonical)
            assert complete == valid, (schema, canonical, taken)  # the mask alone agrees, both ways
            assert (complete and constraint.complete_ok(canonical)) == valid
        elif valid:
            raw = json.dumps(doc).encode()
            assert all(constraint.prefix_ok(raw[:i]) for i in range(len(raw) + 1)), (schema, raw)


def test_regression_schema_soundness():
    schema = {"properties": {"foo": {}, "bar": {}}, "patternProperties": {"^v": {}}, "additionalProperties": False}
    constraint = JsonSchema(schema)
    matcher = ByteMatcher(constraint.mask_grammar())
    for doc, valid in (({"bar": 1}, True), ({"foo": [1], "v": {}}, True), ({"w": 1}, False), ({}, True)):
        canonical = canonical_json(doc, schema).encode()
        assert matcher.accepts(canonical)[1] == valid == constraint.complete_ok(json.dumps(doc))
        if valid:
            assert matcher.accepts(canonical[:-1])[0] == len(canonical) - 1  # its prefixes too
