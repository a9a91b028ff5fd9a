"""Load test of the OpenAI-compatible server: concurrency levels and three serving cases.

Starts ``decodekit serve`` in a subprocess on a free local port (default KV cache) and runs the cases
``--cases`` names (default all):

* ``levels``: the same Spec-Bench chat requests (greedy, ``ignore_eos`` so every request writes exactly
  ``max_tokens``) at 1, 4 and 16 concurrent streaming clients, rounds interleaved; requests/s, output
  tokens/s, time to first token, latency percentiles and errors. Concurrency 1 is serving the requests
  one at a time: the batching speedup is tokens/s at 16 clients over it (target >= 3x, zero errors,
  no lost requests).
* ``schemas``: 16 streaming clients, each with its own ``response_format`` JSON schema (the first 16
  JSONSchemaBench schemas under 600 characters that ``decodekit.constraints.JsonSchema`` compiles),
  greedy; output tokens/s at 16 concurrent vs the same requests one at a time (target >= 3x, 0 errors).
* ``2048``: 16 concurrent clients asking ``max_tokens: 2048`` for short answers (Spec-Bench qa, "answer
  in a few words", stop at a newline or a full stop: SmolLM2 ends them within ~55 tokens): the peak
  number of sequences the server ran at once, read from ``GET /metrics``
  (``decodekit_engine_max_batch_sequences``, a lifetime maximum, so this case runs first on the fresh
  server; target 16).
* ``tools``: 16 clients, each with its own tool set, ``tool_choice`` required and auto (``server_tools``):
  every returned call validated against its schema, 16 at once vs one at a time (target >= 3x, 0 errors).
* ``long``: 8 streaming clients decoding (``ignore_eos``), then a fresh prompt of ~7,800 tokens (quick:
  ~2,000) built from Spec-Bench articles behind a unique number (so the prefix cache cannot serve it);
  p99 of the 8 streams' inter-token gaps from the long prompt's send time until they finish
  (target <= 1.5 s) and the long request's time to first token.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from decodekit.bench.common import (
    ROOT,
    compiling_schemas,
    md_table,
    median,
    parser,
    require_data,
    spec_bench,
    write_results,
)
from decodekit.bench.server_tools import case_tools
from decodekit.bench.server_tools import summary as tools_summary

LEVELS = (1, 4, 16)
TARGET_SPEEDUP = 3.0
CASES = ("levels", "schemas", "2048", "long", "tools")
TARGET_SCHEMAS_SPEEDUP = 3.0
TARGET_PEAK_BATCH = 16
TARGET_LONG_ITL_P99_S = 1.5
NUM_SCHEMAS = 16
SCHEMA_MAX_CHARS = 600
BATCH_2048_CLIENTS = 16
SHORT_STOPS = ["\n", "."]  # the 2048 case's answers end at the first line or sentence end
LONG_STREAMS = 8
PEAK_GAUGE = "decodekit_engine_max_batch_sequences"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--requests", type=int, default=None, help="levels: requests per concurrency level and round")
    p.add_argument("--max-tokens", type=int, default=None, help="levels: tokens per request")
    p.add_argument("--rounds", type=int, default=None, help="levels and schemas: interleaved rounds")
    p.add_argument("--long-prompt-tokens", type=int, default=None,
                   help="long: prompt length in tokens (default 7800, quick 2000)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    args = p.parse_args()
    try:
        cases = parse_cases(args.cases)
    except ValueError as e:
        p.error(str(e))
    rounds = args.rounds or (1 if args.quick else 2)
    picked = pick_schemas(require_data("jsonschemabench/schemas"), NUM_SCHEMAS, SCHEMA_MAX_CHARS,
                          compile_schema) if "schemas" in cases else None
    out: dict[str, dict] = {}
    with Server(args) as url:
        if "2048" in cases:  # first: the peak-batch gauge is a maximum over the server's lifetime
            out["2048"] = asyncio.run(case_2048(url, args.model))  # same in --quick: the answers are short
        if "levels" in cases:
            out["levels"] = run_levels(url, args, rounds)
        if "schemas" in cases:
            out["schemas"] = asyncio.run(case_schemas(url, args.model, picked, 16 if args.quick else 48, rounds))
        if "long" in cases:
            target = args.long_prompt_tokens or (2000 if args.quick else 7800)
            out["long"] = asyncio.run(case_long(url, args.model, target))
        if "tools" in cases:
            out["tools"] = asyncio.run(case_tools(url, args.model, 48, rounds))
    report(args, cases, out)


def parse_cases(text: str) -> list[str]:
    """``"schemas,2048"`` -> the cases in run order; ``"all"`` or empty: every case. Raises ``ValueError``."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names or names == ["all"]:
        return list(CASES)
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    return [c for c in CASES if c in names]


