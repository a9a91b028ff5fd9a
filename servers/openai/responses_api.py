"""``POST /v1/responses``: the common subset of OpenAI's Responses API, run as a chat completion.

Supported: ``input`` (a string or a list of messages, ``function_call`` and ``function_call_output``
items), ``instructions``, ``max_output_tokens``, ``temperature``, ``top_p``, ``text.format``
(``text``, ``json_object``, ``json_schema``), function ``tools`` with ``tool_choice`` and
``parallel_tool_calls``, ``stream`` (the Responses event types), plus ``seed``, ``stop`` and
decodekit's ``decodekit`` field. Clients send many fields at their defaults: those pass. A field
this server does not support with any other value is a 400 naming it; the server keeps no state,
so ``previous_response_id`` and ``conversation`` are refused and nothing is stored.
"""

from __future__ import annotations

import json
import time
import uuid

from decodekit.servers.openai import responses as R
from decodekit.servers.openai.calls import ClientDisconnected
from decodekit.servers.openai.errors import APIError, bad_value
from decodekit.servers.openai.protocol import ChatCompletionRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

SUPPORTED = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text", "tools",
             "tool_choice", "parallel_tool_calls", "stream", "seed", "stop", "decodekit", "user", "metadata",
             "store", "stream_options"}
# field -> the values that mean "the default" (accepted and ignored)
DEFAULTS = {"previous_response_id": (None,), "conversation": (None,), "reasoning": (None, {}),
            "background": (None, False), "include": (None, []), "truncation": (None, "disabled"),
            "service_tier": (None, "auto", "default"), "top_logprobs": (None, 0), "max_tool_calls": (None,),
            "prompt": (None,), "prompt_cache_key": (None,), "safety_identifier": (None,)}
WHY = {"previous_response_id": "this server keeps no conversation state: send the whole conversation as input",
       "conversation": "this server keeps no conversation state: send the whole conversation as input"}


def check_fields(body: dict) -> None:
    for key, value in body.items():
        if key in SUPPORTED:
            continue
        if value in DEFAULTS.get(key, (None,)):
            continue
        why = WHY.get(key, "not supported by this server")
        raise bad_value(f"{key} is {why}", key)


def _text_of(content, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad_value("content must be a string or a list of text parts", param)
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                or not isinstance(part.get("text"), str):
            raise bad_value("only text content parts (input_text / output_text) are supported", param)
        parts.append(part["text"])
    return "".join(parts)


def chat_messages(body: dict) -> list[dict]:
    """``instructions`` and ``input`` as chat messages (function calls and their outputs included)."""
    messages = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": str(body["instructions"])})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad_value("input must be a string or a non-empty list of items", "input")
    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_value("a message's role must be user, system, developer or assistant", f"{where}.role")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise bad_value(f"input item type {kind!r} is not supported (message, function_call, "
                            "function_call_output)", f"{where}.type")
    return messages


def chat_request(body: dict) -> ChatCompletionRequest:
    """The chat completion request a Responses request runs as."""
    check_fields(body)
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    response_format = None
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        response_format = {"type": fmt["type"]}
        if fmt["type"] == "json_schema":
            response_format["json_schema"] = {"name": fmt.get("name", "response"), "schema": fmt.get("schema"),
                                              "strict": fmt.get("strict")}
    tools = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}}
             if isinstance(t, dict) and t.get("type") == "function" else t for t in body.get("tools") or []]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    chat = {"model": body.get("model"), "messages": chat_messages(body), "tools": tools or None,
            "tool_choice": choice, "parallel_tool_calls": body.get("parallel_tool_calls"),
            "max_completion_tokens": body.get("max_output_tokens"), "temperature": body.get("temperature"),
            "top_p": body.get("top_p"), "response_format": response_format, "stream": bool(body.get("stream")),
            "seed": body.get("seed"), "stop": body.get("stop"), "decodekit": body.get("decodekit")}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        raise APIError(422, f"{first.get('msg')} at {'.'.join(map(str, first.get('loc', ())))}",
                       code="invalid_type") from None


# ---- output -------------------------------------------------------------------------------------
def _message_item(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}


def output_items(message: dict) -> list[dict]:
    items = [_message_item(message["content"])] if message.get("content") or not message.get("tool_calls") else []
    return items + [_call_item(c) for c in message.get("tool_calls", ())]


