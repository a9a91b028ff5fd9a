"""What a prefix of a JSON number still allows: the values its completions can reach.

A prefix such as ``12`` can still become ``12.5``, ``125`` or ``12e-3``, so a bound such as
``maximum: 5`` decides nothing about it by itself; under ``type: integer`` it does (every integer
whose digits start ``12`` is at least 12). The sets here are over-approximations widened by float
rounding (``json`` parses ``1e-1`` to the double nearest 0.1): a check may keep a prefix that
no completion satisfies, never the reverse.

Number literals that overflow to infinity or underflow a non-zero literal to 0.0 are not valid
documents (``JsonSchema.complete_ok`` refuses them: the value would not be the one written), so
``1e309`` is dead at once.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import regex as re

_PARTS = re.compile(r"(-?)([0-9]*)(?:(\.)([0-9]*))?(?:([eE])([+-]?)([0-9]*))?")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
SLACK = Fraction(1, 2**50)  # relative float rounding, generously
MAX_FLOAT = Fraction(1.7976931348623157e308)
MAX_DIGITS = 30  # longer significands: skip the integer refinement (it loops over the digits)


def prefix_ok(text: str) -> bool:
    """Is ``text`` a prefix of a JSON number literal?"""
    return _NUMBER.fullmatch(text, partial=True) is not None


def complete(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None


class Reach(NamedTuple):
    """Values the completions of a number prefix can take: ``sign * m`` with ``m`` zero (when
    ``zero``) or in ``[lo, hi]`` (``hi`` None: unbounded; ``lo`` None: no non-zero value);
    ``int_lo``: the least non-zero integer magnitude reachable, when the prefix decides one."""

    sign: int
    zero: bool
    lo: Fraction | None
    hi: Fraction | None
    int_lo: Fraction | None
    digits: str  # significant digits so far when still in the significand (they lead every value), else ""


def reach(text: str) -> Reach:
    sign_text, int_digits, dot, frac, e, exp_sign, exp_digits = _PARTS.fullmatch(text).groups()
    sign = -1 if sign_text else 1
    if not e:
        return _significand_reach(sign, int_digits, frac or "")
    m = Fraction(f"{int_digits}.{frac or ''}0")
    if m == 0:
        return Reach(sign, True, None, None, None, "")
    power = int(exp_digits) if exp_digits else 0
    if exp_sign == "-":
        return _widened(sign, Fraction(0), m / 10**power)
    if exp_sign == "+" or exp_digits:
        return _widened(sign, m * 10**power, None)
    return _widened(sign, Fraction(0), None)


def _significand_reach(sign: int, int_digits: str, frac: str) -> Reach:
    digits = (int_digits + frac).lstrip("0")
    if not digits:  # "-", "0", "0.00": zero, or anything a later digit or exponent gives
        return Reach(sign, True, Fraction(0), None, Fraction(1), "")
    return Reach(sign, False, Fraction(0), None, min_integer(digits), digits)


def _widened(sign: int, lo: Fraction, hi: Fraction | None) -> Reach:
    lo = lo * (1 - SLACK)
    if lo > MAX_FLOAT:  # every completion overflows
        return Reach(sign, False, None, None, None, "")
    return Reach(sign, False, lo, None if hi is None else hi * (1 + SLACK), None, "")


def min_integer(digits: str) -> Fraction | None:
    """The least positive integer a double can take when its decimal significand starts with ``digits``."""
    if len(digits) > MAX_DIGITS:
        return None
    d = int(digits)
    for k in range(-len(digits), 1):
        low = Fraction(d) * Fraction(10) ** k * (1 - SLACK)
        high = Fraction(d + 1) * Fraction(10) ** k * (1 + SLACK)
        n = max(1, math.ceil(low))
        if n <= high:
            return Fraction(n)
    return Fraction(d)


def leads(digits: str, x: Fraction) -> bool:
    """Can a double with significand starting ``digits`` equal ``x > 0``? (within rounding)"""
    d = int(digits)
    k = math.floor(math.log10(float(x)) - math.log10(d)) if x > 0 else 0
    for j in (k - 1, k, k + 1):
        scale = Fraction(10) ** j
        if Fraction(d) * scale * (1 - SLACK) <= x <= Fraction(d + 1) * scale * (1 + SLACK):
            return True
    return False


def magnitude_range(r: Reach, integer: bool) -> tuple[Fraction, Fraction | None] | None:
    """The non-zero magnitudes ``[lo, hi]`` (``hi`` None: unbounded), or None when there are none."""
    if r.lo is None:
        return None
    lo = r.int_lo if integer and r.int_lo is not None else r.lo
    if r.hi is not None and lo > r.hi:
        return None
    return lo, r.hi


def within(r: Reach, integer: bool, low, high) -> bool:
    """Can a completion land in ``[low, high]`` (None: unbounded)? Exclusive bounds are passed as
    inclusive: a relaxation, the completed value is checked exactly."""
    low = None if low is None else Fraction(low)
    high = None if high is None else Fraction(high)
    if r.zero and (low is None or low <= 0) and (high is None or high >= 0):
        return True
    mags = magnitude_range(r, integer)
    if mags is None:
        return False
    lo, hi = mags
    if r.sign > 0:
        a, b = lo, hi
    else:
        a, b = (None if hi is None else -hi), -lo
    return (high is None or a is None or a <= high) and (low is None or b is None or b >= low)


def reaches(r: Reach, value) -> bool:
    """Can a completion equal the number ``value``?"""
    x = Fraction(value)
    if x == 0:
        return r.zero
    if (x > 0) != (r.sign > 0) or not within(r, False, x, x):
        return False
    return not r.digits or leads(r.digits, abs(x))
