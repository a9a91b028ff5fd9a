"""One API call on the asyncio side: its engine submissions, their replies, and cancellation.

A call has one submission per prompt (chat: one; completions: one per prompt in a batch); all
share one asyncio queue the engine thread writes to. A call that ends early (client gone, error)
aborts what is still running, which frees its cache slots.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from decodekit.servers.openai.errors import APIError, bad_value
from decodekit.servers.openai.worker import QueueFull, Submission


def encode(server, prompt) -> tuple[str, list[int]]:
    """(text, token ids) of one prompt: text, chat messages or token ids; 400 / 413 for bad input."""
    llm = server.llm
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = llm.engine.backend.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise bad_value(f"prompt token ids must be in [0, {vocab})", "prompt")
        return llm.engine.tokenizer.decode(prompt), list(prompt)
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    param = "prompt" if isinstance(prompt, str) else "messages"
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_value(f"{param} is not valid Unicode text: {e.reason} at character {e.start}", param) from None
    chars = sum(len(t) for t in texts)
    limit = llm.engine.backend.max_context * 32  # no tokenizer packs 32 characters per token: over the context
    if chars > limit:
        raise APIError(413, f"prompt has {chars} characters, far over the model's context of "
                            f"{llm.engine.backend.max_context} tokens", param=param, code="context_length_exceeded")
    try:
        return llm.encode_prompt(prompt)
    except ValueError as e:
        raise bad_value(str(e), param) from None


class ClientDisconnected(Exception):
    """The client went away before the call finished (its requests are aborted)."""


class Call:
    def __init__(self, server, prompts: list, make_params, strategy, stream: bool = True):
        """``make_params(prompt_len) -> SamplingParams`` runs on the engine thread once the prompt is tokenized;
        ``stream=False``: only completions are read (a request-level engine may then skip per-step events)."""
        self.stream = stream
        self.server = server
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        loop = asyncio.get_running_loop()
        base = uuid.uuid4().hex[:16]
        self.subs = [Submission(f"{base}-{i}", p, make_params, strategy, loop, self.queue, offset=i,
                               stream=stream)
                     for i, p in enumerate(prompts)]
        self.done: dict[str, object] = {}  # request_id -> Completion
        self._backlog: list[tuple] = []
        self._submitted: list[Submission] = []
        self.cancelled = False

    async def start(self) -> None:
        """Tokenize every prompt (here, off the engine thread), submit them and wait until each is
        queued; raises ``APIError``."""
        worker = self.server.worker
        if not worker.alive:
            raise APIError(503, "the engine is not running", code="engine_unavailable")
        encoded = await asyncio.to_thread(lambda: [encode(self.server, sub.prompt) for sub in self.subs])
        for sub, (text, ids) in zip(self.subs, encoded):
            sub.prompt_text, sub.prompt_ids = text, ids
        try:
            for sub in self.subs:
                worker.submit(sub)
                self._submitted.append(sub)
        except QueueFull as e:
            self.server.metrics.count("rejected_queue_full")
            self.close(cancelled=False)
            raise APIError(429, f"server is busy: {e}; retry later", code="queue_full") from None
        accepted = 0
        while accepted < len(self.subs):
            kind, sub, payload = await self.queue.get()
            if kind == "error":
                self.close(cancelled=False)
                raise payload
            if kind == "accepted":
                accepted += 1
            else:
                self._backlog.append((kind, sub, payload))

    async def messages(self):
        """Yield ``("event", sub, TokenEvent)`` and ``("done", sub, Completion)`` until every prompt is done."""
        while len(self.done) < len(self.subs):
            if self._backlog:
                kind, sub, payload = self._backlog.pop(0)
            else:
                kind, sub, payload = await self.queue.get()
            if kind == "error":
                self.close(cancelled=False)
                raise payload
            if kind == "disconnected":
                raise ClientDisconnected
            if kind == "event" and self.stream and self.first_token_at is None and payload.token_ids:
                self.first_token_at = time.perf_counter()
                self.server.metrics.record_ttft(self.first_token_at - self.started)
            if kind == "done":
                self.done[sub.request_id] = payload
            yield kind, sub, payload

    async def collect(self, request) -> list[tuple]:
        """Wait for every completion (non-streaming); a client disconnect cancels the call."""
        watcher = asyncio.create_task(self._watch_disconnect(request))
        try:
            async for _ in self.messages():
                pass
        finally:
            watcher.cancel()
            self.close()
        return [(sub, self.done[sub.request_id]) for sub in self.subs]

    async def _watch_disconnect(self, request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.queue.put_nowait(("disconnected", None, None))
                return

    def close(self, cancelled: bool = True) -> None:
        """Abort every submitted prompt that has not finished (idempotent); ``cancelled``: by the client."""
        for sub in self._submitted:
            if sub.request_id not in self.done:
                self.server.worker.abort(sub.request_id)
                if cancelled and not self.cancelled:
                    self.cancelled = True
                    self.server.metrics.count("cancelled")
        self._submitted = [s for s in self._submitted if s.request_id in self.done]
