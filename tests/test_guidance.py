"""llguidance as the mask engine: routing, the regression schema, greedy = argmax over the exact
allowed set (mock vocabulary, enumerated), matcher states under drafts and particle forks, bitmasks."""

from __future__ import annotations

import json

import pytest
import torch

from decodekit.api import LLM
from decodekit.backends.mock import MockBackend
from decodekit.constraints import Grammar, JsonSchema, OneOf, Predicate, Regex
from decodekit.constraints.guidance import ByteMatcher, GuidanceIndex, apply_bitmask, unpack_bitmask
from decodekit.constraints.json_route import canonical_json, keywords
from decodekit.strategies.constrained import Constrained

REGRESSION = {"properties": {"foo": {}, "bar": {}}, "patternProperties": {"^v": {}}, "additionalProperties": False}


def test_regression_schema_outlines_got_wrong():
    c = JsonSchema(REGRESSION)
    assert c.engine == "llguidance", c.route
    matcher = ByteMatcher(c.mask_grammar())
    assert matcher.accepts(b'{"bar":1}') == (9, True)
    assert not matcher.accepts(b'{"messageCode:" "bar"')[1]
    assert not matcher.accepts(b'{"x":1}')[1] and not c.complete_ok('{"x": 1}')
    for doc in ({"bar": 1}, {"v1": 2, "bar": 1}, {"foo": None, "vv": [1]}):  # validation: any order, any layout
        assert c.complete_ok(json.dumps(doc)) and c.complete_ok(json.dumps(doc, indent=2))
        assert matcher.accepts(canonical_json(doc, REGRESSION).encode())[1]  # generation: canonical layout
    assert canonical_json({"v1": 2, "bar": 1}, REGRESSION) == '{"bar":1,"v1":2}'


def test_routing_by_what_llguidance_reports():
    assert JsonSchema({"type": "integer", "minimum": 3}).engine == "llguidance"
    for schema in ({"not": {"type": "string"}}, {"type": "array", "uniqueItems": True},
                   {"type": "string", "pattern": "(?=a)b"}):
        c = JsonSchema(schema)
        assert c.engine == "checker" and c.route and c.mask_grammar() is None, schema
    assert JsonSchema({"type": "integer"}, engine="checker").engine == "checker"
    used = keywords({"properties": {"enum": {"type": "string"}}, "enum": [{"not": 1}]})
    assert used == {"properties", "type", "enum"}
    with pytest.raises(ValueError, match="engine must be one of"):
        Regex("a", engine="xgrammar")
    assert Regex("[a-c]+").engine == "llguidance" and Regex(r"(\w)\1").engine == "checker"
    assert OneOf(["yes", "no"]).engine == "llguidance" and Predicate(lambda s: True).mask_grammar() is None


def _allowed(constraint, tokenizer, text: str) -> list[int]:
    """The exact allowed set after ``text``, by checking every token of the vocabulary."""
    out = []
    for tok, piece in enumerate(tokenizer.pieces):
        if tok in tokenizer.eos_token_ids:
            if constraint.complete_ok(text):
                out.append(tok)
        elif constraint.prefix_ok(text + piece):
            out.append(tok)
    return out


@pytest.mark.parametrize("constraint", [Regex("(ab|cd)+e?"), Regex("[a-f]{2,5}"), OneOf(["bad", "bead", "cab"]),
                                        Grammar('start: "a" NUM ("," NUM)*\nNUM: /[0-9]+/')],
                         ids=["regex", "repeat", "one_of", "grammar"])
def test_greedy_is_argmax_over_the_exact_allowed_set(constraint):
    backend = MockBackend(vocab_size=40, seed=4, cache_tokens=512)
    tok = backend.tokenizer
    c = LLM(backend=backend).generate("ab", strategy=Constrained(constraint), max_new_tokens=12, temperature=0)
    prompt = tok.encode("ab")
    text, out = "", []
    for step in range(12):
        logits = backend.exact_logits(prompt + out)
        allowed = _allowed(constraint, tok, text)
        if step == 11 and constraint.complete_ok(text):  # the last token: EOS where the text is complete
            break
        if step == 11:  # else it must complete the text
            allowed = [t for t in allowed if t in tok.eos_token_ids or constraint.complete_ok(text + tok.pieces[t])]
        assert allowed
        best = max(allowed, key=lambda t: float(logits[t]))
        if best in tok.eos_token_ids:
            break
        out.append(best)
        text += tok.pieces[best]
    assert c.text == text and constraint.complete_ok(c.text), (c.text, text)
    assert c.stats.extra["checks_per_token"] <= 2  # the EOS decision, not a walk over the vocabulary


