"""The OpenAI-compatible server, driven by the real ``openai`` client against SmolLM2 on a free local port."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest
from decodekit.servers.openai.app import ServerThread, create_app
from decodekit.servers.openai.strategies import json_constraint_available

from decodekit.api import LLM

pytestmark = pytest.mark.real

MODEL = "smollm2-135m"
KEY = "test-key"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def srv(smollm):
    llm = LLM(backend=smollm, max_batch_size=32)
    app = create_app(llm, model_name=MODEL, api_key=KEY, max_queue=64)
    thread = ServerThread(app).start()
    server = app.state.server
    yield SimpleNamespace(url=thread.url, server=server, worker=server.worker)
    thread.stop()
    assert smollm.cache.num_open_handles == 0


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=600)


def on_engine(srv, fn):
    """Run ``fn(engine)`` on the engine thread between steps."""
    return srv.worker.call(fn).result(timeout=600)


def assert_cache_clean(srv):
    """No request left, no handle open, every slot free or held by an evictable cache node."""
    deadline = time.monotonic() + 120
    while srv.worker._active and time.monotonic() < deadline:
        time.sleep(0.05)

    def check(engine):
        cache = engine.backend.cache
        cache.check_integrity()
        return cache.num_open_handles, len(engine.running), len(engine.waiting), cache.available(), cache.capacity

    handles, running, waiting, available, capacity = on_engine(srv, check)
    assert (handles, running, waiting) == (0, 0, 0)
    assert available == capacity


def greedy_reference(srv, prompt, max_tokens):
    """Plain decodekit greedy output, computed on the engine thread with a separate engine."""
    return on_engine(srv, lambda e: LLM(backend=e.backend).generate(prompt, max_new_tokens=max_tokens,
                                                                    temperature=0).text)


# ---- happy paths ----------------------------------------------------------------------------------
def test_models_and_health(srv, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{srv.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_non_streaming_matches_engine_and_usage_adds_up(srv, client):
    r = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy_reference(srv, CAPITAL, 12)
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    prompt_ids = srv.server.llm.tokenizer.apply_chat_template(CAPITAL)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_stream_equals_non_stream_with_usage_chunk(client):
    kwargs = dict(model=MODEL, prompt="The three primary colors are", max_tokens=16, temperature=0.9, seed=11)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_ends_with_done(srv):
    body = {"model": MODEL, "messages": CAPITAL, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: "):])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content") or "" for x in lines[:-1])
    assert text == greedy_reference(srv, CAPITAL, 6)


def test_n2_seed_and_reproducibility(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
                  temperature=1.0, n=2, seed=3)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    c = client.chat.completions.create(**{**kwargs, "seed": 4})
    texts = [ch.message.content for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1]
    assert texts == [ch.message.content for ch in b.choices]  # same seed, same samples
    assert texts[0] != texts[1]  # the two choices are independent samples
    assert texts != [ch.message.content for ch in c.choices]
    assert 2 <= a.usage.completion_tokens <= 2 * 12  # usage counts both choices


def test_stop_string(client):
    prompt = "Count: 1, 2, 3, 4, 5, 6"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert "8" in free, free
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=["8"])
    assert stopped.choices[0].text == free[: free.index("8")]
    assert stopped.choices[0].finish_reason == "stop"


def test_batched_prompts_get_their_own_choices(srv, client):
    r = client.completions.create(model=MODEL, prompt=["The sky is", "Two plus two is"], max_tokens=4, temperature=0)
    solo = client.completions.create(model=MODEL, prompt="Two plus two is", max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[1].text == solo.choices[0].text
    encode = srv.server.llm.tokenizer.encode
    assert r.usage.prompt_tokens == len(encode("The sky is")) + len(encode("Two plus two is"))


def test_logprobs_chat_and_completions(client):
    r = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.token == t.top_logprobs[0].token  # greedy picks the most likely token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
    text = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=5, temperature=0,
                                     logprobs=2, echo=True).choices[0]
    assert text.text.startswith("Hello, my name is")
    # echo: the prompt's tokens first (the first without a log-probability, as OpenAI), then the 5 generated
    num_prompt = len(text.logprobs.tokens) - 5
    assert num_prompt == 5 and len(text.logprobs.token_logprobs) == num_prompt + 5
    assert text.logprobs.token_logprobs[0] is None and text.logprobs.top_logprobs[0] is None
    assert all(len(top) == 2 for top in text.logprobs.top_logprobs[1:])
    assert text.logprobs.text_offset[0] == 0 and text.logprobs.text_offset[num_prompt] == len("Hello, my name is")


def test_speculative_strategy_is_lossless(srv, client):
    plain = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=12, temperature=0)
    spec = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=12, temperature=0,
                                          extra_body={"decodekit": {"strategy": "speculative", "draft": "ngram"}})
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert "tokens_drafted" in spec.model_extra["decodekit"]
    assert "decodekit_strategy_stat_total" in httpx.get(f"{srv.url}/metrics").text


@pytest.mark.skipif(not json_constraint_available(),
                    reason="decodekit.constraints (JsonSchema + Constrained strategy) has not landed")
def test_json_schema_response_format(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give the capital of France and its population as JSON."}],
        max_tokens=48, temperature=0.7, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


@pytest.mark.skipif(not json_constraint_available(),
                    reason="decodekit.constraints (JsonSchema + Constrained strategy) has not landed")
def test_speculative_under_a_json_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    messages = [{"role": "user", "content": "Name the capital of France as JSON."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                           response_format=fmt)
    fast = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                          response_format=fmt,
                                          extra_body={"decodekit": {"strategy": "speculative", "draft": "ngram",
                                                                    "sampler": "awrs"}})
    assert fast.choices[0].message.content == plain.choices[0].message.content
    jsonschema.validate(json.loads(fast.choices[0].message.content), schema)
    assert "forced_tokens" in fast.model_extra["decodekit"]
    with pytest.raises(openai.BadRequestError, match="composes with decodekit.strategy"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, response_format=fmt,
                                       extra_body={"decodekit": {"strategy": "tree"}})


# ---- concurrency ----------------------------------------------------------------------------------
def test_32_concurrent_streams_batch_and_stay_independent(srv, client):
    prompts = ["Name a fruit.", "What is 2+2?", "Say hello in French.", "Name a color."]
    solo = {p: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=6,
                                              temperature=0).choices[0].message.content for p in prompts}
    steps0, calls0 = srv.worker.stats.num_steps, srv.server.engine.backend.num_forward_calls
    srv.worker.stats.max_running_seqs = 0

    async def one(aclient, p):
        stream = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                                       max_tokens=6, temperature=0, stream=True)
        return p, "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=600) as aclient:
            return await asyncio.gather(*[one(aclient, prompts[i % 4]) for i in range(32)])

    results = asyncio.run(run_all())
    assert len(results) == 32
    for p, text in results:
        assert text == solo[p], p
    steps = srv.worker.stats.num_steps - steps0
    calls = srv.server.engine.backend.num_forward_calls - calls0
    assert steps < 32 * 6 // 3 and calls < 32 * 6 // 3  # one at a time would take >= 192 steps
    assert srv.worker.stats.max_running_seqs >= 16
    assert_cache_clean(srv)


def test_client_disconnect_cancels_and_frees_slots(srv, client):
    cancelled0 = srv.server.metrics.cancelled
    stream = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=400, temperature=0.8,
                                            stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got >= 3:
            break
    stream.close()
    deadline = time.monotonic() + 120
    while srv.server.metrics.cancelled == cancelled0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.server.metrics.cancelled == cancelled0 + 1
    assert_cache_clean(srv)
    assert srv.worker.stats.num_aborted >= 1
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None


def test_a_failing_request_gets_500_and_the_others_finish(srv, client, monkeypatch, exploding):
    original = srv.server.strategy_for

    async def strategy_for(body, response_format=None):
        return exploding if body.user == "explode" else await original(body, response_format)

    monkeypatch.setattr(srv.server, "strategy_for", strategy_for)
    stream = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=24, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))  # the good request is running when the bad one fails beside it
    status, body = _status(lambda: client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=8,
                                                                  user="explode"))
    assert status == 500 and "boom" not in body["message"] and "server log" in body["message"]  # no exception text
    rest = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert first is not None and "".join(rest)
    assert_cache_clean(srv)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None


# ---- errors ---------------------------------------------------------------------------------------
def _status(fn):
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"}, body
    return e.value.status_code, body


def test_error_statuses_and_server_keeps_serving(srv, client):
    ok = dict(model=MODEL, prompt="Hello", max_tokens=2)
    wrong_key = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
    assert _status(lambda: wrong_key.completions.create(**ok))[0] == 401
    status, body = _status(lambda: client.completions.create(**{**ok, "model": "gpt-4"}))
    assert (status, body["param"]) == (404, "model")
    status, body = _status(lambda: client.completions.create(**{**ok, "max_tokens": -1}))
    assert (status, body["param"]) == (400, "max_tokens")
    assert _status(lambda: client.completions.create(**{**ok, "top_p": 0}))[0] == 400
    status, body = _status(lambda: client.completions.create(**{**ok, "extra_body": {"decodekit": {"strategy": "x"}}}))
    assert status == 400 and "speculative" in body["message"]
    status, body = _status(lambda: client.completions.create(**{**ok, "prompt": [1] * 9000}))
    assert (status, body["code"]) == (413, "context_length_exceeded")
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    status, body = _status(lambda: client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=2,
                                                                  response_format=bad_schema))
    assert status == 400 and "schema" in body["message"]
    assert _status(lambda: client.completions.create(**{**ok, "max_tokens": "many"}))[0] == 422
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{srv.url}/v1/chat/completions", content=b'{"model": "x", "messages": [', headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "json_invalid"
    r = httpx.get(f"{srv.url}/v1/nowhere", headers=headers)
    assert r.status_code == 404 and "error" in r.json()
    assert client.completions.create(**ok).usage.completion_tokens >= 1
    assert_cache_clean(srv)


def test_full_queue_answers_429(srv, client):
    gate = threading.Event()
    srv.worker.call(lambda engine: gate.wait(30))  # hold the engine thread so submissions wait
    old, srv.worker.max_queue = srv.worker.max_queue, 1
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.completions.create, model=MODEL, prompt="Hi", max_tokens=2)
            deadline = time.monotonic() + 60
            while srv.worker.queue_length < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            status, body = _status(lambda: client.completions.create(model=MODEL, prompt="Hi", max_tokens=2))
            assert (status, body["code"]) == (429, "queue_full")
            gate.set()
            assert first.result(timeout=600).usage.completion_tokens >= 1
    finally:
        srv.worker.max_queue = old
        gate.set()
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert "decodekit_requests_rejected_total 1" in metrics
    assert 'decodekit_requests_total{endpoint="/v1/completions",status="429"} 1' in metrics
    for name in ("decodekit_cache_hit_rate", "decodekit_queue_length", "decodekit_completion_tokens_total"):
        assert f"\n{name} " in metrics


# ---- one engine step for every strategy ------------------------------------------------------------
def _schemas(k: int) -> list[dict]:
    return [{"type": "object", "properties": {f"field{i}": {"type": "integer"}, "name": {"type": "string",
                                                                                       "maxLength": 8}},
             "required": [f"field{i}"], "additionalProperties": False} for i in range(k)]


def test_16_clients_with_16_schemas_share_steps(srv, client):
    """Each client sends its own JSON schema (its own strategy instance): the engine still runs one
    main-model forward per step for all of them, and every answer is valid."""
    before = on_engine(srv, lambda engine: engine.stats())

    def one(schema):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Reply with a small JSON object."}], max_tokens=40,
            temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        return r.choices[0], schema

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, _schemas(16)))
    for choice, schema in results:
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), schema)
    assert sum(c.finish_reason == "stop" for c, _ in results) >= 12
    after = on_engine(srv, lambda engine: engine.stats())
    assert after["main_forwards"] - before["main_forwards"] <= after["steps"] - before["steps"]
    assert after["peak_running"] >= 8
    assert_cache_clean(srv)


def test_server_serves_a_tree_rollout_beside_chat(srv, client):
    """``n`` with ``"decodekit": {"strategy": "tree"}``: trajectories as choices, tree statistics in the
    response; a chat request running at the same time is unaffected."""
    chat_solo = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=12, temperature=0)

    def rollout():
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name three animals."}], max_tokens=16, n=4, seed=3,
            temperature=1.0, extra_body={"decodekit": {"strategy": "tree", "segment_len": 4, "first_split": 2}})

    with ThreadPoolExecutor(2) as pool:
        tree_future = pool.submit(rollout)
        chat = pool.submit(client.chat.completions.create, model=MODEL, messages=CAPITAL, max_tokens=12,
                           temperature=0).result()
        tree = tree_future.result()
    assert chat.choices[0].message.content == chat_solo.choices[0].message.content
    assert len(tree.choices) == 4 and all(c.message.content for c in tree.choices)
    extra = tree.model_extra["decodekit"]
    assert extra["tree"]["num_trajectories"] == 4 and len(extra["rollout"]["trajectories"]) == 4
    r = httpx.post(f"{srv.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, "messages": CAPITAL, "stream": True, "decodekit": {"strategy": "tree"}})
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
    assert_cache_clean(srv)
