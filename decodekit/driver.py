"""The engine protocol every engine implements, and the driver that lets several consumers share one.

``EngineProtocol`` is what ``LLM``, the server and ``TreeRollout.run`` use: ``add_request``,
``step``, ``abort``, ``pop_completion``, ``get_request``, ``has_unfinished``, ``stats``, ``detach``
and ``serve_mode``; ``token_level`` says whether strategies run token by token on it (decodekit's
engine) or map to a request-level engine's own features (vLLM).

``Driver`` makes one engine safe to share between streams, ``generate`` calls and rollouts, from
one thread or several: one caller steps the engine at a time (a lock), and every event goes to its
own request's queue, whoever stepped. A stream nobody reads keeps receiving events while others
drive the engine; past ``max_buffered`` queued events its queue is coalesced (consecutive events of
one choice merge into one, their text, ids, logprobs and provenance concatenated), so an unread
stream holds at most one event per choice and nothing is lost. A step failure raises in the callers
whose requests it aborted; the others' events are delivered and they go on.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

from decodekit.types import Completion, SamplingParams, TokenEvent

MAX_BUFFERED_EVENTS = 256


@runtime_checkable
class EngineProtocol(Protocol):
    """The request/response surface of an engine (decodekit's ``Engine``, ``VLLMEngine``)."""

    backend: object
    tokenizer: object
    token_level: bool  # True: strategies run token by token (StepContext); False: request-level (vLLM)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, strategy=None, *, prompt: str = "",
                    request_id: str | None = None, stream: bool = True): ...

    def step(self) -> list[TokenEvent]: ...

    def abort(self, request_id: str) -> None: ...

    def pop_completion(self, request_id: str) -> Completion: ...

    def get_request(self, request_id: str): ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> dict: ...

    def detach(self, strategy) -> None: ...

    def serve_mode(self) -> None:
        """Requests arrive at any time (a server): no idle step may run long (a whole long prefill)."""


class _Inbox:
    """One request's undelivered events, or the error that ended it."""

    __slots__ = ("events", "error", "keep")

    def __init__(self, keep: bool):
        self.events: deque[TokenEvent] = deque()
        self.error: BaseException | None = None
        self.keep = keep  # False: the caller reads only the completion, so events are not kept


class Driver:
    """Steps ``engine`` for every consumer: one at a time, each event to its own request's inbox."""

    def __init__(self, engine: EngineProtocol, max_buffered: int = MAX_BUFFERED_EVENTS):
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {max_buffered}")
        self.engine = engine
        self.max_buffered = max_buffered
        self.lock = threading.RLock()
        self._inboxes: dict[str, _Inbox] = {}
        # events of requests this driver does not route (another router's, e.g. the server's worker)
        self.foreign: Callable[[list[TokenEvent]], None] | None = None

    def add(self, items: list[tuple[str, list[int]]], params: SamplingParams | list[SamplingParams], strategy, *,
            stream: bool = False):
        """Queue one request per ``(text, ids)`` (``params``: one for all, or one per item); all or none (a
        bad one aborts those added before it)."""
        added = []
        each = params if isinstance(params, list) else [params] * len(items)
        if len(each) != len(items):
            raise ValueError(f"{len(each)} sampling parameter sets for {len(items)} prompts")
        with self.lock:
            try:
                for (text, ids), item_params in zip(items, each):
                    request = self.engine.add_request(ids, item_params, strategy, prompt=text, stream=stream)
                    self._inboxes[request.request_id] = _Inbox(keep=stream)
                    added.append(request)
            except BaseException:
                self.discard([r.request_id for r in added])
                raise
        return added

    def complete(self, items: list[tuple[str, list[int]]], params: SamplingParams | list[SamplingParams],
                 strategy) -> list[Completion]:
        """Run the requests to completion (others' requests advance in the same steps)."""
        requests = self.add(items, params, strategy)
        ids = [r.request_id for r in requests]
        try:
            while not all(self._done(i) for i in ids):
                self.drive(ids)
            with self.lock:
                return [self.engine.pop_completion(i) for i in ids]
        finally:
            self.discard(ids)

    def events(self, request_id: str) -> Iterator[TokenEvent]:
        """The request's events in order, stepping the engine while none is waiting; ends after its last."""
        try:
            while True:
                event = self._next(request_id)
                if event is None:
                    return
                yield event
        finally:
            self.discard([request_id])

    def drive(self, request_ids: list[str]) -> None:
        """One engine step unless every one of ``request_ids`` has what it waits for; a failure is kept
        for the callers whose requests it ended (all of them, for a failure outside a strategy)."""
        with self.lock:
            if all(self._ready(i) for i in request_ids):
                return
            try:
                self.step()
            except Exception:
                pass  # step() left the error in the inboxes of the requests it ended

    def step(self) -> list[TokenEvent]:
        """One engine step: events of this driver's requests go to their inboxes; the others go to
        ``foreign`` (another router of the same engine, e.g. the server's worker) and are returned.
        A step failure is left in the inboxes of the requests it ended and re-raised."""
        with self.lock:
            try:
                events = self.engine.step()
            except Exception as e:
                failed = set(getattr(e, "request_ids", ()) or ()) or set(self._inboxes)
                for rid in failed & set(self._inboxes):
                    self._inboxes[rid].error = e
                if hasattr(e, "events"):
                    e.events = self._route(e.events)
                raise
            return self._route(events)

    def discard(self, request_ids: list[str]) -> None:
        """Forget the requests: aborted if unfinished; nothing of them stays in the engine."""
        with self.lock:
            for rid in request_ids:
                self._inboxes.pop(rid, None)
                self.engine.abort(rid)

    # ---- internals -------------------------------------------------------------------------------
    def _next(self, request_id: str) -> TokenEvent | None:
        while True:
            with self.lock:
                inbox = self._inboxes[request_id]
                if inbox.events:
                    return inbox.events.popleft()
                if inbox.error is not None:
                    raise inbox.error
                request = self.engine.get_request(request_id)
                if request is None or request.finished:
                    return None
            self.drive([request_id])

    def _ready(self, request_id: str) -> bool:
        inbox = self._inboxes.get(request_id)
        return inbox is None or bool(inbox.events) or inbox.error is not None or self._finished(request_id)

    def _done(self, request_id: str) -> bool:
        with self.lock:
            inbox = self._inboxes.get(request_id)
            if inbox is not None and inbox.error is not None:
                raise inbox.error
            return self._finished(request_id)

    def _finished(self, request_id: str) -> bool:
        request = self.engine.get_request(request_id)
        return request is None or request.finished

    def _route(self, events: list[TokenEvent]) -> list[TokenEvent]:
        others = []
        for event in events:
            inbox = self._inboxes.get(event.request_id)
            if inbox is None:
                others.append(event)
            elif inbox.keep:  # else the caller reads only the completion
                inbox.events.append(event)
                if len(inbox.events) > self.max_buffered:
                    inbox.events = coalesce(inbox.events)
        if others and self.foreign is not None:
            self.foreign(others)
        return others


def coalesce(events) -> deque[TokenEvent]:
    """The same events with each choice's merged into one (in order of first appearance): a choice's
    text, ids, logprobs and provenance concatenated, its latest finish reason."""
    merged: dict[int, TokenEvent] = {}
    for e in events:
        prev = merged.get(e.index)
        merged[e.index] = e if prev is None else dataclasses.replace(
            prev, token_ids=prev.token_ids + e.token_ids, text=prev.text + e.text, finish_reason=e.finish_reason,
            logprobs=prev.logprobs + e.logprobs, provenance=prev.provenance + e.provenance)
    return deque(merged.values())
