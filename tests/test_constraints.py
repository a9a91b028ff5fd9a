"""Constraint kinds, token byte strings, the exact automaton mask, MaskBench, and real-model runs."""

from __future__ import annotations

import csv
import json
import os
import random

import pytest
import torch
from decodekit.bench.common import DATA  # ../shared/data, or $DECODEKIT_DATA
from decodekit.bench.constraints import ARITH  # the arithmetic grammar the benchmark uses

from decodekit.api import LLM
from decodekit.backends.mock import MockBackend
from decodekit.constraints import Grammar, JsonSchema, OneOf, Predicate, Regex, TokenChecker, token_bytes
from decodekit.constraints.awrs import check_all
from decodekit.strategies.constrained import Constrained


def test_regex_partial_and_non_regular():
    r = Regex(r"(\w)\1{2}-\d+")  # a back-reference: not a regular language
    assert r.prefix_ok("aa") and r.prefix_ok("aaa-") and not r.prefix_ok("ab")
    assert r.complete_ok("bbb-12") and not r.complete_ok("bbb-")
    # a token may end inside a UTF-8 character: judged on the complete characters
    e = Regex("é+")
    assert e.prefix_ok("é".encode() + "é".encode()[:1]) and not e.prefix_ok(b"\xff")
    with pytest.raises(ValueError, match="does not compile"):
        Regex("(unclosed")


def test_json_schema_inputs_and_errors():
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    for form in (schema, json.dumps(schema)):
        c = JsonSchema(form)
        assert c.prefix_ok('{"na') and c.prefix_ok('{"x') and not c.prefix_ok('[')  # exact: extra keys allowed
        assert c.complete_ok('{"name": "a", "age": 3}') and not c.complete_ok('{"name": "a"}')
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str

    assert JsonSchema(Person).complete_ok('{"name": "x"}')
    with pytest.raises(ValueError, match="invalid JSON schema"):
        JsonSchema({"type": "no-such-type"})
    with pytest.raises(ValueError, match="not valid JSON"):
        JsonSchema("{not json")
    # a keyword the regex cannot express is still enforced at the end
    uniq = JsonSchema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True})
    assert uniq.prefix_ok("[1,1") and not uniq.complete_ok("[1,1]") and uniq.complete_ok("[1,2]")


def test_grammar_prefix_and_complete():
    g = Grammar(ARITH)
    for text, pre, full in [("", True, False), ("12", True, True), ("12.", True, False), ("(1+2)*3", True, True),
                            ("12 + )", False, False), ("a", False, False), ("1 2", False, False)]:
        assert (g.prefix_ok(text), g.complete_ok(text)) == (pre, full), text
    with pytest.raises(ValueError, match="grammar"):
        Grammar("start: undefined_rule")


def test_one_of_and_predicate():
    c = OneOf(["yes", "no"])
    assert c.prefix_ok("ye") and not c.prefix_ok("yo") and c.complete_ok("no") and not c.complete_ok("n")
    p = Predicate(lambda s: s.isdigit() or s == "", lambda s: len(s) == 3)
    assert p.prefix_ok("12") and not p.prefix_ok("1a") and p.complete_ok("123") and not p.complete_ok("12")
    with pytest.raises(ValueError, match="options"):
        OneOf("yes")


def test_token_checker_eos_and_specials():
    backend = MockBackend(vocab_size=8)
    checker = TokenChecker(Regex("ab?"), backend.tokenizer)
    accept = checker.accept_fn(b"a")
    assert accept(2) and not accept(1) and accept(0)  # "b" ok, "a" not, EOS since "a" is complete
    assert not checker.accept_fn(b"")(0)  # EOS only where complete
    assert checker.num_checks == 4
    assert token_bytes(backend.tokenizer)[0] is None and token_bytes(backend.tokenizer)[1] == b"a"


def test_automaton_mask_equals_checking_every_token():
    backend = MockBackend(vocab_size=30)
    c = Regex(r"[a-c]+0?[12]")
    index = c.index(backend.tokenizer)
    assert index is not None
    checker = TokenChecker(c, backend.tokenizer)
    state, text = index.initial(), b""
    for token in backend.tokenizer.encode("ab02"):
        mask = index.allowed(state)
        full = check_all(logp=torch.zeros(30), accept=checker.accept_fn(text))
        full[0] = False  # EOS is decided by complete_ok, outside the index
        assert torch.equal(mask, full), text
        state, text = index.next(state, token), text + token_bytes(backend.tokenizer)[token]
    assert Regex(r"(?<=a)b").index(backend.tokenizer) is None  # look-behind: check path only