def _index(constraint, tokenizer) -> GuidanceIndex:
    index = constraint.index(tokenizer)
    assert isinstance(index, GuidanceIndex)
    return index


def test_rejected_drafts_leave_the_state_where_it_was():
    tok = MockBackend(vocab_size=16).tokenizer
    index = _index(Regex("abc[de]+"), tok)
    state = index.next(index.initial(), tok.encode("a")[0])
    before = index.allowed(state)
    kept, after = index.advance(state, tok.encode("bca"))
    assert kept == 2 and after.num_tokens == 3
    assert torch.equal(index.allowed(state), before) and state.num_tokens == 1
    assert index.next(state, tok.encode("c")[0]) is None  # refused: a dead end, the state untouched
    assert torch.equal(index.allowed(state), before)
    matcher = state.matcher.deep_copy()  # the matcher's own rollback verb, in place
    assert matcher.consume_tokens(tok.encode("bcd"))
    assert matcher.rollback(3)
    assert torch.equal(unpack_bitmask(_bits(index, matcher), index.vocab_size), before)


def _bits(index, matcher):
    from decodekit.constraints.guidance import MatcherState

    return index.bitmask(MatcherState(matcher))


def test_particle_copies_are_independent():
    tok = MockBackend(vocab_size=16).tokenizer
    index = _index(OneOf(["abc", "bcd", "bce"]), tok)
    root = index.initial()
    a, b = index.next(root, tok.encode("a")[0]), index.next(root, tok.encode("b")[0])
    assert index.allowed(root)[tok.encode("a")[0]] and index.allowed(root)[tok.encode("b")[0]]
    assert index.allowed(a).nonzero().flatten().tolist() == tok.encode("b")
    assert index.allowed(b).nonzero().flatten().tolist() == tok.encode("c")
    b2 = index.next(index.next(b, tok.encode("c")[0]), tok.encode("e")[0])
    assert b2.accepting() and not index.next(b, tok.encode("c")[0]).accepting()
    assert index.allowed(a).nonzero().flatten().tolist() == tok.encode("b")  # unchanged by b's path


def test_smc_on_the_mask_stays_valid_and_exact_weights():
    backend = MockBackend(vocab_size=16, seed=1, cache_tokens=2048)
    constraint = Regex("[a-d]{2}e?")
    c = LLM(backend=backend).generate("ab", strategy=Constrained(constraint, num_particles=4), max_new_tokens=5,
                                      seed=3)
    assert constraint.complete_ok(c.text)
    assert c.stats.extra["log_ml"] is not None and backend.cache.num_open_handles == 0
    for p in c.stats.extra["particles"]:
        assert p["log_weight"] is None or constraint.complete_ok(p["text"])


def test_bitmask_helpers():
    words = torch.tensor([0b101, -(2**31)], dtype=torch.int32)  # tokens 0, 2 and 63
    allowed = unpack_bitmask(words, 70)
    assert allowed.nonzero().flatten().tolist() == [0, 2, 63]
    logits = torch.zeros((2, 64))
    masked = apply_bitmask(logits, words.expand(2, 2))
    assert torch.isfinite(masked).sum(1).tolist() == [3, 3]


def test_several_eos_ids_end_a_constrained_answer():
    from decodekit.constraints.guidance import ll_tokenizer

    backend = MockBackend(vocab_size=16, seed=2, cache_tokens=512)
    tok = backend.tokenizer
    tok.eos_token_ids = frozenset([0, 15])  # "o" is a second EOS
    constraint = Regex("[a-c]{3}")
    assert ll_tokenizer(tok).eos_tokens == [0, 15]
    strategy = Constrained(constraint)
    c = LLM(backend=backend).generate("ab", strategy=strategy, max_new_tokens=8, temperature=0)
    assert constraint.complete_ok(c.text) and len(c.text) == 3 and c.finish_reason == "stop"
    st_mask = strategy._exact_mask  # the mask after a complete text allows every EOS id
    from decodekit.constraints.base import TokenChecker
    from decodekit.strategies.constrained import ConstrainedState, Particle

    index = constraint.index(tok)
    track = Particle(None, [], b"abc", fsa_state=index.advance(index.initial(), tok.encode("abc"))[1])
    state = ConstrainedState(TokenChecker(constraint, tok), index, track)
    allowed = st_mask(state, track, torch.zeros(16))
    assert allowed[0] and allowed[15] and int(allowed.sum()) == 2


