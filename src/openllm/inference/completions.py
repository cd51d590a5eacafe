"""OpenAI completions on the inference engine: each choice of a request (``n`` per prompt) is one engine
sequence, all queued at once so they are batched together, and their steps become the API's text pieces
(stop strings, ``max_tokens``, ``echo``, ``logprobs``) on the server's event loop.

The engine runs on its own thread; a request waits on the event loop, not in a thread of its own. The
engine hands the steps over to their readers with one wake-up of the loop per step, or fewer
(:class:`Hub`), so the loop's work grows with wake-ups and streams, not with tokens.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer import Tokenizer
from openllm.inference.detokenize import TextStream
from openllm.inference.engine import Engine, Finished, PromptTooLong, Reader, Step, fit_prompt
from openllm.inference.loading import LoadedModel
from openllm.inference.logprobs import Logprobs, join_logprobs, score_tokens, token_texts
from openllm.inference.protocol import APIError, CompletionRequest, Limits
from openllm.inference.sampling import SamplingOptions, choice_seed
from openllm.inference.security import ServerLimits


class Hub:
    """The readers on one event loop: the engine hands them their steps with one call into the loop per step,
    or fewer.

    A reader's first step and its end go out at once; its other steps wait until the next wake-up due every
    ``interval`` seconds, so that under load a wake-up (and a streamed chunk) carries several tokens, and the
    event loop's work per token shrinks as the number of streams grows. A reader sees its steps only when
    they are handed over (not as the engine makes them), so it cannot be drawn into taking them one by one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.0):
        self.loop, self.interval = loop, interval
        self.pending: list[LoopReader] = []  # readers with steps not handed over (the engine's thread only)
        self.due = 0.0  # when the next wake-up of every pending reader is due

    def flush(self) -> None:
        """Hand over the steps that are due (the engine calls this after each step)."""
        if not self.pending:
            return
        now = time.monotonic()
        every = now >= self.due
        batch = [r for r in self.pending if every or r.urgent]
        if not batch:
            return
        self.pending = [] if every else [r for r in self.pending if not r.urgent]
        if every:
            self.due = now + self.interval
        for reader in batch:
            incoming, reader.incoming, reader.urgent = reader.incoming, [], False
            reader.items.extend(incoming)
        try:
            self.loop.call_soon_threadsafe(_ready, batch)
        except RuntimeError:  # the loop has closed: nobody reads these any more
            for reader in batch:
                reader.close()


def _ready(readers: list[LoopReader]) -> None:
    for reader in readers:
        reader.ready.set()


class LoopReader(Reader):
    """A sequence's steps for a coroutine: the engine puts them on its thread, its :class:`Hub` hands them
    over, :meth:`get` takes them."""

    def __init__(self, hub: Hub):
        self.hub, self.wake = hub, hub.flush
        self.incoming: list = []  # put, not handed over yet (the engine's thread only)
        self.urgent = False  # the first step or the end is among them
        self.started = False
        self.items: collections.deque = collections.deque()  # handed over
        self.ready = asyncio.Event()

    def put(self, item) -> None:
        if not self.incoming:  # (a reader is pending exactly while it has steps not handed over)
            self.hub.pending.append(self)
        self.incoming.append(item)
        if not self.started or not isinstance(item, Step):
            self.started = self.urgent = True

    async def get(self) -> list:
        """Every item handed over since the last call (waiting for one if there is none)."""
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return [self.items.popleft() for _ in range(len(self.items))]


@dataclass
class Piece:
    """A piece of choice ``index``: its text, the logprobs entries of that text, and, in a choice's last piece
    (whose text is ""), why it ended."""

    index: int
    text: str
    logprobs: dict | None = None
    finish: str | None = None