def run_levels(url: str, args, rounds: int) -> dict:
    num_requests = args.requests or 16
    max_tokens = args.max_tokens or 16
    prompts = [q["turns"][0] for q in spec_bench(per_category=4)][:num_requests]
    asyncio.run(run_level(url, args.model, prompts[:2], 2, max_tokens))  # warm-up
    raw = {c: [] for c in LEVELS}
    for _ in range(rounds):
        for c in LEVELS:
            raw[c].append(asyncio.run(run_level(url, args.model, prompts, c, max_tokens)))
    return {"raw": raw, "num_requests": num_requests, "max_tokens": max_tokens, "rounds": rounds}


class Server:
    """``decodekit serve`` in a subprocess on a free port; yields its base URL."""

    def __init__(self, args):
        self.args = args
        self.proc = None

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "decodekit.servers.openai", "--model", self.args.model, "--port", str(port),
               "--max-batch-size", "32", "--max-queue", "64", "--log-level", "warning"]
        if self.args.device:
            cmd += ["--device", self.args.device]
        if self.args.threads:
            cmd += ["--threads", str(self.args.threads)]
        if getattr(self.args, "backend", None):
            cmd += ["--backend", self.args.backend]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        sys.exit("server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Send every prompt with ``concurrency`` clients; per-request TTFT / latency / tokens and the wall time."""
    todo = list(enumerate(prompts))
    results: list[dict] = []

    async def client(http: httpx.AsyncClient):
        while todo:
            _, prompt = todo.pop(0)
            results.append(await one_request(http, url, model, prompt, max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": results}


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    r = await stream_chat(http, url, body)
    return {"ttft_s": r["ttft_s"], "latency_s": r["end_at"] - r["sent_at"], "tokens": r["tokens"],
            "error": r["error"], "done": r["done"]}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def summarize(runs: list[dict]) -> dict:
    reqs = [r for run in runs for r in run["requests"]]
    ok = [r for r in reqs if r["error"] is None and r["done"]]
    ttft = [r["ttft_s"] * 1000 for r in ok if r["ttft_s"] is not None]
    lat = [r["latency_s"] * 1000 for r in ok]
    return {
        "tokens_per_s": median([sum(r["tokens"] for r in run["requests"]) / run["wall_s"] for run in runs]),
        "requests_per_s": median([len(run["requests"]) / run["wall_s"] for run in runs]),
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "latency_p50_ms": percentile(lat, 50), "latency_p99_ms": percentile(lat, 99),
        "errors": sum(r["error"] is not None for r in reqs),
        "lost": sum(r["error"] is None and not r["done"] for r in reqs),
        "tokens": sum(r["tokens"] for r in reqs),
    }


# ---- helpers shared by the cases ----------------------------------------------------------------
def chat_body(model: str, content: str, max_tokens: int, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}


async def stream_chat(http: httpx.AsyncClient, url: str, body: dict, out: dict | None = None) -> dict:
    """One streamed chat request. ``out`` (filled live, so a caller can watch progress): ``sent_at``,
    ``chunk_times`` (arrival of each chunk with content), ``ttft_s``, ``end_at``, ``tokens`` (usage),
    ``prompt_tokens``, ``cached_tokens``, ``finish``, ``error`` (non-200, error chunk or exception), ``done``."""
    out = out if out is not None else {}
    out.update(sent_at=time.perf_counter(), chunk_times=[], ttft_s=None, end_at=None, tokens=0, prompt_tokens=None,
               cached_tokens=None, finish=None, error=None, done=False)
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    break
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                    continue
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    out["tokens"] = usage["completion_tokens"]
                    out["prompt_tokens"] = usage["prompt_tokens"]
                    out["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                for choice in chunk.get("choices") or []:
                    if choice.get("delta", {}).get("content"):
                        out["chunk_times"].append(now)
                        if out["ttft_s"] is None:
                            out["ttft_s"] = now - out["sent_at"]
                    if choice.get("finish_reason"):
                        out["finish"] = choice["finish_reason"]
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        out["end_at"] = time.perf_counter()
    return out


async def run_bodies(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send every body with ``concurrency`` clients; the wall time and each request's ``stream_chat`` record."""
    todo = list(bodies)
    results: list[dict] = []

    async def client(http: httpx.AsyncClient):
        while todo:
            results.append(await stream_chat(http, url, todo.pop(0)))

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=concurrency + 2)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": results}


def failed(r: dict) -> bool:
    """A request counts as an error: non-200, an error chunk, an exception, or a stream without ``[DONE]``."""
    return r["error"] is not None or not r["done"]


def metric_value(text: str, name: str) -> float | None:
    """The value of an unlabelled sample ``name`` in Prometheus text, or None."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == name:
            return float(parts[1])
    return None


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (an interval ending where another starts does not overlap it)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                   key=lambda e: (e[0], e[1]))
    peak = open_ = 0
    for _, step in edges:
        open_ += step
        peak = max(peak, open_)
    return peak


def gaps_after(times: list[float], t0: float) -> list[float]:
    """Gaps between consecutive arrival times whose later arrival is after ``t0`` (the gap that spans
    ``t0`` is counted whole: it is what the client waited)."""
    return [b - a for a, b in zip(times, times[1:]) if b > t0]


def pick_schemas(folder: Path, k: int, max_chars: int, compiles) -> list[tuple[str, dict]]:
    """The first ``k`` schemas (sorted ``<subset>/<file>.json``) of at most ``max_chars`` characters that
    parse and that ``compiles(schema)`` accepts (a ``ValueError`` skips one): [(subset/file, schema)]."""
    out = [(name, schema) for name, _, schema, _ in itertools.islice(compiling_schemas(folder, max_chars, compiles), k)]
    if len(out) < k:
        sys.exit(f"only {len(out)} JSON schemas under {max_chars} characters compile in {folder}, need {k}")
    return out


def compile_schema(schema: dict) -> None:
    from decodekit.constraints import JsonSchema

    JsonSchema(schema)


def schema_name(file: str) -> str:
    """An OpenAI ``json_schema.name`` (letters, digits, ``_`` and ``-``, up to 64) for a schema file."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(file).stem)[:64]


def fit_prompt(pieces: list[str], target: int, count, wrap) -> str:
    """The longest prefix of the joined ``pieces`` whose ``count(wrap(text))`` is at most ``target`` tokens
    (binary search on characters); raises ``ValueError`` if the pieces are too short to reach it."""
    text = "\n\n".join(pieces)
    if count(wrap(text)) < target:
        raise ValueError(f"{len(pieces)} pieces make {count(wrap(text))} tokens, fewer than {target}")
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(wrap(text[:mid])) <= target:
            lo = mid
        else:
            hi = mid - 1
    return wrap(text[:lo])


async def get_metrics(http: httpx.AsyncClient, url: str) -> str:
    r = await http.get(f"{url}/metrics", timeout=30)
    r.raise_for_status()
    return r.text


# ---- case: 16 different schemas ----------------------------------------------------------------
async def case_schemas(url: str, model: str, picked: list[tuple[str, dict]], max_tokens: int, rounds: int) -> dict:
    """Each request has its own JSON schema; concurrency 16 vs one at a time, after a warm-up that builds
    every schema's strategy in the server (1 token each, all at once), rounds interleaved ABBA."""
    bodies = []
    for file, schema in picked:
        content = ("Write one JSON document that follows this JSON schema.\nSchema: "
                   f"{json.dumps(schema, separators=(',', ':'))}")
        bodies.append(chat_body(model, content, max_tokens, response_format={
            "type": "json_schema", "json_schema": {"name": schema_name(file), "schema": schema}}))
    warm = await run_bodies(url, [{**b, "max_tokens": 1} for b in bodies], len(bodies))
    runs: dict[int, list[dict]] = {1: [], len(bodies): []}
    order = [1, len(bodies)]
    for round_ in range(rounds):
        for c in order if round_ % 2 == 0 else order[::-1]:
            runs[c].append(await run_bodies(url, bodies, c))

    def tps(c):
        return median([sum(r["tokens"] for r in run["requests"]) / run["wall_s"] for run in runs[c]])

    reqs = [r for c in runs for run in runs[c] for r in run["requests"]]
    errors = sum(failed(r) for r in reqs)
    finishes: dict[str, int] = {}
    for r in reqs:
        finishes[str(r["finish"])] = finishes.get(str(r["finish"]), 0) + 1
    messages = sorted({str(r["error"]) for r in reqs + warm["requests"] if r["error"]})[:5]
    return {"schemas": [f for f, _ in picked], "max_tokens": max_tokens, "rounds": rounds,
            "serial_tokens_per_s": tps(1), "concurrent_tokens_per_s": tps(len(bodies)),
            "speedup": tps(len(bodies)) / tps(1) if tps(1) else None,
            "errors": errors, "warmup_errors": sum(failed(r) for r in warm["requests"]),
            "tokens": sum(r["tokens"] for r in reqs), "finish_reasons": finishes, "error_messages": messages}


# ---- case: max_tokens 2048, short answers ------------------------------------------------------
async def case_2048(url: str, model: str) -> dict:
    """16 concurrent short answers with ``max_tokens: 2048``: the server's peak batch (``/metrics``),
    and as a client-side cross-check the most streams receiving tokens at once and /health's peaks."""
    questions = [q["turns"][0] for q in spec_bench(per_category=BATCH_2048_CLIENTS, categories=["qa"])]
    bodies = [chat_body(model, f"{q} Answer in a few words.", 2048, stop=SHORT_STOPS)
              for q in questions[:BATCH_2048_CLIENTS]]
    polled = {"running": 0, "queue_length": 0}
    async with httpx.AsyncClient(timeout=30) as http:
        before = metric_value(await get_metrics(http, url), PEAK_GAUGE)
        task = asyncio.create_task(run_bodies(url, bodies, len(bodies)))
        while not task.done():  # /health every 0.1 s: running requests and the admission queue
            try:
                h = (await http.get(f"{url}/health")).json()
                polled = {k: max(polled[k], int(h.get(k, 0))) for k in polled}
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.1)
        run = await task
        after = metric_value(await get_metrics(http, url), PEAK_GAUGE)
    reqs = run["requests"]
    streaming = [(r["chunk_times"][0], r["chunk_times"][-1]) for r in reqs if r["chunk_times"]]
    tokens = [r["tokens"] for r in reqs]
    return {"clients": len(bodies), "max_tokens": 2048, "stop": SHORT_STOPS, "wall_s": run["wall_s"],
            "peak_batch_gauge": None if after is None else int(after),
            "gauge_before": None if before is None else int(before),
            "peak_streaming_client": peak_overlap(streaming),
            "peak_running_polled": polled["running"], "peak_queue_polled": polled["queue_length"],
            "answer_tokens_max": max(tokens, default=0), "answer_tokens_mean": sum(tokens) / max(1, len(tokens)),
            "errors": sum(failed(r) for r in reqs),
            "error_messages": sorted({str(r["error"]) for r in reqs if r["error"]})[:5]}


# ---- case: a long prompt while 8 streams decode ------------------------------------------------
def long_prompt(model: str, target: int, nonce: int) -> str:
    """~``target`` chat-template tokens of Spec-Bench articles behind a unique number, with a question."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from decodekit.models import hf_dir
    from decodekit.tokenizer import Tokenizer

    hf_logging.disable_progress_bar()
    tok = Tokenizer(AutoTokenizer.from_pretrained(hf_dir(model)))
    articles: list[str] = []
    for q in spec_bench(per_category=80, categories=["summarization", "rag"]):
        if sum(map(len, articles)) > 8 * target:  # enough text (English runs ~4-5 characters a token)
            break
        articles.append(q["turns"][0].removeprefix("Summarize: "))

    def wrap(text):
        return f"Document {nonce}.\n\n{text}\n\nWhat is the document above about? Answer in one sentence."

    return fit_prompt(articles, target, lambda c: len(tok.apply_chat_template([{"role": "user", "content": c}])),
                      wrap)


async def case_long(url: str, model: str, target: int, stream_tokens: int = 64, long_max_tokens: int = 16,
                    delay_s: float = 1.0) -> dict:
    """8 streams decode (greedy, ``ignore_eos``); once each has two tokens (so it is decoding and has a gap
    to compare with) and ``delay_s`` has passed since they were sent, or once one is a quarter done (fast
    hardware), a fresh long prompt goes in."""
    async with httpx.AsyncClient(timeout=30) as http:
        card = (await http.get(f"{url}/v1/models")).json()["data"][0]
        capacity = metric_value(await get_metrics(http, url), "decodekit_cache_capacity_tokens")
    context = int(card.get("max_model_len") or 8192)
    room = min(context, int(capacity) if capacity else context)
    target = min(target, context - long_max_tokens - 64, room - LONG_STREAMS * 200 - long_max_tokens)
    content = await asyncio.to_thread(long_prompt, model, target, time.time_ns())
    questions = [q["turns"][0] for q in spec_bench(per_category=1)][:LONG_STREAMS]  # the MT-Bench categories
    bodies = [chat_body(model, q, stream_tokens, ignore_eos=True) for q in questions]
    live = [{} for _ in bodies]
    limits = httpx.Limits(max_connections=LONG_STREAMS + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as http:
        t_start = time.perf_counter()
        streams = [asyncio.create_task(stream_chat(http, url, b, out)) for b, out in zip(bodies, live)]
        while not all(s.done() for s in streams):
            counts = [len(out.get("chunk_times", ())) for out in live]
            if (min(counts) >= 2 and time.perf_counter() - t_start >= delay_s) or max(counts) >= stream_tokens // 4:
                break
            await asyncio.sleep(0.01)
        t_send = time.perf_counter()
        at_send = [len(out.get("chunk_times", ())) for out in live]
        long_task = asyncio.create_task(stream_chat(http, url, chat_body(model, content, long_max_tokens)))
        results = await asyncio.gather(*streams)
        long_r = await long_task
    gaps = [g for r in results for g in gaps_after(r["chunk_times"], t_send)]
    before = [b - a for r in results for a, b in zip(r["chunk_times"], r["chunk_times"][1:]) if b <= t_send]
    first = long_r["chunk_times"][0] if long_r["chunk_times"] else None
    largest = sorted(((b - a, i, k + 1, a - t_send) for i, r in enumerate(results)
                      for k, (a, b) in enumerate(zip(r["chunk_times"], r["chunk_times"][1:])) if b > t_send),
                     reverse=True)[:5]
    return {"prompt_tokens_target": target, "prompt_tokens": long_r["prompt_tokens"],
            "cached_tokens": long_r["cached_tokens"], "context": context, "cache_capacity": capacity,
            "streams": len(bodies), "stream_max_tokens": stream_tokens, "sent_after_s": t_send - t_start,
            "stream_tokens_at_send": at_send, "gaps": len(gaps),
            "itl_p50_s": rounded(percentile(gaps, 50), 4), "itl_p99_s": rounded(percentile(gaps, 99), 4),
            "itl_max_s": rounded(max(gaps, default=None), 4),
            "itl_p50_before_s": rounded(percentile(before, 50), 4),
            "largest_gaps": [{"gap_s": round(g, 4), "stream": i, "token": k, "starts_after_send_s": round(t, 4)}
                             for g, i, k, t in largest],
            "long_ttft_s": None if first is None else first - t_send,
            "long_latency_s": long_r["end_at"] - t_send, "long_tokens": long_r["tokens"],
            "streams_done_after_send_s": max(r["end_at"] for r in results) - t_send,
            "errors": sum(failed(r) for r in [*results, long_r]),
            "error_messages": sorted({str(r["error"]) for r in [*results, long_r] if r["error"]})[:5]}


# ---- results ------------------------------------------------------------------------------------
def rounded(x, nd: int = 3):
    """``x`` rounded for the summary JSON; None for a missing or NaN figure."""
    if x is None or (isinstance(x, float) and x != x):
        return None
    return round(x, nd)


def levels_summary(args, levels_run: dict) -> tuple[dict, str, dict, bool]:
    """The levels case's summary fields (as before the other cases existed), table, details and verdict."""
    raw, num_requests = levels_run["raw"], levels_run["num_requests"]
    max_tokens, rounds = levels_run["max_tokens"], levels_run["rounds"]
    levels = {c: summarize(raw[c]) for c in LEVELS}
    speedup = levels[16]["tokens_per_s"] / levels[1]["tokens_per_s"]
    errors = sum(s["errors"] for s in levels.values())
    lost = sum(s["lost"] for s in levels.values())
    expected = num_requests * max_tokens * rounds
    short = sum(expected - s["tokens"] for s in levels.values() if s["tokens"] < expected)

    def by_level(key, nd=1):
        return {str(c): round(levels[c][key], nd) for c in LEVELS}

    met = speedup >= TARGET_SPEEDUP and errors == 0 and lost == 0 and short == 0
    summary = {
        "requests": num_requests, "max_tokens": max_tokens,
        "rounds": rounds, "tokens_per_s": by_level("tokens_per_s"), "requests_per_s": by_level("requests_per_s", 3),
        "ttft_p50_ms": by_level("ttft_p50_ms", 0), "ttft_p99_ms": by_level("ttft_p99_ms", 0),
        "latency_p50_ms": by_level("latency_p50_ms", 0), "latency_p99_ms": by_level("latency_p99_ms", 0),
        "errors": errors, "lost_requests": lost, "missing_tokens": short,
        "one_at_a_time_tokens_per_s": round(levels[1]["tokens_per_s"], 1),
        "batching_speedup_16": round(speedup, 2), "target_speedup_16": TARGET_SPEEDUP,
    }
    rows = [[c, levels[c]["requests_per_s"], levels[c]["tokens_per_s"], levels[c]["ttft_p50_ms"],
             levels[c]["ttft_p99_ms"], levels[c]["latency_p50_ms"], levels[c]["latency_p99_ms"], levels[c]["errors"]]
            for c in LEVELS]
    table = md_table(["clients", "requests/s", "output tokens/s", "TTFT p50 ms", "TTFT p99 ms", "latency p50 ms",
                      "latency p99 ms", "errors"], rows)
    table += (f"\n\n{num_requests} Spec-Bench chat requests x {max_tokens} tokens (greedy, ignore_eos) per level, "
              f"{rounds} interleaved round(s). Concurrency 1 = one at a time. Batching speedup at 16 clients: "
              f"**{speedup:.2f}x** (target >= {TARGET_SPEEDUP}x).")
    plot(levels, Path(args.out))
    return summary, table, {str(c): levels[c] for c in LEVELS}, met


def schemas_summary(s: dict) -> tuple[dict, str, bool]:
    speedup = rounded(s["speedup"], 2)
    fields = {"schemas_speedup": speedup, "schemas_errors": s["errors"],
              "schemas_tokens_per_s": {"1": rounded(s["serial_tokens_per_s"], 1),
                                       "16": rounded(s["concurrent_tokens_per_s"], 1)},
              "schemas_max_tokens": s["max_tokens"], "target_schemas_speedup": TARGET_SCHEMAS_SPEEDUP}
    met = speedup is not None and speedup >= TARGET_SCHEMAS_SPEEDUP and s["errors"] == 0
    table = md_table(["clients", "output tokens/s", "errors"],
                     [[1, s["serial_tokens_per_s"], "-"], [16, s["concurrent_tokens_per_s"], "-"]])
    table += (f"\n\n{len(s['schemas'])} requests, each with its own `response_format` JSON schema (the first "
              f"{len(s['schemas'])} JSONSchemaBench schemas of <= {SCHEMA_MAX_CHARS} characters that compile), "
              f"greedy, max_tokens {s['max_tokens']}, {s['rounds']} round(s) after a 1-token warm-up per schema. "
              f"16 concurrent vs one at a time: **{speedup}x** (target >= {TARGET_SCHEMAS_SPEEDUP}x), "
              f"{s['errors']} errors (target 0); finish reasons {s['finish_reasons']}.")
    return fields, table, met


def batch_2048_summary(s: dict) -> tuple[dict, str, bool]:
    peak = s["peak_batch_gauge"]
    fields = {"peak_batch_2048": peak, "peak_streaming_2048_client": s["peak_streaming_client"],
              "answer_tokens_2048_max": s["answer_tokens_max"], "errors_2048": s["errors"],
              "target_peak_batch_2048": TARGET_PEAK_BATCH}
    met = peak is not None and peak >= TARGET_PEAK_BATCH and s["errors"] == 0
    table = md_table(["figure", "value"], [
        [f"peak running sequences (`{PEAK_GAUGE}`)", peak],
        ["most streams receiving tokens at once (client side)", s["peak_streaming_client"]],
        ["peak running requests / queue length (/health every 0.1 s)",
         f"{s['peak_running_polled']} / {s['peak_queue_polled']}"],
        ["answer tokens, max / mean", f"{s['answer_tokens_max']} / {s['answer_tokens_mean']:.1f}"],
        ["errors", s["errors"]]])
    table += (f"\n\n{s['clients']} concurrent short answers (Spec-Bench qa, greedy, stop {s['stop']!r}) with "
              f"`max_tokens: 2048`, default KV cache. Peak batch **{peak}** (target {TARGET_PEAK_BATCH}).")
    return fields, table, met


def long_summary(s: dict) -> tuple[dict, str, bool]:
    p99 = rounded(s["itl_p99_s"])
    fields = {"long_prompt_itl_p99_s": p99, "long_prompt_ttft_s": rounded(s["long_ttft_s"]),
              "long_prompt_tokens": s["prompt_tokens"], "long_prompt_errors": s["errors"],
              "target_long_prompt_itl_p99_s": TARGET_LONG_ITL_P99_S}
    met = p99 is not None and p99 <= TARGET_LONG_ITL_P99_S and s["errors"] == 0
    table = md_table(["figure", "value"], [
        ["long prompt tokens (cached)", f"{s['prompt_tokens']} ({s['cached_tokens']})"],
        ["sent after the streams started, s", s["sent_after_s"]],
        ["stream tokens at that moment", s["stream_tokens_at_send"]],
        ["inter-token gaps after it: count", s["gaps"]],
        ["gap p50 / p99 / max, s", f"{rounded(s['itl_p50_s'])} / {p99} / {rounded(s['itl_max_s'])}"],
        ["gap p50 before it, s", rounded(s["itl_p50_before_s"])],
        ["long request time to first token, s", rounded(s["long_ttft_s"])],
        ["errors", s["errors"]]])
    table += (f"\n\n{s['streams']} streaming clients decoding {s['stream_max_tokens']} tokens (greedy, ignore_eos); a "
              f"fresh ~{s['prompt_tokens_target']}-token prompt arrives mid-decode. Inter-token gap p99 of the "
              f"streams from then on: **{p99} s** (target <= {TARGET_LONG_ITL_P99_S} s).")
    return fields, table, met


def report(args, cases: list[str], out: dict) -> None:
    summary: dict = {"bench": "server_load", "model": args.model, "cases": cases}
    sections, details, verdicts = [], {}, []
    if "levels" in out:
        fields, table, levels, met = levels_summary(args, out["levels"])
        summary.update(fields)
        sections.append(("Concurrency 1 / 4 / 16", table))
        details.update(levels)
        verdicts.append(met)
    for case, title, fn in (("schemas", "16 different JSON schemas", schemas_summary),
                            ("2048", "max_tokens 2048, short answers", batch_2048_summary),
                            ("long", "A long prompt while 8 streams decode", long_summary),
                            ("tools", "16 clients with their own tool sets", tools_summary)):
        if case in out:
            fields, table, met = fn(out[case])
            summary.update(fields)
            sections.append((title, table))
            details[case] = out[case]
            verdicts.append(met)
    summary["meets_target"] = all(verdicts)
    text = "\n\n".join(f"### {title}\n\n{table}" for title, table in sections)
    write_results("server_load", summary, text, args.out, details=details)


def plot(levels: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    out.mkdir(parents=True, exist_ok=True)
    xs = list(levels)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, [levels[c]["tokens_per_s"] for c in xs], "o-", label="decodekit serve")
    target = levels[1]["tokens_per_s"] * TARGET_SPEEDUP
    ax.axhline(target, ls="--", c="gray", label=f"{TARGET_SPEEDUP:g}x one at a time")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(c) for c in xs])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Server throughput vs concurrency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "server_load.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
