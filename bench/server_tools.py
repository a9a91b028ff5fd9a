"""The ``tools`` case of ``bench/server_load.py``: 16 clients, each with its own tool set.

Each client sends one chat request with its own three function tools (names and parameter schemas
differ per client) and a question written to need one of them ("Use the weather_3 tool to get the
weather in Lima."); even clients ask ``tool_choice:
"required"``, odd ones ``auto`` (sampled at temperature 0.8, seeded, so some answers are calls).
The same 16 requests run one at a time and 16 at once (rounds interleaved, after a 1-token warm-up
that builds each tool set's constraint). Every returned call is parsed and validated against its
tool's schema with ``jsonschema``: ``valid_calls`` is the fraction that validate (target 1.0);
``speedup_16`` is completion tokens/s at 16 clients over one at a time (target >= 3x), 0 errors.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jsonschema
from decodekit.bench.common import md_table, median

NUM_CLIENTS = 16
TARGET_SPEEDUP = 3.0
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Rome", "Delhi"]


def tool_set(i: int) -> tuple[list[dict], str]:
    """Client ``i``'s three tools (their own names and schemas) and a question for its first one."""
    unit = {"type": "string", "enum": ["celsius", "fahrenheit"]} if i % 3 else {"type": "string"}
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}, "unit": unit},
               "required": ["city"] if i % 2 else ["city", "unit"]}
    add = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0}},
           "required": ["a", "b"]}
    search = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 40},
                                               "limit": {"type": "integer", "minimum": 1, "maximum": 10 + i}},
              "required": ["query"]}
    tools = [{"type": "function", "function": {"name": f"weather_{i}", "description": "Current weather in a city",
                                               "parameters": weather}},
             {"type": "function", "function": {"name": f"add_{i}", "description": "Add two integers",
                                               "parameters": add}},
             {"type": "function", "function": {"name": f"search_{i}", "description": "Search the web",
                                               "parameters": search}}]
    return tools, f"Use the weather_{i} tool to get the weather in {CITIES[i % len(CITIES)]}."


def bodies(model: str, max_tokens: int) -> list[dict]:
    out = []
    for i in range(NUM_CLIENTS):
        tools, question = tool_set(i)
        required = i % 2 == 0
        out.append({"model": model, "messages": [{"role": "user", "content": question}], "tools": tools,
                    "tool_choice": "required" if required else "auto", "max_tokens": max_tokens,
                    "temperature": 0 if required else 0.8, "seed": i})
    return out


async def one(http: httpx.AsyncClient, url: str, body: dict) -> dict:
    try:
        r = await http.post(f"{url}/v1/chat/completions", json=body)
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if r.status_code != 200:
        return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
    data = r.json()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in body["tools"]}
    calls = data["choices"][0]["message"].get("tool_calls") or []
    valid = 0
    for call in calls:
        try:
            schema = schemas[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
            valid += 1
        except (KeyError, ValueError, jsonschema.ValidationError):
            pass
    return {"error": None, "tokens": data["usage"]["completion_tokens"], "calls": len(calls), "valid": valid,
            "mode": body["tool_choice"], "finish": data["choices"][0]["finish_reason"]}


async def run(url: str, todo: list[dict], concurrency: int) -> dict:
    queue = list(todo)
    results: list[dict] = []

    async def client(http):
        while queue:
            results.append(await one(http, url, queue.pop(0)))

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=concurrency + 2)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        return {"wall_s": time.perf_counter() - t0, "requests": results}


async def case_tools(url: str, model: str, max_tokens: int, rounds: int) -> dict:
    todo = bodies(model, max_tokens)
    warm = await run(url, [{**b, "max_tokens": 1} for b in todo], NUM_CLIENTS)
    runs: dict[int, list[dict]] = {1: [], NUM_CLIENTS: []}
    order = [1, NUM_CLIENTS]
    for round_ in range(rounds):
        for c in order if round_ % 2 == 0 else order[::-1]:
            runs[c].append(await run(url, todo, c))

    def tps(c):
        return median([sum(r.get("tokens", 0) for r in run_["requests"]) / run_["wall_s"] for run_ in runs[c]])

    reqs = [r for c in runs for run_ in runs[c] for r in run_["requests"]]
    ok = [r for r in reqs if r["error"] is None]
    by_mode = {m: [r for r in ok if r["mode"] == m] for m in ("required", "auto")}
    num_calls = sum(r["calls"] for r in ok)
    return {"clients": NUM_CLIENTS, "max_tokens": max_tokens, "rounds": rounds,
            "serial_tokens_per_s": tps(1), "concurrent_tokens_per_s": tps(NUM_CLIENTS),
            "speedup": tps(NUM_CLIENTS) / tps(1) if tps(1) else None,
            "errors": len(reqs) - len(ok), "warmup_errors": sum(r["error"] is not None for r in warm["requests"]),
            "num_calls": num_calls, "num_valid": sum(r["valid"] for r in ok),
            "call_rate": {m: (sum(r["calls"] > 0 for r in rs) / len(rs) if rs else None) for m, rs in by_mode.items()},
            "error_messages": sorted({r["error"] for r in reqs if r["error"]})[:5]}


def summary(s: dict) -> tuple[dict, str, bool]:
    valid = s["num_valid"] / s["num_calls"] if s["num_calls"] else None
    speedup = round(s["speedup"], 2) if s["speedup"] is not None else None
    fields = {"tools": {"valid_calls": valid, "speedup_16": speedup, "errors": s["errors"],
                        "num_calls": s["num_calls"], "call_rate": s["call_rate"],
                        "tokens_per_s": {"1": round(s["serial_tokens_per_s"], 1),
                                         "16": round(s["concurrent_tokens_per_s"], 1)}},
              "target_tools_speedup": TARGET_SPEEDUP}
    met = valid == 1.0 and speedup is not None and speedup >= TARGET_SPEEDUP and s["errors"] == 0
    table = md_table(["clients", "completion tokens/s"], [[1, round(s["serial_tokens_per_s"], 1)],
                                                          [NUM_CLIENTS, round(s["concurrent_tokens_per_s"], 1)]])
    table += (f"\n\n{NUM_CLIENTS} chat requests, each with its own three function tools, half `tool_choice: "
              f"\"required\"` (greedy), half `auto` (T=0.8, seeded), max_tokens {s['max_tokens']}, {s['rounds']} "
              f"round(s). Calls returned: {s['num_calls']}, valid against their schemas: {s['num_valid']} "
              f"(**{valid}**, target 1.0); call rate by mode {s['call_rate']}. 16 concurrent vs one at a time: "
              f"**{speedup}x** (target >= {TARGET_SPEEDUP}x), {s['errors']} errors.")
    return fields, table, met
