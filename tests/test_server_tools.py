"""Tool calling through the real ``openai`` client and LangChain's ``bind_tools`` against SmolLM2."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import jsonschema
import openai
import pytest
from server_fixtures import MODEL, openai_server

pytestmark = pytest.mark.real

WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
NEEDS_TOOL = ["Use the get_weather tool to get the weather in Paris.", "Use the add tool to add 17 and 25.",
              "Use the get_weather tool to get the weather in Tokyo.", "Use the add tool to add 3 and 4.",
              "Use the get_weather tool to get the weather in Berlin."]


srv, client = openai_server()


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assert_valid(calls, allowed=SCHEMAS):
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), allowed[call.function.name])


def test_required_and_named_calls_validate(client):
    r = client.chat.completions.create(model=MODEL, messages=ask(NEEDS_TOOL[0]), tools=TOOLS,
                                       tool_choice="required", max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    assert_valid(choice.message.tool_calls)
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] == "Paris"
    r = client.chat.completions.create(model=MODEL, messages=ask("Tell me a joke."), tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "add"}},
                                       max_tokens=60, temperature=0.8, seed=2, n=2)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        assert_valid(choice.message.tool_calls, {"add": ADD})


def test_auto_calls_on_prompts_that_need_a_tool(client, srv):
    """``auto`` may answer in text; on prompts written to need a tool the model starts a call with a
    probability above zero (measured exactly: the opening marker's log-probability after the rendered
    prompt, through the server's own prompt scoring), and every sampled call validates."""
    from decodekit.servers.openai import tools as T
    from decodekit.servers.openai.limits import Limits

    llm = srv.server.llm
    marker = llm.tokenizer.encode(T.OPEN)
    rates = []
    for text in NEEDS_TOOL:
        body = SimpleNamespace(tools=TOOLS, tool_choice="auto", parallel_tool_calls=True)
        ids = llm.tokenizer.apply_chat_template(T.plan(body, ask(text), Limits()).messages)
        r = client.completions.create(model=MODEL, prompt=ids + marker, max_tokens=0, echo=True, logprobs=1)
        rates.append(math.exp(sum(r.choices[0].logprobs.token_logprobs[-len(marker):])))
    print("auto call-start probability per prompt:", [round(x, 4) for x in rates])
    assert all(x > 0.001 for x in rates)
    num_calls = num_answers = 0
    for text in NEEDS_TOOL:
        r = client.chat.completions.create(model=MODEL, messages=ask(text), tools=TOOLS, max_tokens=64,
                                           temperature=1.0, seed=0, n=8)
        for choice in r.choices:
            num_answers += 1
            num_calls += check_auto_choice(choice)
    print(f"auto call rate (sampled): {num_calls}/{num_answers}")


def check_auto_choice(choice) -> int:
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert_valid(choice.message.tool_calls)
        return 1
    # text, or a call cut off by max_tokens (constraint_failed: nothing malformed comes out)
    assert choice.finish_reason in ("stop", "length", "constraint_failed")
    assert "<tool_call>" not in (choice.message.content or "")
    return 0


def test_streamed_tool_calls_reassemble_to_the_whole_answer(client):
    kwargs = dict(model=MODEL, messages=ask(NEEDS_TOOL[1]), tools=TOOLS, tool_choice="required", max_tokens=60,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    content, reasons = "", []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or ():
            entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = d.id or entry["id"]
            entry["name"] += (d.function.name or "") if d.function else ""
            entry["arguments"] += (d.function.arguments or "") if d.function else ""
        if chunk.choices[0].finish_reason:
            reasons.append(chunk.choices[0].finish_reason)
    assert reasons == ["tool_calls"] and content == (whole.message.content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_parallel_false_and_history_round_trip(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("Add 1 and 2, and also add 3 and 4."), tools=TOOLS,
                                       tool_choice="required", parallel_tool_calls=False, max_tokens=80,
                                       temperature=0)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1
    history = [*ask("Add 1 and 2."), r.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": calls[0].id, "content": "3"}]
    r2 = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                        max_tokens=20, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length") and r2.choices[0].message.tool_calls is None
    assert r2.choices[0].message.content


def test_speculative_drafting_under_the_tool_constraint(client):
    kwargs = dict(model=MODEL, messages=ask(NEEDS_TOOL[0]), tools=TOOLS, tool_choice="required", max_tokens=60,
                  temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    r = client.chat.completions.create(**kwargs, extra_body={"decodekit": {"strategy": "speculative",
                                                                           "draft": "forced"}})
    fast = r.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in fast] == \
        [(c.function.name, c.function.arguments) for c in plain]
    assert r.model_extra["decodekit"].get("tokens_accepted", 0) > 0


def test_tool_errors_are_400s(client):
    cases = [dict(tool_choice={"type": "function", "function": {"name": "mul"}}),
             dict(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(65)]),
             dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]),
             dict(response_format={"type": "json_object"})]
    for extra in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": MODEL, "messages": ask("hi"), "tools": TOOLS, **extra})
        assert e.value.status_code == 400 and e.value.body["param"]


def test_langchain_bind_tools(srv):
    pytest.importorskip("langchain_openai", reason="langchain-openai is in the test extra")
    os.environ["LANGCHAIN_TRACING_V2"] = "false"  # no traces to a remote service
    os.environ["LANGSMITH_TRACING"] = "false"
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    chat = ChatOpenAI(model=MODEL, base_url=f"{srv.url}/v1", api_key="none", temperature=0, max_tokens=60,
                      max_retries=0)
    message = chat.bind_tools([add], tool_choice="add").invoke("What is 2 plus 3?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "add"
    args = message.tool_calls[0]["args"]
    assert isinstance(args["a"], int) and isinstance(args["b"], int)
    assert add.invoke(args) == args["a"] + args["b"]
