"""Which engine masks a JSON schema by default: llguidance where it models the schema exactly, the
JSON prefix checker elsewhere.

The rule, by keywords and by what llguidance itself reports:

1. llguidance refuses the schema (an error) or warns that it ignores some of its keys
   (``Unimplemented keys``: ``uniqueItems``, ``not``, ``dependentSchemas``, ...): checker.
2. The schema uses a keyword in ``INEXACT_KEYWORDS`` anywhere: checker. This list was decided on
   one half of the MaskBench sample (the files at even positions in name order) by comparing
   llguidance's compact mask with ``jsonschema`` on every instance (an invalid instance the mask
   takes as complete, or a valid one, re-serialized in llguidance's canonical layout, that it
   refuses), and checked on the other half (``bench/json_schema_coverage.py`` reports both halves).
3. Otherwise llguidance.

The final word on every output stays ``jsonschema`` (``JsonSchema.complete_ok``), on both paths.
"""

from __future__ import annotations

# Keywords llguidance compiles without a warning but models inexactly: none found. On the dev half
# (212 files) llguidance took 170 schemas with no warning and agreed with jsonschema on all 505 of
# their instances (0 invalid taken as complete, 0 canonical valid refused) once the canonical layout
# followed ``allOf`` / the matching ``anyOf`` alternative; the other 42 went to the checker by rule 1.
# Held out (212 files): 172 taken, 499 instances, 0 disagreements; 40 to the checker. A keyword
# found inexact later goes here, with what went wrong.
INEXACT_KEYWORDS: dict[str, str] = {}

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_VALUE_KEYS = ("enum", "const", "default", "examples")


def keywords(schema) -> set[str]:
    """Every keyword used at a schema position in ``schema`` (property names and values aside)."""
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            found.add(key)
            if key in _VALUE_KEYS:
                continue
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, (dict, list)):
                stack.append(value)
    return found


def route(schema, whitespace: str | None = None) -> tuple[str, str | None, str]:
    """(engine, llguidance grammar or None, why) for ``schema`` under the default ``engine="auto"``."""
    from decodekit.constraints.guidance import grammar_problems, json_grammar

    inexact = sorted(keywords(schema) & INEXACT_KEYWORDS.keys())
    if inexact:
        return "checker", None, f"keywords llguidance models inexactly: {', '.join(inexact)}"
    try:
        grammar = (json_grammar(schema) if whitespace is None
                   else json_grammar(schema, compact=False, whitespace_pattern=None if whitespace == "flexible"
                                     else whitespace))
    except ValueError as e:
        return "checker", None, f"llguidance refuses the schema: {e}"
    problem = grammar_problems(grammar)
    if problem is not None:
        return "checker", None, f"llguidance: {problem}"
    return "llguidance", grammar, "llguidance models every keyword"


def canonical_json(doc, schema) -> str:
    """``doc`` in llguidance's generation layout: compact; properties in the schema's ``properties``
    order (through ``$ref`` / ``allOf``, and the ``anyOf`` / ``oneOf`` alternative ``doc`` is valid
    under), then the rest in their own order; numbers in plain decimal notation (no exponent, no
    ``-0``: llguidance's number ranges take no exponent), integral floats as integers."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    return _dump(_canonical(doc, schema, validator, 0))


def _dump(value) -> str:
    import json

    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + _dump(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        from decimal import Decimal

        text = format(Decimal(repr(value)), "f")
        return "0" if text in ("-0", "0") else text
    return json.dumps(value, ensure_ascii=False)


def _canonical(doc, sub, validator, depth: int):
    if isinstance(doc, float) and doc.is_integer():
        return int(doc)
    if not isinstance(doc, (list, dict)) or depth > 64:
        return doc
    subs = _subschemas(doc, sub, validator, depth)
    if isinstance(doc, list):
        items = [s.get("items") for s in subs if isinstance(s.get("items"), dict)]
        prefix = next((s.get("prefixItems") for s in subs if isinstance(s.get("prefixItems"), list)), [])
        return [_canonical(v, prefix[i] if i < len(prefix) else (items[0] if items else {}), validator, depth + 1)
                for i, v in enumerate(doc)]
    order: list[str] = []
    props: dict = {}
    for s in subs:
        for k, v in (s.get("properties") or {}).items() if isinstance(s.get("properties"), dict) else ():
            if k not in props:
                order.append(k)
                props[k] = v
    extra = next((s["additionalProperties"] for s in subs if isinstance(s.get("additionalProperties"), dict)), {})
    keys = [k for k in order if k in doc] + [k for k in doc if k not in props]
    return {k: _canonical(doc[k], props.get(k, extra), validator, depth + 1) for k in keys}


def _subschemas(doc, sub, validator, depth: int) -> list[dict]:
    """``sub`` and, depth first, the schemas it refers to or combines: ``$ref``, ``allOf``, and the
    first ``anyOf`` / ``oneOf`` alternative ``doc`` is valid under."""
    out: list[dict] = []

    def visit(s, level: int) -> None:
        if not isinstance(s, dict) or len(out) >= 64 or level > 32:
            return
        out.append(s)
        ref = s.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            visit(_resolve(validator.schema, ref), level + 1)
        for part in s.get("allOf", []) if isinstance(s.get("allOf"), list) else []:
            visit(part, level + 1)
        for key in ("anyOf", "oneOf"):
            alternatives = s.get(key) if isinstance(s.get(key), list) else []
            chosen = next((a for a in alternatives if _valid_under(validator, a, doc)), None)
            visit(chosen, level + 1)

    visit(sub, 0)
    return out


def _valid_under(validator, sub, doc) -> bool:
    try:
        return validator.evolve(schema=sub).is_valid(doc)
    except Exception:  # an unresolvable reference inside an alternative
        return False


def _resolve(root, ref: str):
    node = root
    for part in ref.lstrip("#").split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return {}
    return node
