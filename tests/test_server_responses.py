"""``POST /v1/responses`` through the real ``openai`` client against SmolLM2."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from server_fixtures import MODEL, openai_server

pytestmark = pytest.mark.real

ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOL = {"type": "function", "name": "add", "description": "Add two integers", "parameters": ADD}


srv, client = openai_server()


def test_text_equals_the_chat_answer_and_defaults_pass(client):
    r = client.responses.create(model=MODEL, input="What is the capital of France?", instructions="Be brief.",
                                max_output_tokens=10, temperature=0, store=False, truncation="disabled",
                                include=[], reasoning=None)
    chat = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}])
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens <= 10
    assert (r.status == "incomplete") == (chat.choices[0].finish_reason == "length")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_json_schema_format_and_function_tools(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    r = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Name a city in France."}],
                                text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
                                max_output_tokens=40, temperature=0)
    jsonschema.validate(json.loads(r.output_text), schema)
    r = client.responses.create(model=MODEL, input="What is 2 plus 3?", tools=[TOOL], tool_choice="required",
                                max_output_tokens=60, temperature=0)
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and calls[0].name == "add" and calls[0].call_id.startswith("call_")
    args = json.loads(calls[0].arguments)
    jsonschema.validate(args, ADD)
    follow = client.responses.create(model=MODEL, max_output_tokens=12, temperature=0, tools=[TOOL], input=[
        {"role": "user", "content": "What is 2 plus 3?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "add", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": str(args["a"] + args["b"])}])
    assert follow.status in ("completed", "incomplete")


def test_stream_event_order(client):
    events = list(client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          kinds[-1]] and kinds[-1] in ("response.completed", "response.incomplete")
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == events[-1].response.output_text
    whole = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0)
    assert whole.output_text == text
    tool_events = list(client.responses.create(model=MODEL, input="Add 1 and 2.", tools=[TOOL],
                                               tool_choice="required", max_output_tokens=60, temperature=0,
                                               stream=True))
    kinds = [e.type for e in tool_events]
    assert kinds[2:] == ["response.output_item.added", "response.function_call_arguments.delta",
                         "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    jsonschema.validate(json.loads(tool_events[-2].item.arguments), ADD)


def test_unsupported_non_default_fields_are_400s(srv):
    for field, value in [("previous_response_id", "resp_1"), ("background", True), ("truncation", "auto"),
                         ("conversation", "conv_1")]:
        r = httpx.post(f"{srv.url}/v1/responses", json={"model": MODEL, "input": "hi", field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field
    r = httpx.post(f"{srv.url}/v1/responses", json={"model": MODEL, "input": "hi", "previous_response_id": "x"})
    assert "no conversation state" in r.json()["error"]["message"]
    r = httpx.post(f"{srv.url}/v1/responses", json={"model": MODEL, "input": [{"type": "image", "url": "x"}]})
    assert r.status_code == 400
