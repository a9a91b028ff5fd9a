"""The engine loop thread: continuous batching for the server.

The ``Engine`` is not thread-safe, so one thread owns it. HTTP handlers (on the asyncio loop)
hand it ``Submission``s through a thread-safe inbox; between two ``engine.step()`` calls the
thread takes new submissions (tokenize, ``add_request``) and aborts, so requests join and leave
the running batch between steps. Each ``TokenEvent`` goes back to its submission's asyncio queue
with ``loop.call_soon_threadsafe``. Messages a queue receives, in order:
``("accepted", sub, prompt_ids)``, ``("event", sub, TokenEvent)``..., ``("done", sub, Completion)``,
or ``("error", sub, APIError)`` at any point.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from decodekit.servers.openai.errors import APIError, bad_value

from decodekit.engine import StepError
from decodekit.types import SamplingParams

log = logging.getLogger("decodekit.server")


class QueueFull(Exception):
    """More requests are waiting for admission than the server's ``max_queue``."""


@dataclass(eq=False)
class Submission:
    """One engine request: a prompt, how to build its params once its length is known, where to reply."""

    request_id: str
    prompt: str | list[int] | list[dict]
    make_params: Callable[[int], SamplingParams]
    strategy: Any
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    offset: int = 0  # choice index offset of this prompt in a batched completions call
    stream: bool = True
    prompt_text: str = ""  # the prompt as text and token ids, filled on the request side (``calls.encode``)
    prompt_ids: list[int] = field(default_factory=list)
    request: Any = None
    waiting: bool = True
    running: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)

    def send(self, kind: str, payload=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, self, payload))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


@dataclass
class LoopStats:
    num_steps: int = 0
    num_step_seqs: int = 0  # sum over steps of running sequences: / num_steps = mean batch size
    max_running_seqs: int = 0
    num_aborted: int = 0
    num_failed_steps: int = 0


