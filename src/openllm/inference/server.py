"""An OpenAI-compatible HTTP server with a small web page.

``POST /v1/completions`` (prompt, max_tokens, temperature, top_p, stop, n, seed, stream),
``GET /v1/models``, ``GET /health`` and ``GET /`` (a page to try the model).

Generation runs on one worker thread, off the event loop: requests wait their turn in a bounded
queue (a full queue answers 429), so two requests never share a model call. A streaming client
that disconnects cancels its generation. Errors use the OpenAI error shape.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at run time

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from openllm.core.errors import OpenLLMError
from openllm.core.options import Opt, positive_float, positive_int
from openllm.inference.generate import SamplingOptions, TextStream, generate_ids, prompt_ids
from openllm.inference.loading import LoadedModel, load_model

PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass
class ServerLimits:
    max_tokens: Annotated[int, Opt("largest max_tokens a request may ask for", parse=positive_int)] = 1024
    max_prompt_chars: int = 20_000
    max_n: int = 8
    max_queue: Annotated[int, Opt("requests waiting before the server answers 429", parse=positive_int)] = 64


# Fields of the OpenAI completions API that this server does not implement yet: accepted only at the value
# that means "off", so that a request relying on them is refused by name instead of silently ignored.
NOT_YET_SUPPORTED: dict[str, tuple] = {
    "echo": (False, None),
    "logprobs": (None,),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "stream_options": (None,),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class CompletionRequest:
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    n: int
    seed: int | None
    stream: bool
    model: str


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


def _check_text(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{field}' is not valid Unicode text (it holds a lone surrogate)", field) from None


def parse_request(body, limits: ServerLimits, model_id: str) -> CompletionRequest:
    """Validate a /v1/completions body; raises :class:`APIError` naming the bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown_ok = {
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "n",
        "seed",
        "stream",
        "user",
        "stream_options",
        "echo",
        "best_of",
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "suffix",
        "logit_bias",
    }
    extra = [k for k in body if k not in unknown_ok]
    if extra:
        raise APIError(400, f"unknown field '{extra[0]}'", extra[0])
    for name, neutral in NOT_YET_SUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise APIError(400, f"'{name}' is not supported by this server (only {neutral[0]!r} is accepted)", name)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise APIError(400, f"'prompt' is longer than {limits.max_prompt_chars} characters", "prompt")
    _check_text(prompt, "prompt")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    for s in stop:
        _check_text(s, "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise APIError(400, "'seed' must be a non-negative integer", "seed")
    model = body.get("model", model_id)
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model")
    return CompletionRequest(
        prompt=prompt,
        max_tokens=_number(body, "max_tokens", 16, 1, limits.max_tokens, integer=True),
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
        stop=stop,
        n=_number(body, "n", 1, 1, limits.max_n, integer=True),
        seed=seed,
        stream=stream,
        model=model,
    )


class Engine:
    """Owns the model; runs one generation at a time on a worker thread."""

    def __init__(self, loaded: LoadedModel, limits: ServerLimits, device="cpu"):
        self.loaded, self.limits, self.device = loaded, limits, device
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openllm-gen")
        self.waiting = 0
        self.served = 0
        self.cancelled = 0  # generations stopped because their client went away
        self.lock = threading.Lock()

    def admit(self) -> None:
        with self.lock:
            if self.waiting >= self.limits.max_queue:
                raise APIError(429, "the server is busy (queue full); retry later", kind="rate_limit_error")
            self.waiting += 1

    def release(self) -> None:
        with self.lock:
            self.waiting -= 1
            self.served += 1

    def tokens(self, req: CompletionRequest, index: int, cancel: threading.Event, finish: dict) -> Iterator[str]:
        """Text pieces of one completion; stops at EOS, max_tokens, a stop string or ``cancel``.

        ``finish["reason"]`` is set to "length" when max_tokens ran out, else "stop"."""
        finish["reason"] = "stop"
        tok, model = self.loaded.tokenizer, self.loaded.model
        opts = SamplingOptions(
            max_new_tokens=req.max_tokens,
            temperature=req.temperature,
            top_k=None,
            top_p=req.top_p,
            seed=None if req.seed is None else req.seed + index,
        )
        ids, _ = prompt_ids(tok, req.prompt, model.config.block_size)
        stream = TextStream(tok, ids)
        emitted = 0  # characters of stream.text already sent
        hold = max((len(s) - 1 for s in req.stop), default=0)  # keep back a possible stop-string prefix
        for token in generate_ids(model, ids, opts, self.device, tok.eos_id):
            if cancel.is_set():
                with self.lock:
                    self.cancelled += 1
                return
            stream.push(token)
            text = stream.text
            cut = min((text.find(s) for s in req.stop if s in text), default=-1)
            if cut >= 0:
                if cut > emitted:
                    yield text[emitted:cut]
                return
            if len(stream.ids) == req.max_tokens:
                finish["reason"] = "length"
            safe = len(text) - hold
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        stream.finish()
        if len(stream.text) > emitted:
            yield stream.text[emitted:]

    def complete(self, req: CompletionRequest, cancel: threading.Event) -> list[tuple[str, str]]:
        results = []
        for i in range(req.n):
            finish: dict = {}
            text = "".join(self.tokens(req, i, cancel, finish))
            results.append((text, finish["reason"]))
        return results


def create_app(
    loaded: LoadedModel,
    model_id: str = "openllm",
    limits: ServerLimits | None = None,
    device="cpu",
    security: "ServerSecurity | None" = None,
):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    limits = limits or ServerLimits()
    security = security or ServerSecurity()
    engine = Engine(loaded, limits, device)
    app = FastAPI(title="OpenLLM", docs_url=None, redoc_url=None)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    app.add_middleware(_Guard, security=security)  # plain ASGI: keeps request.is_disconnected() working

    if security.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(security.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "waiting": engine.waiting, "served": engine.served}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_id,
                    "object": "model",
                    "created": created,
                    "owned_by": "openllm",
                    "context_length": loaded.model.config.block_size,
                }
            ],
        }

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", model_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request, security.body_timeout)
        req = parse_request(body, limits, model_id)
        try:  # text the vocabulary cannot represent (a character vocabulary) is the caller's error
            loaded.tokenizer.prompt_ids(req.prompt)
        except OpenLLMError as exc:
            raise APIError(400, str(exc), "prompt") from None
        engine.admit()
        cancel = threading.Event()
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        loop = asyncio.get_running_loop()
        if not req.stream:
            try:
                work = loop.run_in_executor(engine.pool, engine.complete, req, cancel)
                while not (await asyncio.wait({work}, timeout=0.25))[0]:
                    if await request.is_disconnected():  # the client gave up: stop generating for nobody
                        cancel.set()
                results = await work
            finally:
                engine.release()
            return {
                "id": cid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_id,
                "choices": [
                    {"text": t, "index": i, "logprobs": None, "finish_reason": f} for i, (t, f) in enumerate(results)
                ],
                "usage": _usage(loaded, req, [t for t, _ in results]),
            }
        return StreamingResponse(
            _stream(engine, req, cid, cancel, loop, model_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    return app


class _Guard:
    """ASGI middleware applying :meth:`ServerSecurity.check` to every HTTP request."""

    def __init__(self, app, security: "ServerSecurity"):
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


async def _json_body(request, timeout: float) -> dict:
    """The request's JSON body, read within ``timeout`` seconds; any failure is a 4xx in the OpenAI shape."""
    try:
        raw = await asyncio.wait_for(request.body(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


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


def _usage(loaded: LoadedModel, req: CompletionRequest, texts: list[str]) -> dict:
    p = len(loaded.tokenizer.prompt_ids(req.prompt))
    c = sum(len(loaded.tokenizer.encode(t)) for t in texts)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _stream(engine: Engine, req: CompletionRequest, cid: str, cancel: threading.Event, loop, model_id: str):
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def work():
        try:
            for i in range(req.n):
                finish: dict = {}
                for piece in engine.tokens(req, i, cancel, finish):
                    loop.call_soon_threadsafe(queue.put_nowait, (i, piece, None))
                if cancel.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, (i, "", finish["reason"]))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    future = loop.run_in_executor(engine.pool, work)
    future.add_done_callback(lambda _f: engine.release())  # runs even when this stream is cancelled
    try:
        while True:
            item = await queue.get()
            if item is done:
                break
            i, piece, finish = item
            chunk = {
                "id": cid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_id,
                "choices": [{"text": piece, "index": i, "logprobs": None, "finish_reason": finish}],
            }
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # the client went away (or we finished): the worker stops at its next token


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServerLimits | None = None,
    device="cpu",
    security: ServerSecurity | None = None,
) -> None:
    import dataclasses
    import os

    import uvicorn

    security = security or ServerSecurity()
    security = dataclasses.replace(
        security,
        api_key=security.api_key or os.environ.get("OPENLLM_API_KEY") or None,
        allowed_hosts=security.hosts_for(host),
    )
    loaded = load_model(model_path, device)
    app = create_app(loaded, Path(model_path).name or "openllm", limits, device, security)
    print(
        f"serving {model_path} on http://{host}:{port} (OpenAI API at /v1, web page at /"
        f"{', API key required' if security.api_key else ''})",
        flush=True,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_keep_alive=5,
        http=header_timeout_protocol(security.header_timeout),
    )


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
