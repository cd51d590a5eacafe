"""An OpenAI-compatible HTTP server with a small web page.

``POST /v1/completions`` (prompt, max_tokens, temperature, top_p, stop, n, seed, stream),
``GET /v1/models``, ``GET /health`` and ``GET /`` (a page to try the model).

Generation runs on one worker thread, off the event loop: requests wait their turn in a bounded
queue (a full queue answers 429), so two requests never share a model call. A streaming client
that disconnects cancels its generation. Errors use the OpenAI error shape.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at run time

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from openllm.core.options import Opt, positive_int
from openllm.inference.generate import SamplingOptions, TextStream, generate_ids, prompt_ids
from openllm.inference.loading import LoadedModel, load_model

PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass
class ServerLimits:
    max_tokens: Annotated[int, Opt("largest max_tokens a request may ask for", parse=positive_int)] = 1024
    max_prompt_chars: int = 20_000
    max_n: int = 8
    max_queue: Annotated[int, Opt("requests waiting before the server answers 429", parse=positive_int)] = 64


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
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise APIError(400, f"'prompt' is longer than {limits.max_prompt_chars} characters", "prompt")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
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
        stream = TextStream(tok)
        emitted = 0  # characters of stream.text already sent
        hold = max((len(s) - 1 for s in req.stop), default=0)  # keep back a possible stop-string prefix
        for token in generate_ids(model, ids, opts, self.device):
            if cancel.is_set():
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


def create_app(loaded: LoadedModel, model_id: str = "openllm", limits: ServerLimits | None = None, device="cpu"):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    limits = limits or ServerLimits()
    engine = Engine(loaded, limits, device)
    app = FastAPI(title="OpenLLM", docs_url=None, redoc_url=None)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

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
        raw = await request.body()
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        req = parse_request(body, limits, model_id)
        engine.admit()
        cancel = threading.Event()
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        loop = asyncio.get_running_loop()
        if not req.stream:
            try:
                results = await loop.run_in_executor(engine.pool, engine.complete, req, cancel)
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


def _usage(loaded: LoadedModel, req: CompletionRequest, texts: list[str]) -> dict:
    p = len(loaded.tokenizer.encode(req.prompt)) + 1
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
    model_path: str, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None, device="cpu"
) -> None:
    import uvicorn

    loaded = load_model(model_path, device)
    app = create_app(loaded, Path(model_path).name or "openllm", limits, device)
    print(f"serving {model_path} on http://{host}:{port} (OpenAI API at /v1, web page at /)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
