"""Tool calling on /v1/chat/completions: the prompt format, the call constraint, and the answer.

The generic format (any chat template; SmolLM2's has no tool support): the tools go into the
system message as a JSON list inside ``<tools>...</tools>``, with the instruction to call them as

    <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>

(one JSON list of calls, SmolLM2's own function-calling format). Assistant messages with
``tool_calls`` are rendered back in that format, ``tool`` messages as a user turn of
``<tool_response>{"name", "content"}</tool_response>`` blocks (consecutive ones merged).

``tool_choice``: ``none`` (the tools are not shown; plain text), ``auto`` (text, or a call block
checked exactly once its opening marker appears: ``constraints.tool_call.ToolCall``), ``required``
(a call block from the first token, ``anyOf`` over the tools) or a named function (that one only).
``parallel_tool_calls: false`` allows one call per answer. A returned call always validates.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from decodekit.servers.openai.errors import bad_value
from decodekit.servers.openai.limits import Limits, check_nesting

from decodekit.constraints.tool_call import CLOSE, OPEN, parse_calls

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}

SYSTEM = ("You have access to the following tools:\n<tools>\n{tools}\n</tools>\n"
          "To call tools, reply with a JSON list of calls between the tags, and nothing after it:\n"
          + OPEN + '[{{"name": "tool name", "arguments": {{"argument": "value"}}}}]' + CLOSE + "\n{rule}")
RULES = {"auto": "When the user asks to use a tool, reply only with the call; otherwise answer in text.",
         "required": "You must call one or more of the tools.",
         "single": "Call exactly one tool."}


@dataclass
class ToolPlan:
    """A chat request's tools: the rendered messages and, when calls are possible, the constraint spec."""

    messages: list[dict]
    mode: str = "none"  # none | auto | required | named
    tools: dict[str, dict] = field(default_factory=dict)  # name -> parameters schema
    parallel: bool = True
    schema: dict | None = None  # the JSON list of calls the constraint enforces

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def spec(self) -> dict | None:
        """The ``guided`` entry that selects the tool-call constraint (JSON-able: strategies are cached by it)."""
        if not self.active:
            return None
        return {"tools": {"schema": self.schema, "text": self.mode == "auto"}}

    def answer(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """(message, finish_reason) of one finished choice: content before the call block, the valid calls."""
        if not self.active:
            return {"role": "assistant", "content": text, "refusal": None}, finish_reason
        content, calls = parse_calls(text)
        calls = calls if calls and self.valid(calls) else None
        message = {"role": "assistant", "content": content or None, "refusal": None}
        if calls is None:
            return message, finish_reason
        message["tool_calls"] = [{"id": new_call_id(), "type": "function",
                                  "function": {"name": c["name"], "arguments": json.dumps(c["arguments"],
                                                                                          ensure_ascii=False)}}
                                 for c in calls]
        return message, "tool_calls"

    def valid(self, calls: list) -> bool:
        """Every call names one of the tools and its arguments validate against that tool's parameters."""
        from decodekit.constraints import JsonSchema

        if self.schema is None:
            return False
        return JsonSchema(self.schema, automaton=False).valid(json.dumps(calls))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def plan(body, messages: list[dict], limits: Limits) -> ToolPlan:
    """Check ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (400 naming the field) and render."""
    tools = _check_tools(body.tools or [], limits)
    mode, named = _choice(body.tool_choice, tools)
    parallel = body.parallel_tool_calls is not False
    if mode == "named":
        parallel = False
    history = render_history(messages)
    if mode == "none":
        return ToolPlan(history)
    chosen = {named: tools[named]} if named else tools
    schema = calls_schema(chosen, parallel)
    rule = RULES["single"] if mode == "named" or (mode == "required" and not parallel) else RULES.get(mode, "")
    if mode == "named":
        rule = f"Call the tool {named!r}."
    listed = [{"name": n, **({"description": t["description"]} if t.get("description") else {}),
               "parameters": t["parameters"]} for n, t in chosen.items()]
    system = SYSTEM.format(tools=json.dumps(listed, ensure_ascii=False), rule=rule)
    if not parallel:
        system += " Make at most one call."
    if history and history[0]["role"] == "system":
        history[0] = {**history[0], "content": history[0]["content"] + "\n\n" + system}
    else:
        history.insert(0, {"role": "system", "content": system})
    return ToolPlan(history, mode, {n: t["parameters"] for n, t in chosen.items()}, parallel, schema)


def calls_schema(tools: dict[str, dict], parallel: bool) -> dict:
    """The JSON list of calls: each ``{"name": const, "arguments": parameters}``, ``anyOf`` over the tools.

    Generated arguments use only the declared parameters (``additionalProperties: false`` where a
    parameters object declares ``properties`` and leaves it unset, as OpenAI's strict mode does): a call
    then names what the function takes, and every one still validates against the tool's own schema."""
    alternatives = [{"type": "object", "properties": {"name": {"const": name}, "arguments": _closed(t["parameters"])},
                     "required": ["name", "arguments"], "additionalProperties": False}
                    for name, t in tools.items()]
    item = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    schema = {"type": "array", "items": item, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _closed(parameters: dict) -> dict:
    if isinstance(parameters, dict) and "properties" in parameters and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def _check_tools(tools: list, limits: Limits) -> dict[str, dict]:
    if len(tools) > limits.max_tools:
        raise bad_value(f"tools holds {len(tools)} tools; the limit is {limits.max_tools}", "tools")
    out: dict[str, dict] = {}
    total = 0
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad_value("only function tools are supported ({'type': 'function', 'function': {...}})", where)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_value("a tool needs a 'function' object", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise bad_value("function name must be 1-64 letters, digits, '_' or '-'", f"{where}.function.name")
        if name in out:
            raise bad_value(f"two tools are named {name!r}", f"{where}.function.name")
        params = fn.get("parameters") or EMPTY_PARAMETERS
        if not isinstance(params, dict):
            raise bad_value("function parameters must be a JSON schema object", f"{where}.function.parameters")
        size = len(json.dumps(params))
        total += size
        if size > limits.max_schema_bytes:
            raise bad_value(f"function parameters have {size} characters; the limit is {limits.max_schema_bytes}",
                            f"{where}.function.parameters")
        check_nesting(params, limits.max_schema_depth, f"{where}.function.parameters")
        _check_schema(params, f"{where}.function.parameters")
        description = fn.get("description")
        out[name] = {"parameters": params, "description": description if isinstance(description, str) else None}
    if total > limits.max_tools_bytes:
        raise bad_value(f"the tools' schemas have {total} characters together; the limit is "
                        f"{limits.max_tools_bytes}", "tools")
    return out


def _check_schema(schema: dict, param: str) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise bad_value(f"invalid JSON schema: {e.message}", param) from None


def _choice(choice, tools: dict) -> tuple[str, str | None]:
    """(mode, named function) of ``tool_choice``; the default is ``auto`` with tools, ``none`` without."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_value(f"tool_choice must be 'none', 'auto', 'required' or a function, got {choice!r}",
                            "tool_choice")
        if choice != "none" and not tools:
            raise bad_value(f"tool_choice {choice!r} needs tools", "tool_choice")
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad_value("tool_choice must be {'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if name not in tools:
        raise bad_value(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return "named", name


# ---- history ------------------------------------------------------------------------------------
def render_history(messages: list[dict]) -> list[dict]:
    """Messages as plain ``{"role", "content"}`` dicts: assistant tool calls and tool results as text."""
    out: list[dict] = []
    names: dict = {}  # call id -> function name
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content = content + render_calls(m["tool_calls"], f"messages.{i}.tool_calls")
            names.update(names_of_calls(m["tool_calls"]))
        elif role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id")) or "tool"
            block = json.dumps({"name": name, "content": content},
                               ensure_ascii=False)
            content = f"<tool_response>\n{block}\n</tool_response>"
            if out and out[-1].get("tool"):
                out[-1]["content"] += "\n" + content
                continue
            out.append({"role": "user", "content": content, "tool": True})
            continue
        out.append({"role": role, "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def render_calls(tool_calls: list, param: str) -> str:
    calls = []
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_value("each tool call needs function.name", f"{param}.{j}")
        arguments = fn.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # kept as the client sent it
        calls.append({"name": fn["name"], "arguments": arguments})
    return OPEN + json.dumps(calls, ensure_ascii=False) + CLOSE


def names_of_calls(tool_calls: list) -> dict[str, str]:
    """call id -> function name, so a ``tool`` message can name the function it answers."""
    return {c.get("id"): c.get("function", {}).get("name") for c in tool_calls if isinstance(c, dict)}


def answer_choices(plan: ToolPlan, response: dict, completion) -> dict:
    """A whole chat response with each choice's message and finish reason as ``plan.answer`` gives them."""
    if not plan.active:
        return response
    for choice, ch in zip(response["choices"], completion.choices):
        choice["message"], choice["finish_reason"] = plan.answer(ch.text, ch.finish_reason)
    return response


class CallStream:
    """One streamed choice under tools: content deltas until the call block may start (a possible
    opening marker is held back), nothing inside the block, and at the end the validated calls as
    OpenAI's ``tool_calls`` deltas (an invalid or cut-off block sends no calls)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of content sent

    def content(self, delta: str) -> str:
        """The content that can be sent after ``delta`` arrived."""
        self.text += delta
        i = self.text.find(OPEN)
        if i < 0:  # hold back a tail that may yet become the opening marker
            i = len(self.text)
            for k in range(min(len(OPEN) - 1, len(self.text)), 0, -1):
                if OPEN.startswith(self.text[-k:]):
                    i = len(self.text) - k
                    break
        out = self.text[self.sent:i] if i > self.sent else ""
        self.sent = max(self.sent, i)
        return out

    def finish(self, finish_reason: str | None) -> tuple[str, list[dict], str | None]:
        """(content still held, ``tool_calls`` delta entries, finish reason) at the end of the choice."""
        message, reason = self.plan.answer(self.text, finish_reason)
        content = (message["content"] or "")[self.sent:]
        deltas = []
        for j, call in enumerate(message.get("tool_calls", ())):
            deltas.append({"index": j, "id": call["id"], "type": "function",
                           "function": {"name": call["function"]["name"], "arguments": ""}})
            deltas.append({"index": j, "function": {"arguments": call["function"]["arguments"]}})
        return content, deltas, reason
