"""Load test of the OpenAI-compatible server: 1, 4 and 16 concurrent streaming clients.

Starts ``decodekit serve`` in a subprocess on a free local port, sends the same Spec-Bench chat
requests (greedy, ``ignore_eos`` so every request writes exactly ``max_tokens``) at each concurrency,
rounds interleaved, and reports requests/s, output tokens/s, time to first token and latency
percentiles and errors. Concurrency 1 is serving the requests one at a time: the batching speedup
is tokens/s at 16 clients over it (target >= 3x, zero errors, no lost requests).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import ROOT, md_table, median, parser, spec_bench, write_results

LEVELS = (1, 4, 16)
TARGET_SPEEDUP = 3.0


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--requests", type=int, default=None, help="requests per concurrency level and round")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    args = p.parse_args()
    num_requests = args.requests or 16
    max_tokens = args.max_tokens or 16
    rounds = args.rounds or (1 if args.quick else 2)
    prompts = [q["turns"][0] for q in spec_bench(per_category=4)][:num_requests]
    with Server(args) as url:
        asyncio.run(run_level(url, args.model, prompts[:2], 2, max_tokens))  # warm-up
        raw = {c: [] for c in LEVELS}
        for _ in range(rounds):
            for c in LEVELS:
                raw[c].append(asyncio.run(run_level(url, args.model, prompts, c, max_tokens)))
    report(args, raw, num_requests, max_tokens, rounds)


class Server:
    """``decodekit serve`` in a subprocess on a free port; yields its base URL."""

    def __init__(self, args):
        self.args = args
        self.proc = None

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "servers.openai", "--model", self.args.model, "--port", str(port),
               "--max-batch-size", "32", "--max-queue", "64", "--log-level", "warning"]
        if self.args.device:
            cmd += ["--device", self.args.device]
        if self.args.threads:
            cmd += ["--threads", str(self.args.threads)]
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
    t0 = time.perf_counter()
    out = {"ttft_s": None, "latency_s": None, "tokens": 0, "error": None, "done": False}
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
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                elif chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
                elif out["ttft_s"] is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    out["ttft_s"] = time.perf_counter() - t0
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["latency_s"] = time.perf_counter() - t0
    return out


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


def report(args, raw: dict, num_requests: int, max_tokens: int, rounds: int) -> None:
    levels = {c: summarize(raw[c]) for c in LEVELS}
    speedup = levels[16]["tokens_per_s"] / levels[1]["tokens_per_s"]
    errors = sum(s["errors"] for s in levels.values())
    lost = sum(s["lost"] for s in levels.values())
    expected = num_requests * max_tokens * rounds
    short = sum(expected - s["tokens"] for s in levels.values() if s["tokens"] < expected)

    def by_level(key, nd=1):
        return {str(c): round(levels[c][key], nd) for c in LEVELS}

    summary = {
        "bench": "server_load", "model": args.model, "requests": num_requests, "max_tokens": max_tokens,
        "rounds": rounds, "tokens_per_s": by_level("tokens_per_s"), "requests_per_s": by_level("requests_per_s", 3),
        "ttft_p50_ms": by_level("ttft_p50_ms", 0), "ttft_p99_ms": by_level("ttft_p99_ms", 0),
        "latency_p50_ms": by_level("latency_p50_ms", 0), "latency_p99_ms": by_level("latency_p99_ms", 0),
        "errors": errors, "lost_requests": lost, "missing_tokens": short,
        "one_at_a_time_tokens_per_s": round(levels[1]["tokens_per_s"], 1),
        "batching_speedup_16": round(speedup, 2), "target_speedup_16": TARGET_SPEEDUP,
        "meets_target": speedup >= TARGET_SPEEDUP and errors == 0 and lost == 0 and short == 0,
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
    write_results("server_load", summary, table, args.out, details={str(c): levels[c] for c in LEVELS})


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
