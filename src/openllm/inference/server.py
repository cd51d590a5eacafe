"""An OpenAI-compatible HTTP server with a small web page.

``POST /v1/completions`` (prompts as text, token ids or lists of either; echo, logprobs, logit_bias,
penalties, stop, n, seed, stream with an optional usage chunk), ``POST /v1/chat/completions``
(through the tokenizer's chat template, or a plain default), ``GET /v1/models`` and
``/v1/models/{id}``, ``POST /tokenize`` and ``/detokenize``, ``GET /health`` and ``GET /`` (a page
to try the model). Request validation is in :mod:`openllm.inference.api`.

Generation runs off the event loop, continuously batched (:mod:`openllm.inference.batching`): up to
``max_batch`` sequences, from any requests, advance together one batched model call per step, and
a finished sequence's row is refilled from the waiting ones between steps. Requests beyond
``max_queue`` answer 429. A client that disconnects frees its rows. Errors use the OpenAI error shape.
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
from openllm.core.memory import available_memory, gib
from openllm.core.options import MAX_NEW_TOKENS, Opt, at_most, positive_float, positive_int
from openllm.core.untrusted import BadDocument, parse_json
from openllm.inference.api import (
    APIError,
    CompletionRequest,
    Limits,
    check_text,
    parse_chat,
    parse_completion,
)
from openllm.inference.batching import Batcher, TokenStream
from openllm.inference.generate import PromptTooLong, SamplingOptions, TextStream, choice_seed, fit_prompt
from openllm.inference.loading import LoadedModel, load_model
from openllm.inference.logprobs import Logprobs, chat_logprobs, join_logprobs, score_tokens, token_texts

PAGE = Path(__file__).parent / "static" / "index.html"
MAX_QUEUE = 4096  # requests waiting at once: each is served by a thread of its own


@dataclass
class ServerLimits:
    """What the server takes on at once; each bound is checked where it is declared (the command line) and
    again when the server starts (:meth:`check`), so that no value can fork a thread per request without
    limit or allocate a key/value cache beyond memory."""

    max_tokens: Annotated[int, Opt("largest max_tokens a request may ask for", parse=at_most(MAX_NEW_TOKENS))] = 1024
    max_prompt_chars: int = 20_000
    max_n: int = 8
    max_queue: Annotated[
        int,
        Opt(
            f"requests waiting before the server answers 429 (each waits in a thread; at most {MAX_QUEUE})",
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

    def check(self, model, device) -> None:
        """Refuse, by option name, a value past its bound: ``max_batch`` against the memory free on ``device``."""
        for name, most in (("max_tokens", MAX_NEW_TOKENS), ("max_queue", MAX_QUEUE), ("max_batch", None)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or (most is not None and value > most):
                bound = f" up to {most:,}" if most else ""
                raise OpenLLMError(f"--{name.replace('_', '-')} must be a positive integer{bound}, got {value!r}")
        per_row, free = model.cache_bytes(1), available_memory(device)
        if free is not None and per_row * self.max_batch > free:
            raise OpenLLMError(
                f"--max-batch {self.max_batch:,} needs a key/value cache of {gib(per_row * self.max_batch)} "
                f"({self.max_batch:,} sequences x {model.config.block_size:,} positions), more than the {gib(free)} "
                f"free; at most {free // per_row:,} fit"
            )


@dataclass
class Choice:
    """One finished choice: its text, why it ended, its logprobs object and its generated token count."""

    text: str
    finish_reason: str
    logprobs: dict | None
    completion_tokens: int
    prompt_tokens: int


class Engine:
    """Owns the model and its batcher; each admitted request is served by a thread of ``pool`` that reads its
    sequences' tokens from the batcher."""

    def __init__(self, loaded: LoadedModel, limits: ServerLimits, device="cpu"):
        self.loaded, self.limits, self.device = loaded, limits, device
        limits.check(loaded.model, device)
        self.batcher = Batcher(loaded.model, limits.max_batch, device)
        self.pool = ThreadPoolExecutor(max_workers=limits.max_queue, thread_name_prefix="openllm-req")
        self.waiting = 0
        self.served = 0
        self.cancelled = 0  # generations stopped because their client went away
        self.lock = threading.Lock()

    def api_limits(self) -> Limits:
        lim = self.limits
        return Limits(
            lim.max_tokens,
            lim.max_prompt_chars,
            lim.max_n,
            lim.max_prompts,
            self.loaded.tokenizer.vocab_size,
            self.loaded.model.config.block_size,
        )

    def admit(self) -> None:
        with self.lock:
            if self.waiting >= self.limits.max_queue:
                raise APIError(429, "the server is busy (queue full); retry later", kind="rate_limit_error")
            self.waiting += 1

    def release(self) -> None:
        with self.lock:
            self.waiting -= 1
            self.served += 1

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A text prompt framed as a document start; token ids exactly as given."""
        if isinstance(prompt, str):
            try:  # text the vocabulary cannot represent (a character vocabulary) is the caller's error
                return self.loaded.tokenizer.prompt_ids(prompt)
            except OpenLLMError as exc:
                raise APIError(400, str(exc), "prompt") from None
        return list(prompt)

    def prompt_ids(self, req: CompletionRequest, param: str = "prompt") -> list[list[int]]:
        """Each prompt's ids as generation uses them. A prompt longer than the model's context is refused
        as OpenAI refuses one (400, code context_length_exceeded), never cut silently; with the request's
        'truncate_prompt_tokens' only its last tokens are used, and from then on that prompt is those ids
        (``echo`` repeats the text of the ids kept)."""
        context = self.loaded.model.config.block_size
        out = []
        for i, prompt in enumerate(req.prompts):
            ids = self.encode(prompt)
            try:
                kept = fit_prompt(ids, context, req.truncate_prompt_tokens)
            except PromptTooLong as exc:
                which = f" in prompt {i}" if len(req.prompts) > 1 else ""
                raise APIError(
                    400,
                    f"This model's maximum context length is {context} tokens, however you requested {exc.length} "
                    f"tokens{which}. Please reduce the prompt, or send 'truncate_prompt_tokens' to use only its last "
                    "tokens.",
                    param,
                    code="context_length_exceeded",
                ) from None
            out.append(kept)
        return out

    def start(self, req: CompletionRequest, ids: list[int], index: int, cancel: threading.Event) -> TokenStream:
        """Queue choice ``index`` (of prompt ``ids``) with the batcher; its tokens come as they are made."""
        opts = SamplingOptions(
            max_new_tokens=req.max_tokens,
            temperature=req.temperature,
            top_k=None,
            top_p=req.top_p,
            seed=choice_seed(req.seed, index),
            logit_bias=req.logit_bias or None,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
        )
        return self.batcher.submit(ids, opts, self.loaded.tokenizer.eos_id, cancel)

    def pieces(
        self, req: CompletionRequest, ids: list[int], tokens: TokenStream, cancel: threading.Event, out: dict
    ) -> Iterator[str]:
        """Text pieces of one completion of prompt ``ids`` (its ``tokens`` from :meth:`start`); stops at EOS,
        max_tokens, a stop string or ``cancel``, and then gives the sequence's row back.

        ``out`` receives "reason" ("length" or "stop"), "tokens" (how many were generated) and, when asked,
        "logprobs" (a :class:`Logprobs` of the generated tokens; echoed prompt tokens are added by the caller)."""
        out.update(reason="stop", tokens=0)
        if req.max_tokens == 0:
            out["reason"] = "length"
            tokens.close()
            return
        try:
            yield from self._pieces(req, ids, tokens, cancel, out)
        finally:
            tokens.close()
            if cancel.is_set():
                with self.lock:
                    self.cancelled += 1

    def _pieces(
        self, req: CompletionRequest, ids: list[int], tokens: TokenStream, cancel: threading.Event, out: dict
    ) -> Iterator[str]:
        tok = self.loaded.tokenizer
        stream = TextStream(tok, ids)
        lp = Logprobs(tok, req.logprobs, context=ids[-8:]) if req.logprobs is not None else None
        out["logprobs"] = lp
        emitted = 0  # characters of stream.text already sent
        hold = max((len(s) - 1 for s in req.stop), default=0)  # keep back a possible stop-string prefix
        for token, logp in tokens:
            if cancel.is_set():
                return
            piece = stream.push(token)
            out["tokens"] += 1
            if lp is not None:
                lp.add_step(token, piece, logp)
            text = stream.text
            cut = min((text.find(s) for s in req.stop if s in text), default=-1)
            if cut >= 0:
                if lp is not None:  # the logprobs end where the text does
                    lp.truncate(sum(1 for o in lp.text_offset if o < cut))
                if cut > emitted:
                    yield text[emitted:cut]
                return
            if len(stream.ids) == req.max_tokens:
                out["reason"] = "length"
            safe = len(text) - hold
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        if cancel.is_set():  # the batcher ended it: nobody reads the rest
            return
        stream.finish()
        if len(stream.text) > emitted:
            yield stream.text[emitted:]
        if lp is not None and tokens.end is not None:
            # the end-of-text token closes the logprobs (with no text), as OpenAI-style servers report it: a
            # harness scoring `echo` + `max_tokens: 1` drops the last entry as the generated one
            lp.add_step(tokens.end.token, "", tokens.end.logp)

    def echo_logprobs(self, ids: list[int], k: int) -> Logprobs:
        """The prompt's tokens with their log-probabilities (the first has none)."""
        tok = self.loaded.tokenizer
        lp = Logprobs(tok, k)
        scores = score_tokens(self.loaded.model, ids, k, self.device)
        for i, (token, text) in enumerate(zip(ids, token_texts(tok, ids), strict=True)):
            if i == 0:
                lp.add(token, text, None, None)
            else:
                lp.add(token, text, scores[i - 1][0], scores[i - 1][1])
        return lp

    def echo_text(self, ids: list[int]) -> str:
        """What ``echo`` repeats: the text of the tokens the model was given, which the echoed logprobs
        tokens join into exactly (a text prompt the tokenizer reproduces, as a byte-fallback SentencePiece
        model does, comes back as sent; a truncated prompt as the part kept)."""
        return self.loaded.tokenizer.decode(ids)

    def start_all(
        self, req: CompletionRequest, prompt_ids: list[list[int]], cancel: threading.Event
    ) -> list[TokenStream]:
        """Every choice queued at once (choice p * n + i: prompt p, sample i), so they are batched together."""
        return [self.start(req, ids, p * req.n + i, cancel) for p, ids in enumerate(prompt_ids) for i in range(req.n)]

    def complete(self, req: CompletionRequest, prompt_ids: list[list[int]], cancel: threading.Event) -> list[Choice]:
        """Every choice of the request (``prompt_ids``: each prompt's ids): for prompt p and sample i, choice
        p * n + i."""
        streams = self.start_all(req, prompt_ids, cancel)  # all choices generate together
        try:
            return [
                self._choice(req, ids, streams[p * req.n + i], cancel)
                for p, ids in enumerate(prompt_ids)
                for i in range(req.n)
            ]
        finally:
            for stream in streams:
                stream.close()

    def _choice(self, req: CompletionRequest, ids: list[int], tokens: TokenStream, cancel) -> Choice:
        out: dict = {}
        text = "".join(self.pieces(req, ids, tokens, cancel, out))
        logprobs = None
        if req.echo:
            prefix = self.echo_text(ids)
            if req.logprobs is not None:
                echoed = self.echo_logprobs(ids, req.logprobs)
                echoed.extend(out.get("logprobs"), len(prefix))
                logprobs = echoed.as_dict()
            text = prefix + text
        elif out.get("logprobs") is not None:
            logprobs = out["logprobs"].as_dict()
        return Choice(text, out["reason"], logprobs, out["tokens"], len(ids))


