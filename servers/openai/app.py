"""The OpenAI-compatible FastAPI app: ``create_app(llm)``; ``ServerThread`` runs it on a local port.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /health``,
``GET /metrics``. One engine thread (``worker.EngineWorker``) does continuous batching.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from decodekit.servers.openai import errors, prompt_scores, protocol, responses_api, tools
from decodekit.servers.openai import responses as R
from decodekit.servers.openai.calls import Call, ClientDisconnected
from decodekit.servers.openai.errors import APIError, bad_value
from decodekit.servers.openai.limits import Limits
from decodekit.servers.openai.metrics import Metrics
from decodekit.servers.openai.protocol import ChatCompletionRequest, CompletionRequest
from decodekit.servers.openai.strategies import Models, StrategyCache
from decodekit.servers.openai.streaming import SSE_HEADERS, chat_stream, text_stream, tool_chat_stream
from decodekit.servers.openai.worker import EngineWorker
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class Server:
    """What the routes share: the model, the engine thread, counters and the strategy cache."""

    def __init__(self, llm, *, model_name: str | None, api_key: str | None, max_queue: int,
                 default_max_tokens: int, models: dict | None = None, small_model: str | None = None,
                 limits: Limits | None = None, metrics_auth: bool = False):
        if default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {default_max_tokens}")
        self.llm = llm
        self.model_name = model_name or llm.model_name.split(":")[0]
        self.api_key = api_key
        self.metrics_auth = metrics_auth
        self.default_max_tokens = default_max_tokens
        self.limits = limits or Limits()
        self.metrics = Metrics()
        llm.engine.serve_mode()  # requests arrive at any time: no idle step may prefill a whole long prompt
        self.worker = EngineWorker(llm, max_queue=max_queue, on_done=self._on_done)
        self.models = Models(llm, models, small_model)
        self.strategies = StrategyCache(on_evict=self._forget_strategy, models=self.models, limits=self.limits)
        self.created = int(time.time())

    @property
    def engine(self):
        return self.worker.engine

    def check_model(self, model: str) -> None:
        if model not in (self.model_name, self.llm.backend.name):
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def strategy_for(self, body, response_format=None, extra_guided: dict | None = None):
        guided = {**protocol.guided(body), **(extra_guided or {})}
        options = protocol.strategy_options(body)
        if not options and response_format is None and not any(v is not None for v in guided.values()):
            return None
        if isinstance(options, dict) and options.get("strategy") == "tree":
            if body.stream:
                raise bad_value("tree rollouts are returned whole: set stream to false", "stream")
            if body.n > 1 and "max_width" not in options:  # n trajectories: the tree's width
                options = {**options, "max_width": body.n}
        return await asyncio.to_thread(self.strategies.resolve, options, response_format, guided)

    def token_lister(self, body):
        """``R.token_list`` bound to this model's tokenizer when the request asks for provenance, else None."""
        if not protocol.wants_provenance(body):
            return None
        return partial(R.token_list, self.llm.tokenizer.token_str)

    def params(self, body, max_tokens, default, logprobs, prompt_len):
        return protocol.sampling_params(body, max_tokens=max_tokens, default_max_tokens=default,
                                        prompt_len=prompt_len, max_context=self.engine.backend.max_context,
                                        logprobs=logprobs)

    def _on_done(self, sub, completion) -> None:
        name = getattr(sub.request.strategy, "name", "strategy")
        self.metrics.record_done(name, completion, time.perf_counter() - sub.submitted_at)

    def _forget_strategy(self, strategy) -> None:
        # the engine keeps attached strategies alive; drop an evicted one so its draft models can be freed
        self.worker.call(lambda engine: engine.detach(strategy))


