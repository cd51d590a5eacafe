"""Who may talk to the server, how much it takes on, and how long it waits: the API key, the Host names it
answers (a DNS-rebinding guard), the JSON content type, CORS origins, the bounds on requests and batches
(:class:`ServerLimits`), and the timeouts for request heads and bodies (see docs/serving.md)."""

from __future__ import annotations

import asyncio
import hmac
import math
from dataclasses import dataclass
from typing import Annotated

from openllm.core.errors import OpenLLMError
from openllm.core.memory import available_memory, gib
from openllm.core.options import MAX_NEW_TOKENS, Opt, at_most, nonneg_float, positive_float, positive_int
from openllm.core.untrusted import BadDocument, parse_json
from openllm.inference.protocol import APIError, Limits

MAX_QUEUE = 4096  # requests waiting at once


@dataclass
class ServerLimits:
    """What the server takes on at once; each bound is checked where it is declared (the command line) and
    again when the server starts (:meth:`check`), so that no value can queue requests without limit or
    allocate a key/value cache beyond memory."""

    max_tokens: Annotated[int, Opt("largest max_tokens a request may ask for", parse=at_most(MAX_NEW_TOKENS))] = 1024
    max_prompt_chars: int = 20_000
    max_n: int = 8
    max_queue: Annotated[
        int,
        Opt(
            f"requests waiting before the server answers 429 (at most {MAX_QUEUE})",
            parse=at_most(MAX_QUEUE),
        ),
    ] = 64
    max_prompts: int = 32  # prompts in one request (a batch)
    max_batch: Annotated[
        int,
        Opt(
            "sequences generated together, one batched model call per step (their key/value cache, of the "
            "model's full context each, must fit in memory)",
            parse=positive_int,
        ),
    ] = 16
    stream_interval: Annotated[
        float,
        Opt(
            "seconds a streamed answer's next tokens may wait to go out together, so that under load each "
            "chunk carries several (its first and last go at once; 0: a chunk per token)",
            parse=nonneg_float,
        ),
    ] = 0.05

    def for_requests(self, vocab_size: int, context: int) -> Limits:
        """The bounds request validation checks (:mod:`openllm.inference.protocol`)."""
        return Limits(self.max_tokens, self.max_prompt_chars, self.max_n, self.max_prompts, vocab_size, context)

    def check(self, model, device) -> None:
        """Refuse, by option name, a value past its bound: ``max_batch`` against the memory free on ``device``."""
        for name, most in (("max_tokens", MAX_NEW_TOKENS), ("max_queue", MAX_QUEUE), ("max_batch", None)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or (most is not None and value > most):
                bound = f" up to {most:,}" if most else ""
                raise OpenLLMError(f"--{name.replace('_', '-')} must be a positive integer{bound}, got {value!r}")
        interval = self.stream_interval
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval < math.inf:
            raise OpenLLMError(f"--stream-interval must be a finite number of seconds >= 0, got {interval!r}")
        per_row, free = model.cache_bytes(1), available_memory(device)
        if free is not None and per_row * self.max_batch > free:
            raise OpenLLMError(
                f"--max-batch {self.max_batch:,} needs a key/value cache of {gib(per_row * self.max_batch)} "
                f"({self.max_batch:,} sequences x {model.config.block_size:,} positions), more than the {gib(free)} "
                f"free; at most {free // per_row:,} fit"
            )


class Guard:
    """ASGI middleware applying :meth:`ServerSecurity.check` to every HTTP request."""

    def __init__(self, app, security: ServerSecurity):
        self.app, self.security = app, security

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            from starlette.datastructures import Headers
            from starlette.responses import JSONResponse

            try:
                self.security.check(Headers(scope=scope), scope["path"], scope["method"])
            except APIError as exc:
                await JSONResponse(exc.body(), status_code=exc.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_json_body(request, timeout: float) -> dict:
    """The request's JSON body, read within ``timeout`` seconds; any failure is a 4xx in the OpenAI shape."""
    try:
        raw = await asyncio.wait_for(request.body(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s") from None
    try:  # the bounded reader: deep nesting, huge integers and lone surrogates are a 400, not a 500
        return parse_json(raw)
    except BadDocument as exc:
        raise APIError(400, f"the request body is refused: {exc}") from None


@dataclass
class ServerSecurity:
    """Who may talk to the server, and how long it waits for them (see docs/serving.md)."""

    api_key: Annotated[
        str | None,
        Opt(
            "require this key (Authorization: Bearer KEY, as OpenAI clients send it) on /v1 requests",
            default_text="$OPENLLM_API_KEY, else none",
        ),
    ] = None
    allowed_hosts: Annotated[
        tuple[str, ...] | None,
        Opt(
            "Host header names the server answers (DNS-rebinding guard); '*' for any",
            nargs="+",
            metavar="HOST",
            default_text="localhost names when bound to loopback, else the bind address and localhost names",
        ),
    ] = None
    cors_origins: Annotated[
        tuple[str, ...] | None,
        Opt(
            "origins whose web pages may call the API from a browser (CORS)",
            nargs="+",
            metavar="ORIGIN",
            default_text="none",
        ),
    ] = None
    body_timeout: Annotated[float, Opt("seconds to wait for a request body", parse=positive_float)] = 10.0
    header_timeout: Annotated[float, Opt("seconds to wait for a request's headers", parse=positive_float)] = 10.0

    LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")

    def hosts_for(self, bind: str) -> tuple[str, ...]:
        if self.allowed_hosts:
            return tuple(self.allowed_hosts)
        if bind in self.LOCAL_NAMES or bind.startswith("127."):
            return self.LOCAL_NAMES
        return (bind, *self.LOCAL_NAMES)

    def check(self, headers, path: str, method: str) -> None:
        hosts = self.allowed_hosts or self.LOCAL_NAMES
        if "*" not in hosts:
            host = _host_name(headers.get("host", ""))
            if host not in hosts:
                raise APIError(
                    421,
                    f"requests for host '{host}' are not served here (allowed: {', '.join(hosts)})",
                    kind="invalid_request_error",
                )
        if method == "POST" and not headers.get("content-type", "").lower().startswith("application/json"):
            raise APIError(415, "send the request body as JSON (Content-Type: application/json)")
        if self.api_key and path.startswith(("/v1", "/tokenize", "/detokenize")):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise APIError(
                    401, "missing or wrong API key (send Authorization: Bearer KEY)", kind="authentication_error"
                )


def _host_name(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def header_timeout_protocol(seconds: float):
    """uvicorn's HTTP/1.1 protocol, closing connections that have not sent a complete request head in time
    (uvicorn itself only times out idle keep-alive connections between requests)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _head_timeout(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None:
                self._head_timer.cancel()

        def connection_lost(self, exc) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
