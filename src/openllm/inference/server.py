"""An OpenAI-compatible HTTP server with a small web page: the transport only.

``POST /v1/completions`` (prompts as text, token ids or lists of either; echo, logprobs, logit_bias,
penalties, stop, n, seed, stream with an optional usage chunk), ``POST /v1/chat/completions``
(through the tokenizer's chat template, or a plain default), ``GET /v1/models`` and
``/v1/models/{id}``, ``POST /tokenize`` and ``/detokenize``, ``GET /health`` and ``GET /`` (a page
to try the model). Errors use the OpenAI error shape.

What a request means is in :mod:`openllm.inference.protocol` (validation, the answer builder); how it
is generated in :mod:`openllm.inference.completions` on the continuously batched engine
(:mod:`openllm.inference.engine`); who may ask and how much in :mod:`openllm.inference.security`.
Requests beyond ``max_queue`` answer 429; a client that disconnects frees its rows.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at run time

import asyncio
import threading
import time
import uuid
from pathlib import Path

from openllm.core.errors import OpenLLMError
from openllm.inference.completions import Completions
from openllm.inference.loading import LoadedModel, load_model
from openllm.inference.protocol import (
    APIError,
    CompletionRequest,
    answer_object,
    check_text,
    choice_object,
    event,
    parse_chat,
    parse_completion,
    usage_object,
)
from openllm.inference.security import Guard, ServerLimits, ServerSecurity, header_timeout_protocol, read_json_body

PAGE = Path(__file__).parent / "static" / "index.html"


def create_app(
    loaded: LoadedModel,
    model_id: str = "openllm",
    limits: ServerLimits | None = None,
    device="cpu",
    security: ServerSecurity | None = None,
):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    EventStream = event_stream_class()

    limits = limits or ServerLimits()
    security = security or ServerSecurity()
    engine = Completions(loaded, limits, device)
    app = FastAPI(title="OpenLLM", docs_url=None, redoc_url=None)
    app.state.engine = engine
    tok = loaded.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(OpenLLMError)
    async def _openllm_error(_request, exc: OpenLLMError):
        # what the library refuses while serving (text the tokenizer fails on) is the request's problem,
        # said in the OpenAI shape rather than as a plain-text 500
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    app.add_middleware(Guard, security=security)  # plain ASGI: keeps request.is_disconnected() working

    if security.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(security.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    model_card = {
        "id": model_id,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "openllm",
        "context_length": loaded.model.config.block_size,
    }

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model_id,
            "waiting": engine.waiting,
            "served": engine.served,
            "generating": engine.batcher.busy,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise APIError(404, f"the model '{name}' is not served here (this server serves '{model_id}')", "model")
        return model_card

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", model_id)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json_body(request, security.body_timeout)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or set(body) - {"prompt", "model"}:
            raise APIError(400, 'send {"prompt": TEXT}', "prompt")
        check_text(body["prompt"], "prompt")
        ids = engine.encode(body["prompt"]) if body["prompt"] else tok.prefix()  # all of them, however many
        return {"tokens": ids, "count": len(ids), "max_model_len": loaded.model.config.block_size}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json_body(request, security.body_timeout)
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids):
            raise APIError(400, f'send {{"tokens": [ids in 0..{tok.vocab_size - 1}]}}', "tokens")
        return {"prompt": tok.decode(ids)}

    async def run(request: Request, req: CompletionRequest, chat: bool):
        # encoded once, before admission: a prompt the vocabulary cannot encode is refused without waiting
        prompt_ids = engine.prompt_ids(req, "messages" if chat else "prompt")
        engine.admit()
        cancel = threading.Event()
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return EventStream(_stream(engine, req, prompt_ids, cid, cancel, model_id, chat), cancel, engine.release)
        try:
            work = asyncio.ensure_future(engine.complete(req, prompt_ids, cancel))
            while not (await asyncio.wait({work}, timeout=0.25))[0]:
                if await request.is_disconnected():  # the client gave up: stop generating for nobody
                    cancel.set()
            choices, counts = await work
        finally:
            engine.release()
        return answer_object(
            cid,
            model_id,
            chat,
            False,
            [choice_object(chat, False, c.index, c.text, c.logprobs, c.finish) for c in choices],
            usage_object(counts["prompt"], counts["completion"]),
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json_body(request, security.body_timeout)
        return await run(request, parse_completion(body, engine.api_limits(), model_id), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json_body(request, security.body_timeout)
        req, _ = parse_chat(body, engine.api_limits(), model_id, tok)
        return await run(request, req, chat=True)

    return app


def event_stream_class():
    """The response of a streamed answer: its server-sent events sent straight to the ASGI server as they
    come, ``cancel`` set when the client disconnects, and ``done`` called once whatever happens. (Starlette's
    StreamingResponse runs a task group per response for the same; this is on the path of every streamed
    request.)"""
    from starlette.responses import Response

    class EventStream(Response):
        media_type = "text/event-stream"

        def __init__(self, events, cancel: threading.Event, done):
            self.status_code, self.background = 200, None
            self.events, self.cancel, self.done = events, cancel, done
            self.init_headers({"Cache-Control": "no-cache"})  # (no body: no Content-Length, so chunked)

        async def __call__(self, scope, receive, send) -> None:
            async def until_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.cancel.set()  # the engine ends the answer's rows at its next step

            watcher = asyncio.ensure_future(until_disconnect())
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for chunk in self.events:
                    await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                watcher.cancel()
                try:
                    await self.events.aclose()
                finally:
                    self.done()

    return EventStream


def _tail(req: CompletionRequest, cid: str, model_id: str, chat: bool, counts: dict, cancel: threading.Event) -> str:
    """What ends a streamed answer: the usage chunk when asked for, and ``[DONE]``."""
    usage = usage_object(counts["prompt"], counts["completion"])
    asked = req.include_usage and not cancel.is_set()
    return (event(answer_object(cid, model_id, chat, True, [], usage)) if asked else "") + "data: [DONE]\n\n"


async def _stream(
    engine: Completions,
    req: CompletionRequest,
    prompt_ids: list[list[int]],
    cid: str,
    cancel: threading.Event,
    model_id: str,
    chat: bool,
):
    """The server-sent events of a streamed answer: a chunk per piece (each holding every token that came
    since the last), those ready together in one write; the usage chunk when asked for and ``[DONE]`` with
    the last."""
    counts = {"prompt": 0, "completion": 0}
    started: set[int] = set()
    last, ended = len(prompt_ids) * req.n - 1, False  # the last choice's end is the answer's end
    answer = engine.pieces(req, prompt_ids, cancel, counts)
    try:
        async for pieces in answer:
            events = []
            for piece in pieces:
                first = piece.index not in started
                started.add(piece.index)
                choice = choice_object(chat, True, piece.index, piece.text, piece.logprobs, piece.finish, first)
                events.append(event(answer_object(cid, model_id, chat, True, [choice])))
            if pieces[-1].finish and pieces[-1].index == last:  # (the tail goes in the same write)
                events.append(_tail(req, cid, model_id, chat, counts, cancel))
                ended = True
            yield "".join(events)
        if not ended:
            yield _tail(req, cid, model_id, chat, counts, cancel)
    finally:
        cancel.set()  # the client went away (or we finished): the engine stops its rows at its next step
        await answer.aclose()  # (its rows given back and counted now, not when it is collected)


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
    sock = listening_socket(host, port)  # first: a busy port is one error before anything is loaded or said
    loaded = load_model(model_path, device)
    app = create_app(loaded, Path(model_path).name or "openllm", limits, device, security)
    config = uvicorn.Config(
        app, log_level="warning", timeout_keep_alive=5, http=header_timeout_protocol(security.header_timeout)
    )
    print(
        f"serving {model_path} on http://{host}:{port} (OpenAI API at /v1, web page at /"
        f"{', API key required' if security.api_key else ''})",
        flush=True,
    )
    uvicorn.Server(config).run(sockets=[sock])


def listening_socket(host: str, port: int):
    """A socket bound to ``host:port`` and listening, or one error naming the address and why."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OpenLLMError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = (
            " (another server is listening there: stop it or choose another --port)"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        raise OpenLLMError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock
