"""Server-sent event streams for chat and text completions, ending with ``data: [DONE]``.

If the client disconnects, Starlette cancels the generator; ``finally`` then aborts the call's
engine requests, which frees their cache slots before the next engine step.
"""

from __future__ import annotations

from decodekit.servers.openai import responses as R
from decodekit.servers.openai.errors import APIError

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _framed(call, base: dict, chunks, include_usage: bool):
    """``chunks`` as SSE, then the usage chunk if asked, an API error as its body, and ``[DONE]``."""
    try:
        async for chunk in chunks:
            yield R.sse(chunk)
        if include_usage:
            yield R.sse(R.usage_chunk(base, list(call.done.values())))
    except APIError as e:
        yield R.sse(e.body())
    finally:
        await chunks.aclose()
        call.close()
    yield DONE


def chat_stream(call, base: dict, *, n: int, want_logprobs: bool, include_usage: bool, tokens=None):
    """``tokens``: a ``responses.token_list`` when the request asks for provenance (None: not)."""
    return _framed(call, base, _chat_chunks(call, base, n, want_logprobs, include_usage, tokens), include_usage)


def tool_chat_stream(call, base: dict, *, n: int, include_usage: bool, plan):
    """A chat stream under tools (``tools.CallStream`` per choice): content deltas, then ``tool_calls`` deltas."""
    return _framed(call, base, _tool_chunks(call, base, n, include_usage, plan), include_usage)


def text_stream(call, base: dict, *, n: int, echo: bool, want_logprobs: bool, include_usage: bool, tokens=None,
                echo_logprobs: dict | None = None):
    """``echo_logprobs``: prompt index -> the echoed prompt's logprobs (``prompt_scores.echo_logprobs``)."""
    return _framed(call, base, _text_chunks(call, base, n, echo, want_logprobs, include_usage, tokens,
                                            echo_logprobs or {}), include_usage)


def _event_tokens(tokens, event):
    return None if tokens is None else tokens(event.token_ids, event.provenance, event.logprobs)


async def _chat_chunks(call, base: dict, n: int, want_logprobs: bool, include_usage: bool, tokens):
    for index in range(n):
        yield R.chat_chunk(base, index, {"role": "assistant", "content": ""}, include_usage=include_usage)
    async for kind, _sub, event in call.messages():
        if kind != "event":
            continue
        logprobs = event.logprobs if want_logprobs else None
        listed = _event_tokens(tokens, event)
        if event.text or logprobs or listed:
            yield R.chat_chunk(base, event.index, {"content": event.text}, logprobs=logprobs,
                               include_usage=include_usage, tokens=listed)
        if event.finish_reason is not None:
            yield R.chat_chunk(base, event.index, {}, finish=event.finish_reason, include_usage=include_usage)


async def _text_chunks(call, base: dict, n: int, echo: bool, want_logprobs: bool, include_usage: bool, tokens,
                       echo_logprobs: dict):
    offsets: dict[int, int] = {}  # choice index -> characters sent (logprobs text_offset)
    if echo:
        for sub in call.subs:
            for i in range(n):
                index = sub.offset * n + i
                offsets[index] = len(sub.prompt_text)
                chunk = R.text_chunk(base, index, sub.prompt_text, include_usage=include_usage)
                if sub.offset in echo_logprobs:
                    chunk["choices"][0]["logprobs"] = echo_logprobs[sub.offset]
                yield chunk
    async for kind, sub, event in call.messages():
        if kind != "event":
            continue
        index = sub.offset * n + event.index
        logprobs = event.logprobs if want_logprobs else None
        listed = _event_tokens(tokens, event)
        if event.text or logprobs or listed or event.finish_reason is not None:
            yield R.text_chunk(base, index, event.text, logprobs=logprobs, text_offset=offsets.get(index, 0),
                               finish=event.finish_reason, include_usage=include_usage, tokens=listed)
            offsets[index] = offsets.get(index, 0) + len(event.text)


async def _tool_chunks(call, base: dict, n: int, include_usage: bool, plan):
    from decodekit.servers.openai.tools import CallStream

    streams = [CallStream(plan) for _ in range(n)]
    for index in range(n):
        yield R.chat_chunk(base, index, {"role": "assistant", "content": ""}, include_usage=include_usage)
    async for kind, _sub, event in call.messages():
        if kind != "event":
            continue
        stream = streams[event.index]
        text = stream.content(event.text)
        if text:
            yield R.chat_chunk(base, event.index, {"content": text}, include_usage=include_usage)
        if event.finish_reason is not None:
            rest, deltas, reason = stream.finish(event.finish_reason)
            if rest:
                yield R.chat_chunk(base, event.index, {"content": rest}, include_usage=include_usage)
            for delta in deltas:
                yield R.chat_chunk(base, event.index, {"tool_calls": [delta]}, include_usage=include_usage)
            yield R.chat_chunk(base, event.index, {}, finish=reason, include_usage=include_usage)
