"""The OpenAI protocol: validation of ``/v1/completions`` and ``/v1/chat/completions`` bodies into a
:class:`CompletionRequest`, the chat template, and the one builder of answers (:func:`choice_object`,
:func:`answer_object`) that plain and streamed responses both go through.

Every field is either honoured or refused with a 400 that names it; nothing is accepted and
ignored. Fields this server cannot honour: ``suffix`` (no infilling), ``best_of`` other than ``n``,
and the chat API's ``tools``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from openllm.core.errors import OpenLLMError
from openllm.data.chat import encode_chat, end_of_turn_ids, render
from openllm.data.tokenizer import Tokenizer
from openllm.inference.logprobs import chat_logprobs

# A plain template a base model can continue: what OpenLLM uses when the tokenizer has none of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n\n"
    "{% else %}Assistant: {{ m.content }}\n\n{% endif %}"
    "{% endfor %}Assistant:"
)
DEFAULT_CHAT_STOPS = ["\nUser:", "\n\nUser:"]


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_tokens: int
    max_prompt_chars: int
    max_n: int
    max_prompts: int
    vocab_size: int
    context: int  # the model's context: the longest prompt, and the most 'truncate_prompt_tokens' may keep


@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]  # text, or token ids used exactly as given
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    n: int
    seed: int | None
    stream: bool
    model: str
    echo: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    include_usage: bool = False
    truncate_prompt_tokens: int | None = None  # keep only each prompt's last this many tokens (asked for)
    stop_ids: frozenset[int] | None = None  # ids that end a choice (a chat template's end of turn); None: eos


COMPLETION_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "stop", "n", "seed", "stream", "user",
    "stream_options", "echo", "best_of", "frequency_penalty", "presence_penalty", "logprobs", "suffix", "logit_bias",
    "truncate_prompt_tokens",
}  # fmt: skip
CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n", "seed",
    "stream", "user", "stream_options", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
    "top_logprobs", "tools", "tool_choice", "response_format", "truncate_prompt_tokens",
}  # fmt: skip


def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise APIError(400, f"'{key}' must be {'an integer' if integer else 'a number'}", key)
    if not (low <= value <= high) or value != value:
        raise APIError(400, f"'{key}' must be between {low} and {high}, got {value}", key)
    return value


def check_text(text: str, name: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{name}' is not valid Unicode text (it holds a lone surrogate)", name) from None


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def _prompts(body: dict, limits: Limits) -> list[str | list[int]]:
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif _is_ids(prompt) and prompt:
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (_is_ids(p) and p) for p in prompt):
        prompts = list(prompt)
    else:
        raise APIError(
            400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists", "prompt"
        )
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"at most {limits.max_prompts} prompts per request", "prompt")
    for p in prompts:
        if isinstance(p, str):
            if len(p) > limits.max_prompt_chars:
                raise APIError(400, f"'prompt' is longer than {limits.max_prompt_chars} characters", "prompt")
            check_text(p, "prompt")
        elif not all(0 <= i < limits.vocab_size for i in p):
            raise APIError(
                400, f"'prompt' holds token ids outside the vocabulary (0..{limits.vocab_size - 1})", "prompt"
            )
    return prompts


def _common(body: dict, limits: Limits, model_id: str, max_tokens_key: str = "max_tokens") -> dict:
    """The sampling fields completions and chat share."""
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    for s in stop:
        check_text(s, "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise APIError(400, "'stream_options' needs 'stream': true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise APIError(400, "'stream_options' may only hold 'include_usage'", "stream_options")
        if not isinstance(options.get("include_usage", False), bool):
            raise APIError(400, "'stream_options.include_usage' must be a boolean", "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise APIError(400, "'seed' must be a non-negative integer", "seed")
    model = body.get("model", model_id)
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model")
    if model != model_id:  # as /v1/models/NAME says: one model is served, and a request names it or none
        raise APIError(
            404,
            f"the model '{model}' is not served here (this server serves '{model_id}')",
            "model",
            code="model_not_found",
        )
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise APIError(400, "'logit_bias' must map token ids to numbers", "logit_bias")
    logit_bias = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 12) or not 0 <= int(key) < limits.vocab_size:
            raise APIError(400, f"'logit_bias' names token {key!r}, not an id of this vocabulary", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise APIError(400, "'logit_bias' values must be numbers between -100 and 100", "logit_bias")
        logit_bias[int(key)] = float(value)
    return {
        "max_tokens": _number(body, max_tokens_key, 16, 0, limits.max_tokens, integer=True),
        "temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
        "stop": stop,
        "n": _number(body, "n", 1, 1, limits.max_n, integer=True),
        "seed": seed,
        "stream": stream,
        "model": model,
        "logit_bias": logit_bias,
        "presence_penalty": float(_number(body, "presence_penalty", 0.0, -2.0, 2.0)),
        "frequency_penalty": float(_number(body, "frequency_penalty", 0.0, -2.0, 2.0)),
        "include_usage": bool((options or {}).get("include_usage", False)),
        "truncate_prompt_tokens": _number(body, "truncate_prompt_tokens", None, 1, limits.context, integer=True),
    }


def _unknown(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    extra = sorted(k for k in body if k not in allowed)
    if extra:
        raise APIError(400, f"unknown field '{extra[0]}'", extra[0])


def parse_completion(body, limits: Limits, model_id: str) -> CompletionRequest:
    """Validate a /v1/completions body; raises :class:`APIError` naming the bad field."""
    _unknown(body, COMPLETION_FIELDS)
    if body.get("suffix") not in (None, ""):
        raise APIError(400, "'suffix' (infilling) is not supported by this model", "suffix")
    common = _common(body, limits, model_id)
    if body.get("best_of") not in (None, common["n"]):
        raise APIError(400, "'best_of' other than 'n' is not supported (every sample is returned)", "best_of")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise APIError(400, "'echo' must be a boolean", "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _number(body, "logprobs", None, 0, 20, integer=True)
    if common["max_tokens"] == 0 and not echo:
        raise APIError(400, "'max_tokens' must be at least 1 (0 only with 'echo', to score the prompt)", "max_tokens")
    return CompletionRequest(prompts=_prompts(body, limits), echo=echo, logprobs=logprobs, **common)


def parse_chat(body, limits: Limits, model_id: str, tokenizer: Tokenizer) -> tuple[CompletionRequest, bool]:
    """Validate a /v1/chat/completions body into a completion of the rendered conversation; also says whether
    the default template's stop strings apply."""
    _unknown(body, CHAT_FIELDS)
    for name in ("tools", "tool_choice", "response_format"):
        if body.get(name) not in (None, False):
            raise APIError(400, f"'{name}' is not supported by this server's chat API", name)
    if body.get("logprobs") not in (None, True, False):
        raise APIError(400, "'logprobs' must be a boolean in the chat API", "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if not body.get("logprobs"):
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top = _number(body, "top_logprobs", None, 0, 20, integer=True)
    logprobs = (top or 0) if body.get("logprobs") else None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    for m in messages:
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("system", "user", "assistant")
            or set(m) - {"role", "content", "name"}
        ):
            raise APIError(400, "each message needs a 'role' (system, user or assistant) and a 'content'", "messages")
        if not isinstance(m.get("content"), str):
            raise APIError(400, "a message's 'content' must be a string", "messages")
        check_text(m["content"], "messages")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    common = _common(body, limits, model_id, key)
    if common["max_tokens"] == 0:
        raise APIError(400, f"'{key}' must be at least 1", key)
    if tokenizer.chat_template:  # the model's own template, as training encoded it, ending at the end of a turn
        try:
            text = render(tokenizer, messages, add_generation_prompt=True)
            if len(text) > limits.max_prompt_chars:
                raise APIError(400, f"the conversation is longer than {limits.max_prompt_chars} characters", "messages")
            ids, _ = encode_chat(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages],
                                 add_generation_prompt=True)  # fmt: skip
        except OpenLLMError as exc:
            raise APIError(400, f"the chat template failed on these messages: {exc}", "messages") from None
        stops = frozenset(end_of_turn_ids(tokenizer))
        return CompletionRequest(prompts=[ids], logprobs=logprobs, stop_ids=stops or None, **common), False
    prompt, default = render_chat(tokenizer, messages)
    if len(prompt) > limits.max_prompt_chars:
        raise APIError(400, f"the conversation is longer than {limits.max_prompt_chars} characters", "messages")
    if default:
        common["stop"] = common["stop"] + [s for s in DEFAULT_CHAT_STOPS if s not in common["stop"]]
    return CompletionRequest(prompts=[prompt], logprobs=logprobs, **common), default