def test_json_compact_layout_on_both_paths():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    mask = ByteMatcher(JsonSchema(schema).mask_grammar())
    assert mask.accepts(b'{"a":1,"b":"x y"}')[1] and not mask.accepts(b'{"a": 1}')[1]
    loose = ByteMatcher(JsonSchema(schema, whitespace="flexible").mask_grammar())
    assert loose.accepts(b'{"a": 1, "b": "x"}')[1]
    checker = JsonSchema(schema, engine="checker")
    assert checker.generation_prefix_ok('{"a":1,"b":"x y') and not checker.generation_prefix_ok('{"a": 1')
    assert checker.prefix_ok('{"a": 1')  # validation stays layout-free


def test_json_numbers_are_written_in_plain_decimal():
    from decodekit.constraints.tokens import token_bytes

    backend = MockBackend(vocab_size=50, seed=5, cache_tokens=2048)
    tok = backend.tokenizer
    pieces = token_bytes(tok)
    c = JsonSchema({"type": "number"})
    ids = torch.arange(50)
    kept = set(c.mask_filter(b"12", ids, pieces).tolist())
    e, big_e = tok.encode("e")[0], tok.encode("E")[0]
    assert e not in kept and big_e not in kept and len(kept) == 48
    assert set(c.mask_filter(b'"1', ids, pieces).tolist()) == set(range(50))  # in a string: anything
    llm = LLM(backend=backend)
    for seed in range(6):
        out = llm.generate("1", strategy=Constrained(c), max_new_tokens=8, seed=seed, temperature=1.5)
        assert out.finish_reason != "constraint_failed" and "e" not in out.text.lower(), out.text
        assert c.complete_ok(out.text)