def test_maskbench_accepts_valid_rejects_invalid():
    folder = DATA / "jsonschemabench" / "maskbench"
    if not folder.exists():
        pytest.skip(f"MaskBench data not found at {folder}")
    files = sorted(folder.glob("*.json"))
    supported = wrong = 0
    for f in files:
        d = json.loads(f.read_text())
        try:
            c = JsonSchema(d["schema"])
        except ValueError:
            continue
        supported += 1
        for case in d["tests"]:
            text = json.dumps(case["data"])
            got = c.valid(text) if case["valid"] else c.complete_ok(text)
            wrong += got != case["valid"]
    assert wrong == 0
    assert supported / len(files) > 0.7  # unsupported share (outlines-core limits): about 23%


def _pattern_rows(k: int) -> list[str]:
    path = DATA / "pattern_matching" / "patterns.csv"
    if not path.exists():
        pytest.skip(f"pattern data not found at {path}")
    rows = [r["regex"] for r in csv.DictReader(path.open())]
    return random.Random(0).sample(rows, k)


@pytest.mark.real
def test_token_bytes_match_real_tokenizers(smollm, gemma):
    rng = random.Random(0)
    for backend in (smollm, gemma):
        table = token_bytes(backend.tokenizer)
        assert table is token_bytes(backend.tokenizer)  # built once
        for _ in range(200):
            ids = [i for i in (rng.randrange(len(table)) for _ in range(6)) if table[i] is not None]
            assert b"".join(table[i] for i in ids).decode("utf-8", "replace") == backend.tokenizer.decode(ids)
        ids = backend.tokenizer.encode("  hi é\n{")
        assert b"".join(table[i] or b"" for i in ids).endswith(" hi é\n{".encode())
    gemma_table = token_bytes(gemma.tokenizer)
    assert gemma_table[gemma.tokenizer.hf.convert_tokens_to_ids("<0x0A>")] == b"\n"


@pytest.mark.real
def test_smollm_json_regex_grammar(smollm):
    llm = LLM(backend=smollm)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "year": {"type": "integer"}}, "required": ["city", "year"]}
    c = llm.generate([{"role": "user", "content": "Give a city and a year as JSON."}],
                     strategy=Constrained(JsonSchema(schema)), max_new_tokens=30, seed=0)
    assert c.finish_reason in ("stop", "length") and JsonSchema(schema).complete_ok(c.text), c.text
    assert c.stats.extra["checks_per_token"] < 20
    date = Regex(r"\d{4}-\d{2}-\d{2}")
    for strategy in (Constrained(date), Constrained(date, num_particles=3)):
        c = llm.generate("The date today is", strategy=strategy, max_new_tokens=14, seed=1)
        assert date.complete_ok(c.text) and c.finish_reason == "stop", (c.text, c.finish_reason)
    c = llm.generate("An arithmetic expression:", strategy=Constrained(Grammar(ARITH)), max_new_tokens=8, seed=2)
    assert c.finish_reason == "constraint_failed" or Grammar(ARITH).complete_ok(c.text), c.text
    assert smollm.cache.num_open_handles == 0


@pytest.mark.real
def test_smollm_pattern_matching_outputs_match(smollm):
    llm = LLM(backend=smollm)
    for pattern in _pattern_rows(2):
        r = Regex(pattern, automaton=False)
        c = llm.generate(f"Write a string matching the regex {pattern}\n", strategy=Constrained(r),
                         max_new_tokens=10, seed=0)
        assert c.finish_reason == "constraint_failed" or r.complete_ok(c.text), (pattern, c.text)
    assert smollm.cache.num_open_handles == 0


# The full size (20 patterns, 20 JSONSchemaBench schemas) with DECODEKIT_CONSTRAINTS_FULL=1 (~3 minutes
# on a quiet 2-core machine); the default run keeps the smaller real-model checks above.
CONSTRAINTS_FULL = os.environ.get("DECODEKIT_CONSTRAINTS_FULL") == "1"


@pytest.mark.real
@pytest.mark.skipif(not CONSTRAINTS_FULL, reason="full size: set DECODEKIT_CONSTRAINTS_FULL=1")
def test_smollm_full_size_patterns_and_schemas(smollm):
    """Every output returned as text satisfies its constraint; nearly all finish within the limit (measured
    2026-11-28: 37 of 40; a \\w+ pattern and two large schemas were still open at 24 / 96 tokens and came
    back as constraint_failed, never as invalid text)."""
    from decodekit.bench.constraints import json_task

    llm = LLM(backend=smollm)
    runs = [(f"Write a string matching the regex {p}\n", Regex(p, automaton=False), 24, p) for p in _pattern_rows(20)]
    runs += [(prompt, c, 96, name) for prompt, c, name in json_task(20)]
    assert len(runs) == 40
    unfinished = []
    for i, (prompt, constraint, limit, name) in enumerate(runs):
        c = llm.generate(prompt, strategy=Constrained(constraint), max_new_tokens=limit, seed=i)
        if c.finish_reason == "constraint_failed":
            unfinished.append(name)
            continue
        assert constraint.complete_ok(c.text), (name, c.text)
    assert len(unfinished) <= 4, unfinished
    assert smollm.cache.num_open_handles == 0
