"""Prompt log-probabilities on /v1/completions: ``echo`` + ``logprobs``, vLLM's ``prompt_logprobs``,
``max_tokens: 0`` (score without generating), and vLLM's ``/tokenize`` / ``/detokenize``.

Scoring runs ``decodekit.backends.scoring.PromptScorer`` on the engine thread one chunk per
``worker.call`` (so other requests' steps run between the chunks); an abandoned call releases
its KV handle.
"""

from __future__ import annotations

import asyncio

from decodekit.servers.openai import responses as R
from decodekit.servers.openai.errors import APIError, bad_value

from decodekit.backends.scoring import PromptScorer
from decodekit.cache import CacheFullError


def top_wanted(body) -> int | None:
    """How many alternatives per prompt position the request needs, or None when it needs no scores."""
    wanted = [body.logprobs] if body.echo and body.logprobs is not None else []
    if body.prompt_logprobs is not None:
        wanted.append(body.prompt_logprobs)
    return max(wanted) if wanted else None


def check(body, max_logprobs: int) -> None:
    if body.prompt_logprobs is not None and not 0 <= body.prompt_logprobs <= max_logprobs:
        raise bad_value(f"prompt_logprobs must be between 0 and {max_logprobs}", "prompt_logprobs")
    if body.max_tokens == 0:
        if top_wanted(body) is None:
            raise bad_value("max_tokens 0 scores the prompt: it needs echo with logprobs, or prompt_logprobs",
                            "max_tokens")
        if body.stream:
            raise bad_value("max_tokens 0 (scoring only) is returned whole: set stream to false", "stream")


async def score_all(server, prompt_ids: list[list[int]], top_n: int) -> list[list]:
    """Per prompt: None, then a ``PromptLogprob`` per position (one chunk per engine-thread call)."""
    worker = server.worker
    out = []
    for ids in prompt_ids:
        try:
            scorer = PromptScorer(worker.engine.backend, ids, top_n=top_n)
        except ValueError as e:  # a backend without decodekit's KV cache (vLLM)
            raise bad_value(f"prompt log-probabilities are not available here: {e}", "logprobs") from None
        try:
            while not await asyncio.wrap_future(worker.call(lambda _engine, s=scorer: s.step())):
                pass
        except CacheFullError as e:
            raise APIError(503, f"no room in the KV cache to score the prompt now ({e}); retry later",
                           code="cache_full") from None
        finally:
            if not scorer.done:
                worker.call(lambda _engine, s=scorer: s.close())
        out.append(scorer.result)
    return out


def echo_logprobs(token_str, ids: list[int], scored: list) -> dict:
    """OpenAI's completions ``logprobs`` for the prompt's tokens: the first has no log-probability (null)."""
    tokens = [token_str(t) for t in ids]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [None] + [s.logprob for s in scored[1:]],
            "top_logprobs": [None] + [{token_str(t): lp for t, lp in s.top} for s in scored[1:]],
            "text_offset": offsets}


def joined(prompt: dict, generated: dict | None) -> dict:
    """The prompt's logprobs followed by the generated tokens' (``generated`` offsets already count the prompt)."""
    if not generated:
        return prompt
    return {k: prompt[k] + generated[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def vllm_prompt_logprobs(token_str, scored: list, top_n: int) -> list:
    """vLLM's ``prompt_logprobs``: None, then {token id: {logprob, rank, decoded_token}} per position."""
    out = [None]
    for s in scored[1:]:
        entry = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": token_str(t)}
                 for r, (t, lp) in enumerate(s.top[:top_n])}
        entry[str(s.token_id)] = {"logprob": s.logprob, "rank": s.rank, "decoded_token": token_str(s.token_id)}
        out.append(entry)
    return out


def add_to_choices(response: dict, body, token_str, prompts: list[tuple[str, list[int]]], scores: list,
                   n: int) -> dict:
    """Put the prompt scores into a completions response (choice ``i*n + j`` is prompt ``i``)."""
    for choice in response["choices"]:
        i = choice["index"] // n
        ids, scored = prompts[i][1], scores[i]
        if body.echo and body.logprobs is not None:
            choice["logprobs"] = joined(echo_logprobs(token_str, ids, scored), choice["logprobs"])
        if body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(token_str, scored, body.prompt_logprobs)
    return response


def scoring_response(response_id: str, model: str, body, token_str, prompts: list[tuple[str, list[int]]],
                     scores: list, n: int) -> dict:
    """``max_tokens: 0``: the prompts, scored, with nothing generated."""
    choices = [{"index": i * n + j, "text": text if body.echo else "", "logprobs": None, "finish_reason": "length"}
               for i, (text, _ids) in enumerate(prompts) for j in range(n)]
    num_prompt = sum(len(ids) for _, ids in prompts)
    response = {**R.header("text_completion", response_id, model), "choices": choices,
                "usage": {"prompt_tokens": num_prompt, "completion_tokens": 0, "total_tokens": num_prompt}}
    return add_to_choices(response, body, token_str, prompts, scores, n)


# ---- vLLM's /tokenize and /detokenize --------------------------------------------------------------
def tokenize(server, body: dict) -> dict:
    """``{"prompt": text}`` or ``{"messages": [...]}`` -> ``{"count", "max_model_len", "tokens", "token_strs"}``."""
    from decodekit.servers.openai.calls import encode

    tokenizer = server.llm.tokenizer
    if isinstance(body.get("messages"), list):
        messages = [{"role": str(m.get("role", "user")), "content": str(m.get("content") or "")}
                    for m in body["messages"] if isinstance(m, dict)]
        _, ids = encode(server, messages)
    elif isinstance(body.get("prompt"), str) and body["prompt"]:
        ids = tokenizer.encode(body["prompt"]) if body.get("add_special_tokens", True) else \
            tokenizer.hf(body["prompt"], add_special_tokens=False).input_ids
    else:
        raise bad_value("tokenize needs a non-empty 'prompt' string or a 'messages' list", "prompt")
    strs = [tokenizer.token_str(t) for t in ids] if body.get("return_token_strs") else None
    return {"count": len(ids), "max_model_len": server.engine.backend.max_context, "tokens": list(ids),
            "token_strs": strs}


def tokenizer_info(server) -> dict:
    """vLLM's ``GET /tokenizer_info`` (lm-eval's remote tokenizer reads it): special tokens and the chat template."""
    tokenizer = server.llm.tokenizer
    hf = getattr(tokenizer, "hf", None)
    eos = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None
    return {"eos_token": tokenizer.token_str(eos) if eos is not None else None,
            "bos_token": getattr(hf, "bos_token", None), "pad_token": getattr(hf, "pad_token", None),
            "chat_template": getattr(hf, "chat_template", None), "model_max_length": server.engine.backend.max_context,
            "tokenizer_class": type(hf).__name__ if hf is not None else type(tokenizer).__name__}


def detokenize(server, body: dict) -> dict:
    tokens = body.get("tokens")
    vocab = server.engine.backend.vocab_size
    if not isinstance(tokens, list) or any(not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
        raise bad_value(f"detokenize needs 'tokens': a list of token ids in [0, {vocab})", "tokens")
    return {"prompt": server.llm.tokenizer.decode(tokens)}