class Gate:
    """Pure ASGI middleware: a request id (``X-Request-Id``, echoed), the API-key check on /v1 routes
    (and /metrics with ``metrics_auth``), the body size limit (413) and request counts by status."""

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]
        headers = dict(scope.get("headers", []))
        request_id = _request_id(headers)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            if self._needs_key(scope["path"]) and not self._authorized(headers):
                error = APIError(401, "incorrect API key provided", code="invalid_api_key")
                await error.response()(scope, receive, send_status)
                return
            limit = self.server.limits.max_body_bytes
            body = await _read_body(receive, limit) if _content_length(headers) <= limit else None
            if body is None:
                await _too_large(limit)(scope, receive, send_status)
                return
            await self.app(scope, _replay(body, receive), send_status)
        finally:
            self.server.metrics.count_request(scope["path"], status[0])

    def _needs_key(self, path: str) -> bool:
        guarded = path.startswith("/v1") or (path == "/metrics" and self.server.metrics_auth)
        return bool(self.server.api_key) and guarded

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"")
        key = given[7:].strip() if given[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(key, self.server.api_key.encode())  # bytes: any header byte is just wrong


def _request_id(headers: dict) -> str:
    """The client's ``X-Request-Id`` when it is short and printable, else a fresh one."""
    given = headers.get(b"x-request-id", b"")
    if 0 < len(given) <= 64 and all(0x21 <= b < 0x7F for b in given):
        return given.decode()
    return uuid.uuid4().hex


def _content_length(headers: dict) -> int:
    value = headers.get(b"content-length", b"0")
    return int(value) if value.isdigit() else 0


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit`` bytes (chunked, or lying about its length)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """``receive`` that hands the app the body read already, then the connection's own messages."""
    sent = [False]

    async def replay():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _too_large(limit: int):
    return APIError(413, f"request body is larger than {limit} bytes", code="body_too_large").response()


def create_app(llm, *, model_name: str | None = None, api_key: str | None = None, max_queue: int = 256,
               default_max_tokens: int = 256, models: dict | None = None, small_model: str | None = None,
               limits: Limits | None = None, metrics_auth: bool = False) -> FastAPI:
    """The app around a loaded ``decodekit.LLM``; the engine thread runs while the app is up.

    ``models``: {name: Backend} the operator allows requests to use as a draft or second model
    (nothing else is ever loaded for a request); ``small_model``: the default small model of
    entropy switching (one of ``models``); ``limits``: per-request bounds; ``metrics_auth``: /metrics
    needs the API key too."""
    server = Server(llm, model_name=model_name, api_key=api_key, max_queue=max_queue,
                    default_max_tokens=default_max_tokens, models=models, small_model=small_model, limits=limits,
                    metrics_auth=metrics_auth)

    @asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        try:
            yield
        finally:
            server.worker.stop()

    app = FastAPI(title="decodekit", lifespan=lifespan)
    app.state.server = server
    errors.install(app)
    app.add_middleware(Gate, server=server)
    _routes(app, server)
    return app


def _routes(app: FastAPI, server: Server) -> None:
    _page_routes(app)

    @app.get("/health")
    async def health():
        worker = server.worker
        stuck = worker.step_running_for()
        status = "down" if not worker.alive else "stalled" if stuck > server.limits.step_limit_s else "ok"
        body = {"status": status, "model": server.model_name, "queue_length": worker.queue_length,
                "running": worker.num_running, "last_step_s": round(worker.last_step_s, 4),
                "step_running_s": round(stuck, 3)}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.worker), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        server.check_model(model)
        return _model_card(server)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _chat(server, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _text(server, body, request)

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await responses_api.handle(server, await _json_object(request), request, start_chat)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await asyncio.to_thread(prompt_scores.tokenize, server, await _json_object(request))

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return prompt_scores.tokenizer_info(server)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return prompt_scores.detokenize(server, await _json_object(request))


PAGE_FILES = {"playground.js": "text/javascript", "playground.css": "text/css", "index.html": "text/html"}


def _page_routes(app: FastAPI) -> None:
    """The playground at ``/``: static files shipped in the package, read once (no path from the client
    reaches the file system)."""
    folder = Path(__file__).parent / "static"
    pages = {name: (folder / name).read_bytes() for name in PAGE_FILES}

    def page(name: str) -> Response:
        return Response(pages[name], media_type=PAGE_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def index():
        return page("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in pages or name == "index.html":
            raise APIError(404, f"no file {name!r} here", code="not_found")
        return page(name)


def _model_card(server: Server) -> dict:
    return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "decodekit",
            "max_model_len": server.engine.backend.max_context}


async def start_chat(server: Server, body: ChatCompletionRequest):
    """Check a chat request, render its messages (and tools), pick its strategy and submit it:
    ``(body, call, tool plan)`` (shared by /v1/chat/completions and /v1/responses)."""
    server.check_model(body.model)
    protocol.check_chat(body)
    plan = tools.plan(body, protocol.chat_messages(body), server.limits)
    spec = plan.spec()  # passed only with tools: strategy_for keeps its two-argument form otherwise
    strategy = await (server.strategy_for(body, body.response_format, extra_guided=spec) if spec is not None
                      else server.strategy_for(body, body.response_format))
    protocol.check_penalties(body, strategy, server.engine)
    body = _one_request_per_tree(body, strategy)
    top = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    make = partial(server.params, body, max_tokens, server.default_max_tokens, top)
    call = Call(server, [plan.messages], make, strategy, stream=bool(body.stream))
    await call.start()
    return body, call, plan


async def _chat(server: Server, body: ChatCompletionRequest, request: Request):
    body, call, plan = await start_chat(server, body)
    tokens = server.token_lister(body)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        base = R.header("chat.completion.chunk", response_id, server.model_name)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if plan.active:
            gen = tool_chat_stream(call, base, n=body.n, include_usage=include_usage, plan=plan)
        else:
            gen = chat_stream(call, base, n=body.n, want_logprobs=body.logprobs, include_usage=include_usage,
                              tokens=tokens)
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        done = await call.collect(request)
    except ClientDisconnected:
        return Response(status_code=499)
    response = R.chat_response(response_id, server.model_name, done[0][1], body.logprobs, tokens)
    return JSONResponse(tools.answer_choices(plan, response, done[0][1]))


async def _json_object(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise APIError(422, "request body is not valid JSON", code="json_invalid") from None
    if not isinstance(body, dict):
        raise APIError(422, "request body must be a JSON object", code="invalid_body")
    if "model" in body:
        request.app.state.server.check_model(body["model"])
    return body


async def _scored_only(server: Server, body: CompletionRequest, prompts: list):
    """``max_tokens: 0``: score the prompts, generate nothing."""
    from decodekit.servers.openai.calls import encode

    encoded = await asyncio.to_thread(lambda: [encode(server, p) for p in prompts])
    scores = await prompt_scores.score_all(server, [ids for _, ids in encoded], prompt_scores.top_wanted(body))
    return JSONResponse(prompt_scores.scoring_response(f"cmpl-{uuid.uuid4().hex}", server.model_name, body,
                                                       server.llm.tokenizer.token_str, encoded, scores, body.n))


async def _text(server: Server, body: CompletionRequest, request: Request):
    server.check_model(body.model)
    protocol.check_completion(body)
    prompt_scores.check(body, protocol.MAX_LOGPROBS)
    prompts = protocol.completion_prompts(body)
    if body.max_tokens == 0:
        return await _scored_only(server, body, prompts)
    top_n = prompt_scores.top_wanted(body)
    strategy = await server.strategy_for(body)
    protocol.check_penalties(body, strategy, server.engine)
    width = body.n
    body = _one_request_per_tree(body, strategy)
    tokens = server.token_lister(body)
    make = partial(server.params, body, body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, body.logprobs)
    call = Call(server, prompts, make, strategy, stream=bool(body.stream))
    await call.start()
    encoded = [(sub.prompt_text, sub.prompt_ids) for sub in call.subs]
    scores = None
    if top_n is not None:
        try:
            scores = await prompt_scores.score_all(server, [ids for _, ids in encoded], top_n)
        except BaseException:
            call.close(cancelled=False)
            raise
    token_str = server.llm.tokenizer.token_str
    response_id = f"cmpl-{uuid.uuid4().hex}"
    want_logprobs = body.logprobs is not None
    if body.stream:
        base = R.header("text_completion", response_id, server.model_name)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        echoed = None
        if scores is not None and body.echo and want_logprobs:
            echoed = {i: prompt_scores.echo_logprobs(token_str, ids, scores[i]) for i, (_, ids) in enumerate(encoded)}
        gen = text_stream(call, base, n=body.n, echo=body.echo, want_logprobs=want_logprobs,
                          include_usage=include_usage, tokens=tokens, echo_logprobs=echoed)
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        done = await call.collect(request)
    except ClientDisconnected:
        return Response(status_code=499)
    width = getattr(getattr(strategy, "config", None), "max_width", width)
    response = R.text_response(response_id, server.model_name, done, width, body.echo, want_logprobs, tokens)
    if scores is not None:
        response = prompt_scores.add_to_choices(response, body, token_str, encoded, scores, width)
    return JSONResponse(response)


def _one_request_per_tree(body, strategy):
    """A tree rollout is one engine request (n = 1) whose trajectories are the choices."""
    return body.model_copy(update={"n": 1}) if getattr(strategy, "name", None) == "tree" else body


class ServerThread:
    """Runs an app with uvicorn in a background thread on ``host`` and a free (or given) port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
