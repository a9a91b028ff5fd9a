"""Request models of the OpenAI API (pydantic) and their mapping to decodekit ``SamplingParams``.

Pydantic checks types (a wrong type is a 422); value checks raise ``APIError`` 400 naming the
OpenAI parameter. Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Any, Literal

from decodekit.servers.openai.errors import APIError, bad_value, param_of
from decodekit.servers.openai.limits import Limits
from pydantic import BaseModel, ConfigDict, Field

from decodekit.types import SamplingParams

MAX_N = 64
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # OpenAI's own limit on logit_bias entries
RENAMES = {"max_new_tokens": "max_tokens"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(_Model):
    include_usage: bool = False


class JsonSchemaSpec(_Model):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _Sampling(_Model):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM-style extensions, accepted at the top level of the body
    repetition_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # decodekit strategy choice: {"strategy": "speculative", "draft": "ngram", ...}
    decodekit: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    prompt_logprobs: int | None = None  # vLLM's extra: the prompt tokens' log-probabilities, top n


class ContentPart(_Model):
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls (rendered by ``tools``)
    tool_call_id: str | None = None  # a ``tool`` message: the call it answers


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


# ---- checks -------------------------------------------------------------------------------------
MAX_PROMPTS = Limits.max_prompts


def check_common(body: _Sampling) -> None:
    """Value checks shared by both endpoints (400 naming the OpenAI parameter)."""
    if not 1 <= body.n <= MAX_N:
        raise bad_value(f"n must be between 1 and {MAX_N}, got {body.n}", "n")
    if body.temperature is not None and not 0 <= body.temperature <= 2:
        raise bad_value(f"temperature must be between 0 and 2, got {body.temperature}", "temperature")
    if body.logit_bias and len(body.logit_bias) > MAX_LOGIT_BIAS:
        raise bad_value(f"logit_bias holds {len(body.logit_bias)} tokens; the limit is {MAX_LOGIT_BIAS}", "logit_bias")
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stops) > 16 or any(not s for s in stops):
        raise bad_value("stop must be up to 16 non-empty strings", "stop")


def check_completion(body: CompletionRequest) -> None:
    check_common(body)
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise bad_value(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {body.logprobs}", "logprobs")
    if body.suffix:
        raise bad_value("suffix (fill-in-the-middle) is not supported", "suffix")
    if body.best_of not in (None, 1, body.n):
        raise bad_value("best_of other than n is not supported", "best_of")


def check_chat(body: ChatCompletionRequest) -> None:
    check_common(body)
    if body.top_logprobs is not None:
        if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise bad_value(f"top_logprobs must be between 0 and {MAX_LOGPROBS}", "top_logprobs")
        if not body.logprobs:
            raise bad_value("top_logprobs needs logprobs=true", "top_logprobs")
    if body.tools and body.response_format is not None and body.response_format.type != "text" \
            and body.tool_choice != "none":
        raise bad_value("give tools or a JSON response_format, not both (or tool_choice 'none')", "response_format")
    if not body.messages:
        raise bad_value("messages must be a non-empty list", "messages")


def wants_provenance(body: _Sampling) -> bool:
    """``"decodekit": {"provenance": true}``: each choice lists its tokens with who produced them."""
    value = (body.decodekit or {}).get("provenance", False)
    if not isinstance(value, bool):
        raise bad_value("decodekit.provenance must be true or false", "decodekit.provenance")
    return value


def strategy_options(body: _Sampling) -> dict | None:
    """The ``decodekit`` field without the response options (``provenance``): what picks the strategy."""
    if body.decodekit is None:
        return None
    return {k: v for k, v in body.decodekit.items() if k != "provenance"}


def guided(body: _Sampling) -> dict:
    """vLLM-style constraint fields by kind (``json``, ``regex``, ``choice``, ``grammar``)."""
    return {"json": body.guided_json, "regex": body.guided_regex, "choice": body.guided_choice,
            "grammar": body.guided_grammar}


def chat_messages(body: ChatCompletionRequest) -> list[dict]:
    """Messages as ``{"role", "content"}`` dicts for the chat template (text parts joined)."""
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise bad_value("only text content parts are supported", f"messages.{i}.content")
            content = "".join(p.text for p in content)
        role = "system" if m.role == "developer" else m.role
        message = {"role": role, "content": content or ""}
        if m.tool_calls:
            message["tool_calls"] = m.tool_calls
        if m.role == "tool":
            message.update(tool_call_id=m.tool_call_id, name=m.name)
        out.append(message)
    return out


def completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    """The prompt field as a list of prompts (text or token ids)."""
    p = body.prompt
    if isinstance(p, str):
        prompts = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = list(p)
    if not prompts or any(len(x) == 0 for x in prompts):
        raise bad_value("prompt must not be empty", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad_value(f"prompt holds {len(prompts)} prompts; the limit is {MAX_PROMPTS} per call", "prompt")
    return prompts


def sampling_params(body: _Sampling, *, max_tokens: int | None, default_max_tokens: int, prompt_len: int,
                    max_context: int, logprobs: int | None) -> SamplingParams:
    """``SamplingParams`` for one prompt; ``max_tokens`` is clamped to the room left in the context."""
    if prompt_len >= max_context:
        raise APIError(413, f"prompt has {prompt_len} tokens; the model's context is {max_context} tokens",
                       param="messages" if hasattr(body, "messages") else "prompt", code="context_length_exceeded")
    if max_tokens is not None and max_tokens < 1:
        raise bad_value(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    room = max_context - prompt_len
    wanted = default_max_tokens if max_tokens is None else max_tokens
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(
            max_new_tokens=min(wanted, room),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            seed=None if body.seed is None else body.seed % (1 << 63),  # OpenAI allows negative seeds
            n=body.n,
            stop=stops,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=body.logit_bias or (),
        )
    except ValueError as e:
        raise bad_value(str(e), param_of(str(e), RENAMES)) from None


def penalties_asked(body: _Sampling) -> str | None:
    """The first penalty / bias field a request sets to a non-default value, or None."""
    if body.presence_penalty:
        return "presence_penalty"
    if body.frequency_penalty:
        return "frequency_penalty"
    if body.repetition_penalty not in (None, 1.0):
        return "repetition_penalty"
    return "logit_bias" if body.logit_bias else None


def check_penalties(body: _Sampling, strategy, engine) -> None:
    """400 naming the field when the request's strategy cannot honour its penalties (never silently ignored);
    logit_bias keys must be token ids of the model's vocabulary."""
    from decodekit.api import penalty_problem

    field = penalties_asked(body)
    if field is None:
        return
    why = penalty_problem(strategy, engine)
    if why is not None:
        raise bad_value(why, field)
    vocab = engine.backend.vocab_size
    for key in body.logit_bias or {}:
        if not key.isdigit() or int(key) >= vocab:
            raise bad_value(f"logit_bias keys must be token ids in [0, {vocab}), got {key!r}", "logit_bias")
