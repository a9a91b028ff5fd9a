"""Hostile requests against the local server while a probe client keeps asking for one token.

One server (default model, API key set) on loopback. For each abusive case, a probe client sends
1-token chat requests back to back while the case's requests run; the benchmark reports the
probe's p99 latency per case, the statuses the case got against the expected ones, whether it hung
(no answer within 120 s), 5xx answers, and ``/health`` after it. Cases: catastrophic backtracking in
a regex and in a grammar terminal, draft / second models named by path or hub id, 9,000 and 20,000
choices, the masked sampler on a check-based constraint, a first ``json_object``, 1,000 particles,
a 10 MB prompt and a 20 MB unknown field, a fresh 8,000-token prompt (2,000 with ``--quick``), a
schema nested 200 deep, a lone surrogate, a non-UTF-8 API key, 1,000 stop strings, 300 prompts in
one call, 16 streams of which half disconnect; and the server's memory after 100 requests with
distinct strategy options against after the first.
"""

from __future__ import annotations

import threading
import time

import httpx
from decodekit.bench.common import md_table, parser, write_results

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
HELLO = [{"role": "user", "content": "Say hello."}]


class Probe:
    """Back-to-back 1-token requests; latencies with their start times."""

    def __init__(self, url: str, model: str):
        self.url, self.model = url, model
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    client.post(f"{self.url}/v1/chat/completions", headers=AUTH,
                                json={"model": self.model, "messages": HELLO, "max_tokens": 1, "temperature": 0})
                except httpx.HTTPError:
                    pass
                self.samples.append((t0, time.perf_counter() - t0))

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(150)

    def p99_ms(self, since: float, until: float) -> float | None:
        lat = sorted(d for t, d in self.samples if since <= t <= until or (t < since and t + d > since))
        if not lat:
            return None
        return round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)


def chat(url, model, body=None, *, content=None, headers=None, path="/v1/chat/completions", timeout=120):
    payload = None if content is not None else {"model": model, "messages": HELLO, "max_tokens": 4, **(body or {})}
    try:
        r = httpx.post(f"{url}{path}", json=payload, content=content, headers={**AUTH, **(headers or {})},
                       timeout=timeout)
        return r.status_code
    except httpx.TimeoutException:
        return "hang"


def cases(model: str, quick: bool, long_prompt: str) -> dict:
    """name -> (expected statuses, function(url) -> list of statuses)."""
    nested = {"type": "object"}
    for _ in range(200):
        nested = {"type": "object", "properties": {"x": nested}}
    one = lambda body=None, **kw: lambda url: [chat(url, model, body, **kw)]  # noqa: E731
    surrogate = b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "a\\ud800"}]}'
    return {
        "regex_backtracking": ({200}, one({"guided_regex": "(?=a{12})(a|a|a|a)+b", "max_tokens": 16})),
        "grammar_backtracking": ({200}, one({"guided_grammar": "start: W\nW: /(?=a{12})(a|a|a|a)+b/",
                                             "max_tokens": 16})),
        "draft_path": ({400}, one({"decodekit": {"strategy": "speculative", "draft": "/etc"}})),
        "draft_hub_id": ({400}, one({"decodekit": {"strategy": "speculative", "draft": "org/some-model"}})),
        "draft_other_model": ({400}, one({"decodekit": {"strategy": "speculative", "draft": "gemma3-270m"}})),
        "entropy_small_path": ({400}, one({"decodekit": {"strategy": "entropy", "small": "/etc"}})),
        "choice_9000": ({200}, one({"guided_choice": [f"option {i}" for i in range(9000)], "max_tokens": 6})),
        "choice_20000": ({400}, one({"guided_choice": [f"option {i}" for i in range(20000)]})),
        "masked_check_based": ({400}, one({"guided_grammar": 'start: "a"+', "decodekit": {"sampler": "masked"}})),
        "masked_regex_automaton": ({200}, one({"guided_regex": "[ab]*a[ab]{6}", "max_tokens": 8,
                                               "decodekit": {"sampler": "masked"}})),
        "json_object_first": ({200}, one({"response_format": {"type": "json_object"}, "max_tokens": 16})),
        "particles_1000": ({400}, one({"guided_regex": "a+", "decodekit": {"num_particles": 1000}})),
        "prompt_10mb": ({413}, one({"messages": [{"role": "user", "content": "x" * 10_000_000}]})),
        "unknown_field_20mb": ({413}, one({"junk": "x" * 20_000_000})),
        "long_prompt_fresh": ({200}, one({"messages": [{"role": "user", "content": long_prompt}], "max_tokens": 1},
                                         timeout=600)),
        "schema_nested_200": ({400}, one({"response_format": {"type": "json_schema",
                                                              "json_schema": {"name": "n", "schema": nested}}})),
        "lone_surrogate": ({400}, one(content=surrogate)),
        "api_key_not_utf8": ({401}, one(content=b"{}", headers={"Authorization": "", "x-api-key": b"\xff\xfe"})),
        "stop_1000": ({400}, one({"stop": [f"s{i}" for i in range(1000)]})),
        "prompts_300": ({400}, one({"prompt": ["hi"] * 300, "max_tokens": 1}, path="/v1/completions")),
        "malformed_json": ({422}, one(content=b"{not json")),
        "streams_16_half_leave": ({200}, lambda url: streams(url, model)),
    }


