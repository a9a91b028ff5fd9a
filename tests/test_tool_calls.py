"""Tool calls: the ``ToolCall`` constraint on text, the grammar on the mock backend, the server's plan."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import pytest
from decodekit.servers.openai import tools as T
from decodekit.servers.openai.errors import APIError
from decodekit.servers.openai.limits import Limits

from decodekit.api import LLM
from decodekit.backends.mock import MockBackend
from decodekit.constraints import JsonSchema
from decodekit.constraints.tool_call import CLOSE, OPEN, ToolCall, json_end, parse_calls
from decodekit.strategies.constrained import Constrained

ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}
TOOLS = {"add": {"parameters": ADD}, "get_weather": {"parameters": WEATHER}}


def constraint(text_allowed: bool, parallel: bool = True) -> ToolCall:
    return ToolCall(JsonSchema(T.calls_schema(TOOLS, parallel)), text_allowed=text_allowed)


def test_json_end_is_string_aware():
    assert json_end('[{"a": "]}"}] tail') == len('[{"a": "]}"}]')
    assert json_end('[{"a": "\\"]"') is None
    assert json_end("  nope") is None


def test_required_allows_only_a_valid_call_block():
    c = constraint(text_allowed=False)
    call = OPEN + '[{"name": "add", "arguments": {"a": 1, "b": 2}}]' + CLOSE
    assert all(c.prefix_ok(call[:i]) for i in range(len(call) + 1))
    assert c.complete_ok(call)
    assert not c.prefix_ok("Sure" + call) and not c.prefix_ok(" " + OPEN)
    assert not c.prefix_ok(OPEN + '[{"name": "mul"')
    assert not c.prefix_ok(OPEN + '[{"name": "add", "arguments": {"a": "x"')
    assert not c.prefix_ok(call + "more") and not c.complete_ok(call[:-1])
    assert c.has_mask  # llguidance: exact masks


@pytest.mark.parametrize("text_allowed", [False, True])
def test_the_mask_grammar_agrees_with_the_checker(text_allowed):
    """``auto``'s lazy grammar (free text, then the call block once the marker appears) and ``required``'s
    block grammar decide complete texts and prefixes as the checker does."""
    from decodekit.constraints.guidance import ByteMatcher

    c = constraint(text_allowed)
    matcher = ByteMatcher(c.mask_grammar())
    call = OPEN + '[{"name": "add", "arguments": {"a": 1, "b": 2}}]' + CLOSE
    texts = ["", "hello there.", "It is sunny <tool", call, "Let me add. " + call, OPEN + "\n" + call[len(OPEN):],
             "hi " + OPEN + "oops", call + "more", "x" + OPEN + "{", OPEN + '[{"name": "mul"',
             OPEN + '[{"name": "add", "arguments": {"a": "x"', call[:-3]]
    for text in texts:
        taken, complete = matcher.accepts(text.encode())
        assert complete == c.complete_ok(text), text
        assert (taken == len(text.encode())) == c.prefix_ok(text), text


def test_auto_allows_free_text_then_a_checked_call():
    c = constraint(text_allowed=True, parallel=False)
    assert c.prefix_ok("It is sunny <tool") and c.complete_ok("Just text.")
    two = '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]'
    assert c.complete_ok("Let me check. " + OPEN + two[:two.index(", {")] + "]" + CLOSE)
    assert not c.prefix_ok(OPEN + two)  # parallel_tool_calls false: one call
    assert not c.prefix_ok("x" + OPEN + "{")  # the block is a list of calls
    assert c.automaton() is None


def test_parse_calls():
    assert parse_calls("hi") == ("hi", None)
    assert parse_calls("a" + OPEN + '[{"name": "f", "arguments": {}}]' + CLOSE) == ("a", [{"name": "f",
                                                                                          "arguments": {}}])
    assert parse_calls(OPEN + '[{"name": "f", "argu') == ("", None)  # cut off: no calls


def mock_llm() -> LLM:
    """A mock backend whose tokens spell JSON tool calls (random bigram logits: a model that writes nonsense)."""
    pieces = ["", OPEN, CLOSE, "[", "]", "{", "}", '"', ":", ", ", " ", "name", "arguments", "add", "get_weather",
              "a", "b", "d", "city", "Paris", "hi", "there", ".", *"0123456789", "-", "x"]
    backend = MockBackend(vocab_size=len(pieces), seed=3, cache_tokens=4096)
    backend.tokenizer.pieces = pieces
    backend.tokenizer.index = {p: i for i, p in enumerate(pieces) if len(p) == 1}
    return LLM(backend=backend)


@pytest.mark.parametrize("text_allowed", [False, True])
def test_mock_model_calls_always_validate(text_allowed):
    llm = mock_llm()
    strategy = Constrained(constraint(text_allowed))
    outs = [llm.generate("a", strategy=strategy, max_new_tokens=80, temperature=1.0, seed=s) for s in range(12)]
    num_calls = num_text = 0
    for out in outs:
        text, calls = parse_calls(out.text)
        if calls is None:
            # cut off, or a dead end of this toy vocabulary: no call comes out; never a malformed one
            assert out.finish_reason in ("length", "constraint_failed") or (text_allowed and OPEN not in out.text)
            num_text += OPEN not in out.text
            continue
        num_calls += 1
        for call in calls:
            jsonschema.validate(call["arguments"], TOOLS[call["name"]]["parameters"])
        assert out.text.endswith(CLOSE) and (text_allowed or text == "")
    # required: every answer is a call (the mask). auto on this nonsense model: text, or a call that
    # validates (the lazy grammar masks the block once the marker appears), never a malformed one; the
    # call rate is measured on SmolLM2 (test_server_tools)
    if not text_allowed:
        assert num_calls > 0 and num_text == 0
    llm.backend.cache.check_integrity()
    assert llm.backend.cache.num_open_handles == 0


def body(**kw):
    base = dict(tools=[{"type": "function", "function": {"name": "add", "parameters": ADD}},
                       {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                                         "parameters": WEATHER}}],
                tool_choice=None, parallel_tool_calls=None)
    return SimpleNamespace(**{**base, **kw})


def test_plan_modes_and_rendering():
    msgs = [{"role": "user", "content": "add 1 and 2"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3"},
            {"role": "tool", "tool_call_id": "call_1", "content": "3 again"}]
    plan = T.plan(body(), msgs, Limits())
    assert plan.mode == "auto" and plan.spec()["tools"]["text"] is True
    roles = [m["role"] for m in plan.messages]
    assert roles == ["system", "user", "assistant", "user"]  # tool results merged into one user turn
    assert OPEN + '[{"name": "add", "arguments": {"a": 1, "b": 2}}]' + CLOSE in plan.messages[2]["content"]
    assert '"name": "add"' in plan.messages[3]["content"] and "3 again" in plan.messages[3]["content"]
    assert "get_weather" in plan.messages[0]["content"]
    assert T.plan(body(tool_choice="none"), msgs[:1], Limits()).messages == msgs[:1]
    named = T.plan(body(tool_choice={"type": "function", "function": {"name": "add"}}), msgs[:1], Limits())
    assert named.mode == "named" and set(named.tools) == {"add"} and named.schema["maxItems"] == 1
    required = T.plan(body(tool_choice="required", parallel_tool_calls=False), msgs[:1], Limits())
    assert required.spec()["tools"]["text"] is False and required.schema["maxItems"] == 1


def test_answer_keeps_only_valid_calls():
    plan = T.plan(body(tool_choice="required"), [{"role": "user", "content": "x"}], Limits())
    good = OPEN + '[{"name": "add", "arguments": {"a": 1, "b": 2}}]' + CLOSE
    message, reason = plan.answer(good, "stop")
    assert reason == "tool_calls" and message["content"] is None
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert message["tool_calls"][0]["id"].startswith("call_")
    bad = OPEN + '[{"name": "add", "arguments": {"a": "one", "b": 2}}]' + CLOSE
    assert plan.answer(bad, "stop") == ({"role": "assistant", "content": None, "refusal": None}, "stop")


def test_stream_reassembles_to_the_answer():
    plan = T.plan(body(), [{"role": "user", "content": "x"}], Limits())
    text = "Let me <b> check. " + OPEN + '[{"name": "add", "arguments": {"a": 1, "b": 2}}]' + CLOSE
    stream = T.CallStream(plan)
    sent = "".join(stream.content(text[i:i + 3]) for i in range(0, len(text), 3))
    rest, deltas, reason = stream.finish("stop")
    message, whole_reason = plan.answer(text, "stop")
    assert sent + rest == message["content"] and reason == whole_reason == "tool_calls"
    assert deltas[0]["function"] == {"name": "add", "arguments": ""} and deltas[0]["id"].startswith("call_")
    assert deltas[1]["function"]["arguments"] == message["tool_calls"][0]["function"]["arguments"]


@pytest.mark.parametrize("kw, param", [
    (dict(tool_choice={"type": "function", "function": {"name": "mul"}}), "tool_choice"),
    (dict(tool_choice="sometimes"), "tool_choice"),
    (dict(tools=[{"type": "retrieval"}]), "tools.0"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools.0.function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]),
     "tools.0.function.parameters"),
    (dict(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(65)]), "tools"),
])
def test_plan_errors_name_the_field(kw, param):
    with pytest.raises(APIError) as e:
        T.plan(body(**kw), [{"role": "user", "content": "x"}], Limits())
    assert e.value.status == 400 and e.value.param == param