# ---- masks filled beside the forward ---------------------------------------------------------------
def test_work_beside_the_forward_runs_on_another_thread_during_it():
    """A task queued from ``plan`` runs while the forward runs (each waits for the other to have started:
    serial execution would time out) and is done before ``update``."""
    import threading

    from decodekit.strategies.sample import Sample

    started, done, seen = threading.Event(), threading.Event(), {}

    class Waiting(MockBackend):
        def forward(self, handles, new_ids, num_logits):
            if seen.get("queued"):
                started.set()
                seen["overlapped"] = done.wait(5.0)
            return super().forward(handles, new_ids, num_logits)

    class Queueing(Sample):
        def plan(self, ctx, seqs):
            rows = super().plan(ctx, seqs)
            if not seen.get("queued"):
                seen["queued"] = True

                def task():
                    seen["thread"] = threading.get_ident()
                    if started.wait(5.0):
                        done.set()

                ctx.beside_forward(task)
            return rows

        def update(self, ctx, seqs, rows):
            if "queued" in seen:
                seen.setdefault("done_before_update", done.is_set())
            return super().update(ctx, seqs, rows)

    llm = LLM(backend=Waiting(vocab_size=16, seed=0))
    llm.engine.overlap = True  # the default where the forward leaves a core free (engine.overlap_default)
    out = llm.generate("abc", strategy=Queueing(), max_new_tokens=4, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 4
    assert seen["overlapped"] and seen["done_before_update"] and seen["thread"] != threading.get_ident()
    assert llm.engine.stats()["beside_wait_s"] >= 0.0


@pytest.mark.parametrize("particles", [1, 3])
def test_masks_filled_beside_the_forward_change_nothing(particles, monkeypatch):
    """Greedy and seeded outputs are the same with the masks filled beside the forward or by each draw;
    with the overlap on, the draws find them filled (llguidance's one-state mask is computed only for the
    first token, which comes from the prefill's logits without a plan)."""
    calls = {"n": 0}
    single = GuidanceIndex.bitmask

    def counted(self, state):
        calls["n"] += 1
        return single(self, state)

    monkeypatch.setattr(GuidanceIndex, "bitmask", counted)
    prompts = ["ab", "cab", "bad", "c"]
    outs = {}
    for overlap in (True, False):
        llm = LLM(backend=MockBackend(vocab_size=16, seed=0, cache_tokens=4096))
        llm.engine.overlap = overlap
        calls["n"] = 0
        runs = [llm.generate(prompts, strategy=Constrained(Regex("(ab|c)[a-f]{3,8}"), num_particles=particles),
                             max_new_tokens=12, **sampling)
                for sampling in (dict(temperature=0), dict(temperature=1.0, seed=4))]
        outs[overlap] = ([[c.token_ids for c in run] for run in runs], calls["n"],
                         sum(c.stats.extra["token_draws"] for run in runs for c in run))
    assert outs[True][0] == outs[False][0]
    assert all(Regex("(ab|c)[a-f]{3,8}").complete_ok(t) for run in outs[True][0] for t in
               [MockBackend(vocab_size=16, seed=0).tokenizer.decode(ids) for ids in run])
    on_calls, off_calls, draws = outs[True][1], outs[False][1], outs[False][2]
    print("masks computed by draws: overlap on", on_calls, "off", off_calls, "draws", draws)
    assert off_calls > 2 * len(prompts) and draws > 0  # the draws computed their masks themselves
    assert on_calls <= (2 * len(prompts) if particles == 1 else 0)  # only first tokens from the prefill


def test_prefetched_masks_equal_the_masks_a_draw_computes():
    backend = MockBackend(vocab_size=16, seed=0)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for constraint in (Regex("(ab|c)[a-f]{3,8}"), JsonSchema(schema)):
        index = constraint.index(backend.tokenizer)
        fresh, states, state = GuidanceIndex(constraint.mask_grammar(), backend.tokenizer), [], index.initial()
        for _ in range(6):
            states.append(state)
            ids = fresh.allowed_ids(state)
            if not ids.numel():
                break
            state = index.next(state, int(ids[0]))
        clones = [type(s)(s.matcher.deep_copy()) for s in states]
        index.prefetch(clones + clones[:1])  # a state listed twice is filled once
        for clone, state in zip(clones, states):
            assert clone._ids is not None and torch.equal(clone._ids, fresh.allowed_ids(state))


def test_mask_never_repeats_a_member_name():
    """llguidance lets a name repeat where other properties are allowed; strict JSON refuses the
    document only once it closes (a dead end: SmolLM2 wrote ``{"lease_id":null,...,"lease_id":``). The
    mask filter drops the tokens that would close a repeated name, in the object open at the end only."""
    c = JsonSchema({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "object"}}})
    assert c.engine == "llguidance"
    pieces = [b'a"', b'b"', b'c"', b"a", b'a":', b'x"', None]
    ids = torch.arange(len(pieces))
    kept = c.mask_filter(b'{"a":1,"b":{"x":2,"', ids, pieces).tolist()
    assert kept == [0, 1, 2, 3, 4, 6]  # only "x" repeats inside the inner object ("a", "b": the outer one)
    assert c.mask_filter(b'{"a":1,"', ids, pieces).tolist() == [1, 2, 3, 5, 6]
    assert c.mask_filter(b'{"a":"x', ids, pieces).tolist() == list(range(len(pieces)))  # a value string
    quoted = [b'"b"', b'"', b'b"', b'"c"']  # an escape under way (token by token) and names with one in them
    assert c.mask_filter(b'{"a\\"b":1,"a\\', torch.arange(4), quoted).tolist() == [1, 2, 3]  # '"b"' closes a\"b
    assert c.mask_filter(b'{"a\\"b":1,"a\\"', torch.arange(4), quoted).tolist() == [0, 1, 3]  # 'b"' does
    assert c.mask_filter(b'{"\xc3\xa9":1,"', torch.arange(2), [b'\xc3\xa9"', b'e"']).tolist() == [1]  # "é"
    assert not c.complete_ok('{"a":1,"a":2}')  # why: strict JSON refuses the repeat


def test_name_filter_keeps_every_canonical_document():
    """No prefix of a document without repeated names (``json.dumps`` of dicts, escapes included) has its
    next bytes dropped."""
    from decodekit.constraints.json_keys import NameGuard, repeats_name

    docs = [{"a": 1, "b": {"a": [{"a": 2, "b": 3}], "c\"d": "x\\y"}, "ab": [], "é": {"": None}},
            [{"k": 1}, {"k": 2}], {"a\\": {"a": {"a": 1}}}]
    for doc in docs:
        raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        guard = NameGuard()
        for i in range(len(raw)):
            state = guard.state(raw[:i])
            assert not any(repeats_name(state, raw[i:i + k]) for k in (1, 2, 3)), (raw, i)
