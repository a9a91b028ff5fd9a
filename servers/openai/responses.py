"""OpenAI response bodies and stream chunks built from decodekit ``Completion``s and ``TokenEvent``s."""

from __future__ import annotations

import dataclasses
import json
import time

from decodekit.types import SAMPLED, Completion, TokenInfo


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's reasons pass through; decodekit's own (``constraint_failed``) too, so clients can tell."""
    return reason


def usage(completions: list[Completion]) -> dict:
    prompt = sum(c.usage.prompt_tokens for c in completions)
    generated = sum(c.usage.completion_tokens for c in completions)
    cached = sum(c.stats.cached_prompt_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": cached}}


def stats(completion: Completion) -> dict:
    s = completion.stats
    return {"cached_prompt_tokens": s.cached_prompt_tokens, "prefill_tokens_computed": s.prefill_tokens_computed,
            "forward_passes": s.forward_passes, "wall_time_s": round(s.wall_time_s, 4), **_jsonable(s.extra)}


def _jsonable(extra: dict) -> dict:
    out = {}
    for k, v in extra.items():
        if dataclasses.is_dataclass(v) and not isinstance(v, type):  # records (a rollout tree) as JSON
            v = dataclasses.asdict(v)
        try:
            json.dumps(v)
            out[k] = v
        except (TypeError, ValueError):
            out[k] = str(v)
    return out


# ---- logprobs ---------------------------------------------------------------------------------
def chat_logprobs(infos) -> dict:
    return {"content": [_chat_token(t) for t in infos], "refusal": None}


def _chat_token(t: TokenInfo) -> dict:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode("utf-8")),
            "top_logprobs": [{"token": x.token, "logprob": x.logprob, "bytes": list(x.token.encode("utf-8"))}
                             for x in t.top]}


def completion_logprobs(infos, text_offset: int = 0) -> dict:
    offsets, pos = [], text_offset
    for t in infos:
        offsets.append(pos)
        pos += len(t.token)
    return {"tokens": [t.token for t in infos], "token_logprobs": [t.logprob for t in infos],
            "top_logprobs": [{x.token: x.logprob for x in t.top} for t in infos], "text_offset": offsets}


# ---- provenance ------------------------------------------------------------------------------------
def token_list(token_str, token_ids, provenance, infos) -> list[dict]:
    """``decodekit.tokens`` of a choice or a chunk: per token its id, text, source and details
    (and its logprob when logprobs were asked). A backend that records no provenance samples."""
    infos = infos or ()
    out = []
    for i, token in enumerate(token_ids):
        entry = {"id": token, "token": token_str(token),
                 **(provenance[i] if i < len(provenance) else SAMPLED).as_dict()}
        if i < len(infos):
            entry["logprob"] = infos[i].logprob
        out.append(entry)
    return out


def _with_tokens(choice: dict, tokens, ch) -> dict:
    if tokens is not None:
        choice["decodekit"] = {"tokens": tokens(ch.token_ids, ch.provenance, ch.logprobs)}
    return choice


# ---- whole responses ----------------------------------------------------------------------------
def header(kind: str, response_id: str, model: str) -> dict:
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model,
            "system_fingerprint": "decodekit"}


def chat_response(response_id: str, model: str, completion: Completion, want_logprobs: bool, tokens=None) -> dict:
    """``tokens``: a ``token_list`` to add each choice's ``decodekit.tokens`` (None: not asked)."""
    choices = [_with_tokens({"index": ch.index, "message": {"role": "assistant", "content": ch.text, "refusal": None},
                             "logprobs": chat_logprobs(ch.logprobs or ()) if want_logprobs else None,
                             "finish_reason": finish_reason(ch.finish_reason)}, tokens, ch)
               for ch in completion.choices]
    return {**header("chat.completion", response_id, model), "choices": choices, "usage": usage([completion]),
            "decodekit": stats(completion)}


def text_response(response_id: str, model: str, subs_done: list, n: int, echo: bool, want_logprobs: bool,
                  tokens=None) -> dict:
    """``subs_done``: (submission, Completion) per prompt, in prompt order."""
    choices = []
    for i, (sub, completion) in enumerate(subs_done):
        prefix = sub.prompt_text if echo else ""
        for ch in completion.choices:
            choices.append(_with_tokens({
                "index": i * n + ch.index, "text": prefix + ch.text,
                "logprobs": completion_logprobs(ch.logprobs or (), len(prefix)) if want_logprobs else None,
                "finish_reason": finish_reason(ch.finish_reason)}, tokens, ch))
    completions = [c for _, c in subs_done]
    per_prompt = [stats(c) for c in completions]
    return {**header("text_completion", response_id, model), "choices": choices, "usage": usage(completions),
            "decodekit": per_prompt[0] if len(per_prompt) == 1 else per_prompt}


# ---- stream chunks ------------------------------------------------------------------------------
def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chat_chunk(base: dict, index: int, delta: dict, *, logprobs=None, finish=None, include_usage=False,
               tokens=None) -> dict:
    """``tokens``: this chunk's ``decodekit.tokens`` (None: not asked)."""
    chunk = {**base, "choices": [{"index": index, "delta": delta,
                                  "logprobs": chat_logprobs(logprobs) if logprobs is not None else None,
                                  "finish_reason": finish_reason(finish)}]}
    if tokens is not None:
        chunk["choices"][0]["decodekit"] = {"tokens": tokens}
    if include_usage:
        chunk["usage"] = None
    return chunk


def text_chunk(base: dict, index: int, text: str, *, logprobs=None, text_offset=0, finish=None,
               include_usage=False, tokens=None) -> dict:
    chunk = {**base, "choices": [{"index": index, "text": text,
                                  "logprobs": completion_logprobs(logprobs, text_offset) if logprobs is not None
                                  else None, "finish_reason": finish_reason(finish)}]}
    if tokens is not None:
        chunk["choices"][0]["decodekit"] = {"tokens": tokens}
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(base: dict, completions: list[Completion]) -> dict:
    """The last chunk (``stream_options.include_usage``): usage, and decodekit's counters as in a whole response."""
    per_prompt = [stats(c) for c in completions]
    return {**base, "choices": [], "usage": usage(completions),
            "decodekit": per_prompt[0] if len(per_prompt) == 1 else per_prompt}