class ChoiceText:
    """One choice's text as its tokens come: decoded in context, cut at the first stop string (text that may
    begin one is held back until that is decided), with its logprobs entries when asked for."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], req: CompletionRequest):
        self.stream = TextStream(tokenizer, prompt)
        self.lp = Logprobs(tokenizer, req.logprobs, context=prompt[-8:]) if req.logprobs is not None else None
        self.stop, self.max_tokens = req.stop, req.max_tokens
        self.hold = max((len(s) - 1 for s in req.stop), default=0)
        self.pending = ""  # decoded and not yet sent
        self.sent = 0  # characters sent
        self.entries = 0  # logprobs entries sent
        self.tokens = 0
        self.reason = "stop"
        self.cut = False  # a stop string ended the text

    def add(self, step: Step) -> None:
        piece = self.stream.push(step.token)
        self.tokens += 1
        if self.lp is not None:
            self.lp.add(step.token, piece, step.logprob, step.top)
        self.pending += piece
        # (earlier text held no stop string, so one can only begin in the held-back part)
        cut = min((self.pending.find(s) for s in self.stop if s in self.pending), default=-1)
        if cut >= 0:
            self.cut, self.pending = True, self.pending[:cut]
            if self.lp is not None:  # the logprobs end where the text does
                self.lp.truncate(sum(1 for o in self.lp.text_offset if o < self.sent + cut))
        elif self.tokens == self.max_tokens:
            self.reason = "length"

    def add_all(self, steps: list[Step]) -> None:
        """:meth:`add` each of ``steps`` (until a stop string ends the text), decoding them together where no
        per-token text is needed: without logprobs, and unless a stop string comes in them."""
        if self.lp is None and len(steps) > 1:
            before = self.stream.copy() if self.stop else self.stream
            pending = self.pending + self.stream.push_many([s.token for s in steps])
            if not any(s in pending for s in self.stop):
                self.pending = pending
                self.tokens += len(steps)
                if self.tokens == self.max_tokens:
                    self.reason = "length"
                return
            self.stream = before  # a stop string: token by token, to end the text (and the count) where it does
        for step in steps:
            self.add(step)
            if self.cut:
                return

    def take(self, shift: int, final: bool = False) -> tuple[str, dict | None]:
        """The text that can be sent now (all of it when ``final``) and its logprobs entries, their offsets
        moved by ``shift`` (the echoed prompt's length)."""
        if final:
            self.pending += self.stream.finish()
        safe = len(self.pending) if final or self.cut else len(self.pending) - self.hold
        text, self.pending = self.pending[: max(safe, 0)], self.pending[max(safe, 0) :]
        self.sent += len(text)
        entries = None
        if self.lp is not None and text:
            end = self.lp.covered(self.entries, self.sent)
            entries, self.entries = self.lp.as_dict(self.entries, end, shift), end
        return text, entries

    def rest(self, shift: int, eos: Step | None = None) -> dict | None:
        """The logprobs entries not sent yet; the end-of-text token that ended the choice closes them (with no
        text), as OpenAI-style servers report it: a harness scoring ``echo`` + ``max_tokens: 1`` drops the last
        entry as the generated one."""
        if self.lp is None:
            return None
        if eos is not None:
            self.lp.add(eos.token, "", eos.logprob, eos.top)
        return self.lp.as_dict(self.entries, None, shift)


class Completions:
    """The model, its engine and the OpenAI semantics around it; counts what is waiting and was served."""

    def __init__(self, loaded: LoadedModel, limits: ServerLimits, device="cpu"):
        limits.check(loaded.model, device)
        self.loaded, self.limits, self.device = loaded, limits, device
        self.batcher = Engine(loaded.model, limits.max_batch, device)  # (the name /health and the tests use)
        self.waiting = 0  # requests admitted and not answered yet
        self.served = 0
        self.cancelled = 0  # requests whose generation stopped because their client went away
        self._hub: Hub | None = None

    def api_limits(self) -> Limits:
        return self.limits.for_requests(self.loaded.tokenizer.vocab_size, self.loaded.model.config.block_size)

    def admit(self) -> None:
        if self.waiting >= self.limits.max_queue:
            raise APIError(429, "the server is busy (queue full); retry later", kind="rate_limit_error")
        self.waiting += 1

    def release(self) -> None:
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

    def _reader(self) -> LoopReader:
        loop = asyncio.get_running_loop()
        if self._hub is None or self._hub.loop is not loop:
            self._hub = Hub(loop, self.limits.stream_interval)
        return LoopReader(self._hub)

    def _start(self, req: CompletionRequest, ids: list[int], index: int, cancel: threading.Event) -> LoopReader:
        """Queue choice ``index`` (of prompt ``ids``) with the engine; its steps come to the returned reader."""
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
        reader = self._reader()
        end = req.stop_ids if req.stop_ids is not None else self.loaded.tokenizer.eos_id
        self.batcher.submit(ids, opts, end, cancel, req.logprobs, reader)
        return reader

    async def pieces(
        self, req: CompletionRequest, prompt_ids: list[list[int]], cancel: threading.Event, counts: dict
    ) -> AsyncGenerator[list[Piece], None]:
        """Every choice's pieces, choice by choice (choice p * n + i: prompt p, sample i), while all of them
        generate together, in lists of those ready together; ``counts`` receives "prompt" and "completion"
        tokens. Stops, and frees every row, when ``cancel`` is set (the client went away) or the caller
        stops reading."""
        readers = [
            self._start(req, ids, p * req.n + i, cancel) if req.max_tokens else None
            for p, ids in enumerate(prompt_ids)
            for i in range(req.n)
        ]
        complete = False
        try:
            for p, ids in enumerate(prompt_ids):
                counts["prompt"] += len(ids)
                for i in range(req.n):
                    async for pieces in self._choice(req, ids, p * req.n + i, readers[p * req.n + i], cancel, counts):
                        yield pieces
                    if cancel.is_set():
                        return
            complete = True
        except (asyncio.CancelledError, GeneratorExit):
            cancel.set()  # the client went away mid-stream
            raise
        finally:
            for reader in readers:
                if reader is not None:
                    reader.close()  # choices never read (a cancelled request) give their rows back
            if cancel.is_set() and not complete:
                self.cancelled += 1

    async def _choice(
        self,
        req: CompletionRequest,
        ids: list[int],
        index: int,
        reader: LoopReader | None,
        cancel: threading.Event,
        counts: dict,
    ) -> AsyncGenerator[list[Piece], None]:
        shift = 0
        if req.echo:
            prefix = self.echo_text(ids)
            echoed = None
            if req.logprobs is not None:  # (a forward pass over the prompt: off the event loop)
                scored = asyncio.get_running_loop().run_in_executor(None, self.echo_logprobs, ids, req.logprobs)
                echoed = (await scored).as_dict()
            yield [Piece(index, prefix, echoed)]
            shift = len(prefix)
        if reader is None:  # max_tokens 0: the prompt scored, nothing generated
            yield [Piece(index, "", None, "length")]
            return
        choice = ChoiceText(self.loaded.tokenizer, ids, req)
        counted = 0  # (counted as they come: the usage that goes with the last piece includes them)
        try:
            while True:
                steps, end = [], None
                for item in await reader.get():
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, Finished):
                        end = item
                        break
                    steps.append(item)
                choice.add_all(steps)
                counts["completion"] += choice.tokens - counted
                counted = choice.tokens
                if cancel.is_set():  # nobody reads the rest
                    return
                ended = end is not None and not choice.cut  # (a stop string ends it first)
                text, entries = choice.take(shift, final=ended)
                out = [Piece(index, text, entries)] if text else []
                if ended or choice.cut:
                    out.append(Piece(index, "", choice.rest(shift, end.eos if ended and end else None), choice.reason))
                if out:
                    yield out
                if ended or choice.cut:
                    return
        finally:
            reader.close()

    async def complete(
        self, req: CompletionRequest, prompt_ids: list[list[int]], cancel: threading.Event
    ) -> tuple[list[Piece], dict]:
        """Every choice whole (its pieces joined: text, logprobs, finish reason) and the token counts."""
        counts = {"prompt": 0, "completion": 0}
        whole: dict[int, Piece] = {}
        async for pieces in self.pieces(req, prompt_ids, cancel, counts):
            for piece in pieces:
                have = whole.setdefault(piece.index, Piece(piece.index, ""))
                have.text += piece.text
                have.logprobs = join_logprobs(have.logprobs, piece.logprobs)
                have.finish = piece.finish or have.finish
        return [whole[i] for i in sorted(whole)], counts

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
