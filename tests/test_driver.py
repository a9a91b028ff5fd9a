"""Events are never lost: streams, ``generate`` and ``rollout`` interleaved on one ``LLM`` (from one
thread and from several) each get every event of their own requests, and each output equals the
same call run alone (greedy and seeded)."""

from __future__ import annotations

import threading

import pytest
from conftest import assert_caches_clean

from decodekit import LLM
from decodekit.backends.mock import MockBackend
from decodekit.driver import Driver, EngineProtocol, coalesce
from decodekit.engine import Engine, StepError
from decodekit.integrations.vllm.engine import VLLMEngine
from decodekit.rollout.tree import TreeRollout
from decodekit.types import SamplingParams, TokenEvent

SAMPLING = [dict(temperature=0, max_new_tokens=16, ignore_eos=True),
            dict(temperature=0.9, max_new_tokens=16, seed=5, ignore_eos=True)]


def _llm():
    return LLM(backend=MockBackend(vocab_size=16, seed=0, cache_tokens=2048))


def _text(events) -> tuple[str, tuple[int, ...], str | None]:
    return "".join(e.text for e in events), tuple(t for e in events for t in e.token_ids), events[-1].finish_reason


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("between", ["stream", "generate", "rollout"])
def test_a_stream_gets_every_event_while_others_drive(sampling, between):
    alone = _llm().generate("abc", **sampling)
    llm = _llm()
    s1 = llm.stream("abc", **sampling)
    first = [next(s1)]
    if between == "stream":
        other = list(llm.stream("hello", **sampling))
        assert _text(other)[0] == _llm().generate("hello", **sampling).text
    elif between == "generate":
        assert llm.generate("hello", **sampling).text == _llm().generate("hello", **sampling).text
    else:
        tree = TreeRollout(segment_len=4, max_width=4, first_split=2)
        got = llm.rollout("hello", tree=tree, max_new_tokens=12, seed=2)
        assert got.texts == _llm().rollout("hello", tree=tree, max_new_tokens=12, seed=2).texts
    rest = list(s1)
    text, ids, reason = _text(first + rest)
    assert (text, ids, reason) == (alone.text, alone.token_ids, alone.finish_reason)
    assert_caches_clean(llm.backend)


def test_two_open_streams_read_alternately():
    llm = _llm()
    params = SAMPLING[1]
    a, b = llm.stream("abc", **params), llm.stream("gonk", **params)
    got = {"a": [], "b": []}
    for name, stream in [("a", a), ("b", b)] * 40:
        event = next(stream, None)
        if event is not None:
            got[name].append(event)
    assert _text(got["a"])[0] == _llm().generate("abc", **params).text
    assert _text(got["b"])[0] == _llm().generate("gonk", **params).text
    assert got["a"][-1].finish_reason == got["b"][-1].finish_reason == "length"


def test_threads_share_one_llm():
    llm = _llm()
    prompts = ["abc", "hello", "gonk", "needle", "abcabc", "hi"]
    want = {p: _llm().generate(p, **SAMPLING[1]).text for p in prompts}
    got, errors = {}, []

    def work(p):
        try:
            if len(p) % 2:
                got[p] = llm.generate(p, **SAMPLING[1]).text
            else:
                got[p] = _text(list(llm.stream(p, **SAMPLING[1])))[0]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == want
    assert_caches_clean(llm.backend)


def test_an_unread_stream_is_coalesced_not_lost():
    llm = _llm()
    llm.driver.max_buffered = 3
    idle = llm.stream("abc", n=2, **SAMPLING[1])
    first = next(idle)  # started, then left unread while another call drives the engine to its end
    llm.generate(["hello", "gonk"], max_new_tokens=40, ignore_eos=True)
    inbox = llm.driver._inboxes[first.request_id]
    assert len(inbox.events) <= 3
    events = [first, *idle]
    alone = _llm().generate("abc", n=2, **SAMPLING[1])
    for choice in alone.choices:
        mine = [e for e in events if e.index == choice.index]
        assert "".join(e.text for e in mine) == choice.text and mine[-1].finish_reason == "length"
        assert tuple(t for e in mine for t in e.token_ids) == choice.token_ids


def test_coalesce_merges_per_choice_in_order():
    events = [TokenEvent("r", 0, (1,), "a"), TokenEvent("r", 1, (2,), "b"), TokenEvent("r", 0, (3,), "c", "stop")]
    merged = list(coalesce(events))
    assert [(e.index, e.token_ids, e.text, e.finish_reason) for e in merged] == [(0, (1, 3), "ac", "stop"),
                                                                                  (1, (2,), "b", None)]


def test_a_failing_stream_does_not_stop_another(exploding):
    llm = _llm()
    good = llm.stream("abc", **SAMPLING[0])
    next(good)
    with pytest.raises(StepError):
        list(llm.stream("hello", exploding, max_new_tokens=4))
    assert _text(list(good))[2] == "length"
    assert_caches_clean(llm.backend)


def test_engines_implement_the_protocol():
    assert isinstance(Engine(MockBackend(cache_tokens=64)), EngineProtocol)
    for name in ("add_request", "step", "abort", "pop_completion", "get_request", "has_unfinished", "stats",
                 "detach", "serve_mode"):
        assert callable(getattr(VLLMEngine, name)), name
    assert VLLMEngine.token_level is False and Engine.token_level is True
    with pytest.raises(ValueError, match="max_buffered"):
        Driver(Engine(MockBackend(cache_tokens=64)), max_buffered=0)


def test_events_of_another_router_reach_it_whoever_steps():
    """The server's worker routes its own requests' events: a Python call stepping the same engine
    hands them over (``Driver.foreign``) instead of dropping them."""
    llm = _llm()
    seen = []
    llm.driver.foreign = seen.extend
    served = llm.engine.add_request(llm.tokenizer.encode("gonk"), SamplingParams(**SAMPLING[0]))
    mine = llm.generate("abc", **SAMPLING[0])
    while llm.engine.has_unfinished():
        llm.driver.step()
    assert mine.text == _llm().generate("abc", **SAMPLING[0]).text
    text = "".join(e.text for e in seen if e.request_id == served.request_id)
    assert text == _llm().generate("gonk", **SAMPLING[0]).text