def response_object(response_id: str, body: dict, model: str, output: list, completion, finish_reason,
                    status: str | None = None) -> dict:
    incomplete = {"length": "max_output_tokens", "constraint_failed": "constraint_failed"}.get(finish_reason)
    out = {"id": response_id, "object": "response", "created_at": int(time.time()), "model": model,
           "status": status or ("incomplete" if incomplete else "completed"), "output": output, "error": None,
           "incomplete_details": {"reason": incomplete} if incomplete and status is None else None,
           "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
           "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
           "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
           "parallel_tool_calls": body.get("parallel_tool_calls", True),
           "text": body.get("text") or {"format": {"type": "text"}}, "previous_response_id": None,
           "reasoning": None, "store": False, "truncation": "disabled", "metadata": body.get("metadata") or {},
           "user": body.get("user"), "usage": None}
    if completion is not None:
        u = R.usage([completion])
        out["usage"] = {"input_tokens": u["prompt_tokens"],
                        "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
                        "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": u["total_tokens"]}
        out["decodekit"] = R.stats(completion)
    return out


async def handle(server, body: dict, request, start_chat):
    chat = chat_request(body)
    chat, call, plan = await start_chat(server, chat)
    response_id = f"resp_{uuid.uuid4().hex}"
    if chat.stream:
        stream = _events(call, plan, body, server.model_name, response_id)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        done = await call.collect(request)
    except ClientDisconnected:
        return Response(status_code=499)
    completion = done[0][1]
    ch = completion.choices[0]
    message, reason = plan.answer(ch.text, ch.finish_reason)
    return JSONResponse(response_object(response_id, body, server.model_name, output_items(message), completion,
                                        reason))


# ---- streaming ----------------------------------------------------------------------------------
class _Events:
    def __init__(self):
        self.sequence = 0

    def __call__(self, kind: str, **data) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event)}\n\n"


async def _events(call, plan, body: dict, model: str, response_id: str):
    """created, in_progress, the message item's text deltas, function-call items, completed."""
    from decodekit.servers.openai.tools import CallStream

    emit = _Events()
    yield emit("response.created", response=response_object(response_id, body, model, [], None, None, "in_progress"))
    yield emit("response.in_progress", response=response_object(response_id, body, model, [], None, None,
                                                                "in_progress"))
    stream, text, item, output, completion = CallStream(plan), "", None, [], None
    try:
        async for kind, _sub, payload in call.messages():
            if kind == "event":
                delta = stream.content(payload.text) if plan.active else payload.text
                if delta:
                    if item is None:
                        item = _message_item("", "in_progress")
                        item["content"] = []
                        yield emit("response.output_item.added", output_index=0, item=item)
                        yield emit("response.content_part.added", item_id=item["id"], output_index=0,
                                   content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                    text += delta
                    yield emit("response.output_text.delta", item_id=item["id"], output_index=0, content_index=0,
                               delta=delta, logprobs=[])
            elif kind == "done":
                completion = payload
    except APIError as e:
        yield emit("error", code=e.code, message=e.message, param=e.param)
        call.close()
        return
    finally:
        call.close()
    message, reason = plan.answer(completion.choices[0].text, completion.choices[0].finish_reason)
    rest = (message.get("content") or "")[len(text):]
    if rest and item is None:
        item = _message_item("", "in_progress")
        item["content"] = []
        yield emit("response.output_item.added", output_index=0, item=item)
        yield emit("response.content_part.added", item_id=item["id"], output_index=0, content_index=0,
                   part={"type": "output_text", "text": "", "annotations": []})
    if rest:
        text += rest
        yield emit("response.output_text.delta", item_id=item["id"], output_index=0, content_index=0, delta=rest,
                   logprobs=[])
    if item is not None:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        yield emit("response.output_text.done", item_id=item["id"], output_index=0, content_index=0, text=text,
                   logprobs=[])
        yield emit("response.content_part.done", item_id=item["id"], output_index=0, content_index=0, part=part)
        item = {**item, "status": "completed", "content": [part]}
        yield emit("response.output_item.done", output_index=0, item=item)
        output.append(item)
    for call_entry in message.get("tool_calls", ()):
        done = _call_item(call_entry)
        index = len(output)
        yield emit("response.output_item.added", output_index=index, item={**done, "arguments": "",
                                                                            "status": "in_progress"})
        yield emit("response.function_call_arguments.delta", item_id=done["id"], output_index=index,
                   delta=done["arguments"])
        yield emit("response.function_call_arguments.done", item_id=done["id"], output_index=index,
                   arguments=done["arguments"])
        yield emit("response.output_item.done", output_index=index, item=done)
        output.append(done)
    final = response_object(response_id, body, model, output, completion, reason)
    kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
    yield emit(kind, response=final)