class EngineWorker:
    def __init__(self, llm, *, max_queue: int = 256, on_done: Callable | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.llm = llm
        self.engine = llm.engine
        self.max_queue = max_queue
        self.stats = LoopStats()
        self._on_done = on_done
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[str, Submission] = {}
        self._lock = threading.Lock()
        self._num_waiting = 0
        self._num_running = 0  # written by the engine thread only: never negative
        self.step_started: float | None = None  # perf_counter at the start of the step in flight
        self.last_step_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decodekit-engine", daemon=True)
        # whoever steps the engine (this thread, or a Python call on the same LLM), server events come here
        llm.driver.foreign = self._send_events

    # ---- called from the HTTP side ------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def queue_length(self) -> int:
        """Requests accepted by the server and not yet admitted into the running batch."""
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return self._num_running

    def step_running_for(self) -> float:
        """Seconds the step in flight has run (0 between steps)."""
        started = self.step_started
        return 0.0 if started is None else time.perf_counter() - started

    def submit(self, sub: Submission) -> None:
        """Queue a submission; raises ``QueueFull`` when ``max_queue`` requests already wait."""
        with self._lock:
            if self._num_waiting >= self.max_queue:
                raise QueueFull(f"{self._num_waiting} requests are waiting (max_queue={self.max_queue})")
            self._num_waiting += 1
        self._inbox.put(("add", sub))

    def abort(self, request_id: str) -> None:
        """Cancel a request (client gone); its cache slots are freed before the next step."""
        self._inbox.put(("abort", request_id))

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between steps (inspection, cache checks)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, future)))
        return future

    # ---- the loop -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_unfinished())
            if self.engine.has_unfinished():
                self._step()
        self._fail_all(APIError(503, "server is shutting down"))

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload) -> None:
        if kind == "add":
            self._add(payload)
        elif kind == "abort":
            self._abort(payload)
        elif kind == "call":
            fn, future = payload
            try:
                future.set_result(fn(self.engine))
            except Exception as e:  # the caller sees it through the future
                future.set_exception(e)

    def _add(self, sub: Submission) -> None:
        try:
            ids = sub.prompt_ids
            params = sub.make_params(len(ids))
            with self.llm.driver.lock:  # the engine is shared with Python calls on the same LLM
                sub.request = self.engine.add_request(ids, params, sub.strategy, prompt=sub.prompt_text,
                                                      request_id=sub.request_id, stream=sub.stream)
        except APIError as e:
            self._reject(sub, e)
            return
        except ValueError as e:
            self._reject(sub, bad_value(str(e)))
            return
        except Exception:
            log.exception("could not add request %s", sub.request_id)
            self._reject(sub, APIError(500, f"could not start the request (request id {sub.request_id})"))
            return
        self._active[sub.request_id] = sub
        sub.send("accepted", list(ids))

    def _reject(self, sub: Submission, error: APIError) -> None:
        self._leave_waiting(sub)
        sub.send("error", error)

    def _abort(self, request_id: str) -> None:
        sub = self._active.pop(request_id, None)
        if sub is None:
            return
        self._left(sub)
        self._engine_abort(request_id)
        self.stats.num_aborted += 1

    def _engine_abort(self, request_id: str) -> None:
        with self.llm.driver.lock:
            self.engine.abort(request_id)

    def _leave_waiting(self, sub: Submission) -> None:
        if sub.waiting:
            sub.waiting = False
            with self._lock:
                self._num_waiting -= 1
            if sub.request_id in self._active:  # admitted into the batch
                self._num_running += 1
                sub.running = True

    def _left(self, sub: Submission) -> None:
        """``sub`` leaves the batch (done, aborted or failed)."""
        self._leave_waiting(sub)
        if sub.running:
            sub.running = False
            self._num_running -= 1

    def _step(self) -> None:
        self.step_started = time.perf_counter()
        try:
            self.llm.driver.step()  # one stepper at a time; this step's events reach ``_send_events``
        except StepError as e:  # one strategy failed: its requests end with a 500, the others go on
            log.error("%s (requests %s)", e, e.request_ids, exc_info=e.__cause__)
            self.stats.num_failed_steps += 1
            self._fail(e.request_ids, APIError(500, "the request failed inside the engine (see the server log)"))
        except Exception:
            log.exception("engine step failed; failing the running requests")
            self.stats.num_failed_steps += 1
            self._fail_all(APIError(500, "an engine step failed (see the server log)"))
            return
        finally:
            self.last_step_s = time.perf_counter() - self.step_started
            self.step_started = None
        running = len(self.engine.running)
        self.stats.num_steps += 1
        self.stats.num_step_seqs += running
        self.stats.max_running_seqs = max(self.stats.max_running_seqs, running)
        self._collect()

    def _send_events(self, events) -> None:
        for event in events:
            sub = self._active.get(event.request_id)
            if sub is not None:
                sub.send("event", event)

    def _collect(self) -> None:
        for request_id, sub in list(self._active.items()):
            if sub.waiting and sub.request.seqs:
                self._leave_waiting(sub)
            if self.engine.get_request(request_id) is None:  # ended by a step another caller drove
                self._fail([request_id], APIError(500, "the request failed inside the engine (see the server log)"))
                continue
            if sub.request.finished:
                self._left(sub)
                del self._active[request_id]
                completion = self.engine.pop_completion(request_id)
                if self._on_done is not None:
                    self._on_done(sub, completion)
                sub.send("done", completion)

    def _fail_all(self, error: APIError) -> None:
        self._fail(list(self._active), error)
        self._drain_rejecting(error)

    def _fail(self, request_ids, error: APIError) -> None:
        for request_id in request_ids:
            sub = self._active.pop(request_id, None)
            if sub is None:
                continue
            self._left(sub)
            try:
                self._engine_abort(request_id)
            except Exception:
                log.exception("abort of %s failed", request_id)
            sub.send("error", error)

    def _drain_rejecting(self, error: APIError) -> None:
        if not self._stop.is_set():
            return
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._reject(payload, error)
            elif kind == "call":
                payload[1].cancel()