def usage(choices: list[Choice], n: int) -> dict:
    prompt = sum(c.prompt_tokens for c in choices[::n])  # each prompt counted once, not once per sample
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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
    tok = loaded.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(OpenLLMError)
    async def _openllm_error(_request, exc: OpenLLMError):
        # what the library refuses while serving (text the tokenizer fails on) is the request's problem,
        # said in the OpenAI shape rather than as a plain-text 500
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    app.add_middleware(_Guard, security=security)  # plain ASGI: keeps request.is_disconnected() working

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
        "created": created,
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
        body = await _json_body(request, security.body_timeout)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or set(body) - {"prompt", "model"}:
            raise APIError(400, 'send {"prompt": TEXT}', "prompt")
        check_text(body["prompt"], "prompt")
        ids = engine.encode(body["prompt"]) if body["prompt"] else tok.prefix()  # all of them, however many
        return {"tokens": ids, "count": len(ids), "max_model_len": loaded.model.config.block_size}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _json_body(request, security.body_timeout)
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
        loop = asyncio.get_running_loop()
        if req.stream:
            return StreamingResponse(
                _stream(engine, req, prompt_ids, cid, cancel, loop, model_id, chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            work = loop.run_in_executor(engine.pool, engine.complete, req, prompt_ids, cancel)
            while not (await asyncio.wait({work}, timeout=0.25))[0]:
                if await request.is_disconnected():  # the client gave up: stop generating for nobody
                    cancel.set()
            results = await work
        finally:
            engine.release()
        base = {"id": cid, "created": int(time.time()), "model": model_id, "usage": usage(results, req.n)}
        if chat:
            return {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": chat_logprobs(c.logprobs),
                        "finish_reason": c.finish_reason,
                    }
                    for i, c in enumerate(results)
                ],
            }
        return {
            **base,
            "object": "text_completion",
            "choices": [
                {"text": c.text, "index": i, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                for i, c in enumerate(results)
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request, security.body_timeout)
        return await run(request, parse_completion(body, engine.api_limits(), model_id), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request, security.body_timeout)
        req, _ = parse_chat(body, engine.api_limits(), model_id, tok)
        return await run(request, req, chat=True)

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


def coalesce(items: list[tuple]) -> list[tuple]:
    """Consecutive pieces of the same choice (none of them its last) joined into one, logprobs too."""
    out: list[tuple] = []
    for item in items:
        if out and out[-1][0] == item[0] and out[-1][2] is None and item[2] is None:
            i, piece, _, logprobs = out[-1]
            out[-1] = (i, piece + item[1], None, join_logprobs(logprobs, item[3]))
        else:
            out.append(item)
    return out


async def _stream(
    engine: Engine,
    req: CompletionRequest,
    prompt_ids: list[list[int]],
    cid: str,
    cancel: threading.Event,
    loop,
    model_id: str,
    chat: bool,
):
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    counts = {"prompt": 0, "completion": 0}

    def send(index: int, piece: str, finish, logprobs: dict | None = None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (index, piece, finish, logprobs))

    def work():
        streams = engine.start_all(req, prompt_ids, cancel)
        try:
            for p, ids in enumerate(prompt_ids):
                counts["prompt"] += len(ids)
                for i in range(req.n):
                    index = p * req.n + i
                    out: dict = {}
                    shift = 0
                    if req.echo:
                        prefix = engine.echo_text(ids)
                        echoed = engine.echo_logprobs(ids, req.logprobs) if req.logprobs is not None else None
                        send(index, prefix, None, echoed.as_dict() if echoed else None)
                        shift = len(prefix)
                    sent = chars = 0  # logprobs entries and characters of the completion sent so far
                    for piece in engine.pieces(req, ids, streams[index], cancel, out):
                        chars += len(piece)
                        lp, entries = out.get("logprobs"), None
                        if lp is not None:  # each token's entry goes with the chunk that holds its text
                            end = lp.covered(sent, chars)
                            entries, sent = lp.as_dict(sent, end, shift), end
                        send(index, piece, None, entries)
                    counts["completion"] += out.get("tokens", 0)
                    if cancel.is_set():
                        return
                    rest = out["logprobs"].as_dict(sent, None, shift) if out.get("logprobs") is not None else None
                    send(index, "", out["reason"], rest)
        finally:
            for stream in streams:  # choices never read (a cancelled stream) give their rows back
                stream.close()
            loop.call_soon_threadsafe(queue.put_nowait, done)

    future = loop.run_in_executor(engine.pool, work)
    future.add_done_callback(lambda _f: engine.release())  # runs even when this stream is cancelled
    kind = "chat.completion.chunk" if chat else "text_completion"
    started: set[int] = set()
    try:
        finished = False
        while not finished:
            items = [await queue.get()]
            while not queue.empty():  # under load, what piled up since goes out in fewer, larger chunks
                items.append(queue.get_nowait())
            if items[-1] is done:
                items.pop()
                finished = True
            events = []
            for i, piece, finish, logprobs in coalesce(items):
                if chat:
                    delta = {} if finish else {"content": piece}
                    if i not in started:  # the first chunk of a choice names the role
                        delta = {"role": "assistant", **delta}
                        started.add(i)
                    choice = {"index": i, "delta": delta, "logprobs": chat_logprobs(logprobs), "finish_reason": finish}
                else:
                    choice = {"text": piece, "index": i, "logprobs": logprobs, "finish_reason": finish}
                chunk = {"id": cid, "object": kind, "created": int(time.time()), "model": model_id, "choices": [choice]}
                events.append(f"data: {json.dumps(chunk)}\n\n")
            if events:
                yield "".join(events)
        if req.include_usage and not cancel.is_set():
            total = counts["prompt"] + counts["completion"]
            usage_chunk = {
                "id": cid,
                "object": kind,
                "created": int(time.time()),
                "model": model_id,
                "choices": [],
                "usage": {
                    "prompt_tokens": counts["prompt"],
                    "completion_tokens": counts["completion"],
                    "total_tokens": total,
                },
            }
            yield f"data: {json.dumps(usage_chunk)}\n\n"
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