def streams(url: str, model: str) -> list:
    statuses = []

    def one(i: int):
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", headers=AUTH, timeout=120,
                              json={"model": model, "messages": HELLO, "max_tokens": 32, "stream": True,
                                    "seed": i, "ignore_eos": True}) as r:
                statuses.append(r.status_code)
                for n, _ in enumerate(r.iter_lines()):
                    if i % 2 and n >= 2:
                        return
        except httpx.TimeoutException:
            statuses.append("hang")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def long_text(llm, tokens: int) -> str:
    """A fresh prompt of about ``tokens`` tokens (a random start, so no prefix is cached)."""
    import random

    words = [f"w{random.randrange(10**6)}" for _ in range(tokens)]
    text = " ".join(words)
    while len(llm.tokenizer.encode(text)) > tokens:
        words = words[: int(len(words) * 0.95)]
        text = " ".join(words)
    return text


def rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def option_memory(url: str, model: str, count: int) -> float:
    """Memory after ``count`` requests with distinct speculative options over memory after the first."""
    def run(i):
        options = {"strategy": "speculative", "draft": "int8", "num_draft_tokens": 1 + i % 16, "max_ngram": 1 + i // 16}
        chat(url, model, {"decodekit": options, "max_tokens": 2})

    run(0)
    first = rss_kb()
    for i in range(1, count):
        run(i)
    return rss_kb() / first


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    from decodekit.servers.openai.app import ServerThread, create_app

    from decodekit.api import LLM

    llm = LLM(args.model, device=args.device)
    app = create_app(llm, model_name=args.model, api_key=KEY)
    thread = ServerThread(app).start()
    url = thread.url
    chat(url, args.model)  # warm-up
    results = {}
    probe = Probe(url, args.model).start()
    time.sleep(2)
    baseline = probe.p99_ms(0, time.perf_counter())
    for name, (expected, run) in cases(args.model, args.quick, long_text(llm, 2000 if args.quick else 8000)).items():
        t0 = time.perf_counter()
        statuses = run(url)
        t1 = time.perf_counter()
        health = httpx.get(f"{url}/health", timeout=30)
        results[name] = {"statuses": sorted(set(map(str, statuses))), "expected": sorted(map(str, expected)),
                         "as_expected": set(statuses) <= expected, "hang": "hang" in statuses,
                         "errors_5xx": sum(isinstance(s, int) and s >= 500 for s in statuses),
                         "seconds": round(t1 - t0, 2), "probe_p99_ms": probe.p99_ms(t0, t1),
                         "healthy_after": health.status_code == 200}
        print(name, results[name], flush=True)
    probe.stop()
    growth = option_memory(url, args.model, 20 if args.quick else 100)
    thread.stop()
    p99 = {k: v["probe_p99_ms"] for k, v in results.items()}
    summary = {
        "bench": "server_abuse", "cases": len(results), "hangs": sum(v["hang"] for v in results.values()),
        "server_errors_5xx": sum(v["errors_5xx"] for v in results.values()),
        "unexpected_status": {k: v["statuses"] for k, v in results.items() if not v["as_expected"]},
        "healthy_after_every_case": all(v["healthy_after"] for v in results.values()),
        "probe_p99_ms": p99, "worst_probe_p99_ms": max((v for v in p99.values() if v is not None), default=None),
        "probe_p99_ms_idle": baseline, "memory_after_100_options_vs_first": round(growth, 3),
    }
    header = ["case", "statuses", "expected", "hang", "5xx", "seconds", "probe p99 ms", "healthy after"]
    rows = [[k, " ".join(v["statuses"]), " ".join(v["expected"]), v["hang"], v["errors_5xx"], v["seconds"],
             v["probe_p99_ms"], v["healthy_after"]] for k, v in results.items()]
    write_results("server_abuse", summary, md_table(header, rows), args.out, details=results)


if __name__ == "__main__":
    main()
