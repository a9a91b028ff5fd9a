"""Checks of one alternative (a conjunction of ``Sub``s) against what a prefix has shown so far.

Each answers "can a completion still satisfy the conjunction's own keywords?" and may say yes
when unsure (the closed value is checked exactly later). Children: ``key_child`` / ``item_child``
give the subschemas the next object member / array item must satisfy, or None when the
conjunction allows no such member or item.
"""

from __future__ import annotations

from jsonschema._utils import equal

from decodekit.constraints.json_prefix import numbers
from decodekit.constraints.json_prefix.schema import Sub, full_search, kind_of, partial_search


def kind_ok(conj, kind: str) -> bool:
    for s in conj:
        if s.kinds is not None and kind not in s.kinds:
            return False
        if any(not any(kind_of(e) == kind for e in values) for values in s.enums):
            return False
    return True


def literal_ok(conj, value) -> bool:
    kind = kind_of(value)
    for s in conj:
        if s.kinds is not None and kind not in s.kinds:
            return False
        if any(not any(equal(e, value) for e in values) for values in s.enums):
            return False
    return True


def string_ok(conj, text: str) -> bool:
    """``text``: the decoded start of a string value."""
    for s in conj:
        kw = s.kw
        limit = kw.get("maxLength")
        if isinstance(limit, (int, float)) and len(text) > limit:
            return False
        if isinstance(kw.get("pattern"), str) and not partial_search(s.ctx.pattern(kw["pattern"]), text):
            return False
        shape = s.ctx.formats.get(kw.get("format"))
        if shape is not None and shape.fullmatch(text, partial=True) is None:
            return False
        if any(not any(isinstance(e, str) and e.startswith(text) for e in values) for values in s.enums):
            return False
    return True


def number_ok(conj, reach: numbers.Reach) -> bool:
    """Bounds of all the conjunction's members together (``allOf`` of two ranges may not meet), and enums."""
    low = high = None
    integer = False
    for s in conj:
        lo, hi = _bounds(s.kw)
        low = lo if low is None or (lo is not None and lo > low) else low
        high = hi if high is None or (hi is not None and hi < high) else high
        integer = integer or s.integer
        for values in s.enums:
            if not any(kind_of(e) == "number" and numbers.reaches(reach, e) for e in values):
                return False
    if low is None and high is None:
        return True
    if low is not None and high is not None and low > high:
        return False
    return numbers.within(reach, integer, low, high)


def _bounds(kw: dict):
    """(lowest, highest) allowed, exclusive bounds taken as inclusive (draft 4's boolean flags too)."""
    lows = [kw.get(k) for k in ("minimum", "exclusiveMinimum")]
    highs = [kw.get(k) for k in ("maximum", "exclusiveMaximum")]
    lows = [x for x in lows if isinstance(x, (int, float)) and not isinstance(x, bool)]
    highs = [x for x in highs if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return (max(lows) if lows else None), (min(highs) if highs else None)


# ---- objects ---------------------------------------------------------------------------------
def key_start_ok(conj, count: int) -> bool:
    """May one more member (the ``count + 1``-th) begin?"""
    for s in conj:
        limit = s.kw.get("maxProperties")
        if isinstance(limit, (int, float)) and count + 1 > limit:
            return False
    return True


def key_prefix_ok(conj, partial: str) -> bool:
    return all(_key_prefix_ok(s, partial) for s in conj)


def _key_prefix_ok(s: Sub, partial: str) -> bool:
    kw = s.kw
    if kw.get("additionalProperties") is False:
        named = any(name.startswith(partial) for name in _dict(kw.get("properties")))
        if not named and not any(partial_search(s.ctx.pattern(p), partial) for p in _dict(kw.get("patternProperties"))):
            return False
    if "propertyNames" in kw:
        alts = s.at(kw["propertyNames"]).expand()
        if not any(kind_ok(c, "string") and string_ok(c, partial) for c in alts):
            return False
    for values in s.enums:
        if not any(isinstance(e, dict) and any(k.startswith(partial) for k in e) for e in values):
            return False
    return True


def key_child(conj, key: str) -> tuple | None:
    """The Subs the value of member ``key`` must satisfy, or None when ``key`` is not allowed."""
    out: list[Sub] = []
    for s in conj:
        subs = _member_subs(s, key)
        if subs is None:
            return None
        out += subs
    return tuple(out)


def _member_subs(s: Sub, key: str) -> list | None:
    kw = s.kw
    props, patterns = _dict(kw.get("properties")), _dict(kw.get("patternProperties"))
    subs = [s.at(props[key])] if key in props else []
    subs += [s.at(v) for p, v in patterns.items() if full_search(s.ctx.pattern(p), key)]
    if not subs and "additionalProperties" in kw:
        subs.append(s.at(kw["additionalProperties"]))
    if any(x.schema is False for x in subs):
        return None
    if "propertyNames" in kw and not s.at(kw["propertyNames"]).valid(key):
        return None
    for values in s.enums:
        allowed = [e[key] for e in values if isinstance(e, dict) and key in e]
        if not allowed:
            return None
        subs.append(s.ctx.synthetic({"enum": allowed}))
    return subs


# ---- arrays ----------------------------------------------------------------------------------
def item_child(conj, index: int) -> tuple | None:
    """The Subs item ``index`` must satisfy, or None when the conjunction allows no such item."""
    out: list[Sub] = []
    for s in conj:
        subs = _item_subs(s, index)
        if subs is None:
            return None
        out += subs
    return tuple(out)


def _item_subs(s: Sub, index: int) -> list | None:
    kw = s.kw
    limit = kw.get("maxItems")
    if isinstance(limit, (int, float)) and index + 1 > limit:
        return None
    subs = []
    prefix, items = kw.get("prefixItems"), kw.get("items")
    if isinstance(prefix, list) and index < len(prefix):
        subs.append(s.at(prefix[index]))
    elif isinstance(items, list):  # draft 7 and older: the tuple form, then additionalItems
        if index < len(items):
            subs.append(s.at(items[index]))
        elif "additionalItems" in kw:
            subs.append(s.at(kw["additionalItems"]))
    elif "items" in kw:
        subs.append(s.at(items))
    if any(x.schema is False for x in subs):
        return None
    for values in s.enums:
        allowed = [e[index] for e in values if isinstance(e, list) and len(e) > index]
        if not allowed:
            return None
        subs.append(s.ctx.synthetic({"enum": allowed}))
    return subs


def unique_ok(conj, value, items) -> bool:
    if any(s.kw.get("uniqueItems") is True for s in conj):
        return not any(equal(value, x) for x in items)
    return True


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}