def render_chat(tokenizer: Tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """The conversation as prompt text for a model whose tokenizer has no chat template of its own (one that has
    goes through :func:`openllm.data.chat.encode_chat`): :data:`DEFAULT_CHAT_TEMPLATE`, rendered in a sandbox as
    ``transformers`` does. Returns (text, True: the default template's stop strings apply)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(DEFAULT_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True), True


# --- answers ---------------------------------------------------------------------------------------


def choice_object(
    chat: bool, stream: bool, index: int, text: str, logprobs: dict | None, finish: str | None, first: bool = False
) -> dict:
    """One choice of an answer: a whole choice (``stream`` False), or a chunk of one; ``first``: the chunk
    that opens a streamed chat choice (it names the role)."""
    if not chat:
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
    if stream:
        delta = {} if finish else {"content": text}
        if first:
            delta = {"role": "assistant", **delta}
        return {"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs), "finish_reason": finish}
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": chat_logprobs(logprobs), "finish_reason": finish}


def answer_object(
    cid: str, model_id: str, chat: bool, stream: bool, choices: list[dict], usage: dict | None = None
) -> dict:
    """A response body (or one streamed chunk) around ``choices``."""
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    out = {"id": cid, "object": kind, "created": int(time.time()), "model": model_id, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def event(body: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(body)}\n\n"
