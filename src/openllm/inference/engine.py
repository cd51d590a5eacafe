"""The inference engine: the one decode loop every generation goes through (``openllm generate`` as one
row, the server as many), continuously batched.

An :class:`Engine` owns the model's key/value cache of ``slots`` rows. Each :meth:`Engine.step` admits
waiting sequences into free rows (prefilling each prompt alone into its row, the head over its last
position only), chooses every active sequence's next token on the device with that sequence's own
options and random generator (:func:`openllm.inference.sampling.choose`), brings the tokens (and the
log-probabilities of the sequences that asked for them) to the host in one transfer, hands each to its
sequence's :class:`Reader`, frees the rows of sequences that ended (end of text, max tokens, a reader
that stopped or went away) by moving the last row into the gap, and runs one batched forward pass over
the remaining rows, each at its own position. A greedy sequence therefore computes exactly what it
would alone (see :mod:`openllm.model.kv_cache`).

Past the context a row's window is recomputed (:data:`openllm.inference.sampling.SLIDES`): by default
every new token is conditioned on the last ``block_size`` tokens, as nanoGPT's ``sample.py`` does.

The server runs the engine on a thread of its own (``thread=True``); ``openllm generate`` steps it
from its own loop.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from openllm.core.errors import OpenLLMError
from openllm.inference.sampling import RowSampler, SamplingOptions, choose
from openllm.model import LanguageModel


@dataclass
class Step:
    """One generated token and, when its sequence asked for them, its log-probability and the ``k`` most
    likely (token, log-probability) pairs there (before any adjustment or temperature: the model's own
    distribution, what the API's ``logprobs`` report)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Finished:
    """A sequence's last item: ``eos`` is the end-of-text step that ended it (never yielded as a token)."""

    eos: Step | None = None


class PromptTooLong(OpenLLMError):
    """A prompt longer than the model's context, which nothing cuts unless its caller asked to."""

    def __init__(self, ids: list[int], context: int):
        super().__init__(f"the prompt is {len(ids):,} tokens, longer than the model's context of {context:,} tokens")
        self.ids, self.length, self.context = ids, len(ids), context


def fit_prompt(ids: list[int], context: int, keep: int | None = None) -> list[int]:
    """The prompt tokens generation starts from: every path to the model goes through here, so a prompt is
    never cut without a word. ``keep``: the caller asked for the last ``keep`` tokens only. A prompt still
    longer than the context raises :class:`PromptTooLong` (generation slides its window past the context,
    so only the prompt itself must fit)."""
    if keep is not None:
        ids = ids[-keep:]
    if len(ids) > context:
        raise PromptTooLong(ids, context)
    return ids


class Reader:
    """Where the engine puts one sequence's output, on the engine's thread: each :class:`Step`, then a
    :class:`Finished` (or the exception that broke the step). ``wake``, when set, is called once per step
    after every put of that step (readers sharing one ``wake`` are woken together)."""

    wake: Callable[[], None] | None = None
    seq: Sequence

    def put(self, item: Step | Finished | BaseException) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """The reader has what it wants: the engine frees the sequence's row at its next step."""
        self.seq.stop.set()


class TokenStream(Reader):
    """A sequence's steps for a reader on another thread: iterating blocks until the next step comes."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()
        self.end: Step | None = None  # the end-of-text step, when that ended the sequence

    def put(self, item) -> None:
        self.items.put(item)

    def __iter__(self) -> Iterator[Step]:
        return self

    def __next__(self) -> Step:
        item = self.items.get()
        if isinstance(item, Finished):
            self.end = item.eos
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


class Collected(Reader):
    """A sequence's steps for a caller that steps the engine itself (``openllm generate``)."""

    def __init__(self) -> None:
        self.items: collections.deque = collections.deque()

    def put(self, item) -> None:
        self.items.append(item)


def stop_ids(eos_id: int | frozenset[int] | None) -> frozenset[int]:
    """The ids that end a sequence, from ``submit``'s ``eos_id``: one id, a set of them, or none."""
    if eos_id is None:
        return frozenset()
    return frozenset([eos_id]) if isinstance(eos_id, int) else frozenset(eos_id)


@dataclass(eq=False)
class Sequence:
    ids: list[int]  # the prompt
    opts: SamplingOptions
    stop_ids: frozenset[int]  # the ids that end it (eos; a chat's end of turn too), never yielded
    logprobs: int | None  # alternatives wanted with each token's log-probability (None: no log-probabilities)
    cancel: threading.Event  # the request's: its client went away
    reader: Reader
    sampler: RowSampler
    stop: threading.Event = field(default_factory=threading.Event)  # the reader has what it wants
    history: list[int] = field(default_factory=list)  # prompt and generated tokens

    def ended(self) -> bool:
        return self.stop.is_set() or self.cancel.is_set()

    @property
    def produced(self) -> int:
        return len(self.history) - len(self.ids)


class Engine:
    def __init__(
        self, model: LanguageModel, slots: int = 1, device: torch.device | str = "cpu", thread: bool = True
    ) -> None:
        self.model, self.device = model.eval(), device
        self.context = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self.cache = model.new_cache(slots)
        self.slots = slots
        self.logits = torch.zeros(slots, self.vocab_size, device=device)  # row i: the next token's, for row i
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []  # sequence i holds cache row i
        self.wake = threading.Condition()
        self.steps = 0  # batched forward passes so far
        self.thread = None
        if thread:
            self.thread = threading.Thread(target=self._run, name="openllm-engine", daemon=True)
            self.thread.start()

    def submit(
        self,
        ids: list[int],
        opts: SamplingOptions,
        eos_id: int | frozenset[int] | None = None,
        cancel: threading.Event | None = None,
        logprobs: int | None = None,
        reader: Reader | None = None,
    ) -> Reader:
        """Queue a generation from prompt ``ids`` (at most the context: :func:`fit_prompt`); its steps go to
        ``reader`` (default: a :class:`TokenStream`), which is returned."""
        if not ids:  # (a model continues tokens: Tokenizer.prompt_ids gives an empty prompt its start)
            raise OpenLLMError("the prompt has no tokens to continue from")
        reader = reader or TokenStream()
        sampler = RowSampler(opts, ids, self.vocab_size, self.device)
        seq = Sequence(
            list(ids), opts, stop_ids(eos_id), logprobs, cancel or threading.Event(), reader, sampler, history=list(ids)
        )
        reader.seq = seq
        with self.wake:
            self.waiting.append(seq)
            self.wake.notify()
        return reader

    @property
    def busy(self) -> int:
        """Sequences generating or waiting for a row."""
        return len(self.active) + len(self.waiting)

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.waiting and not self.active:
                    self.wake.wait()
            try:
                self.step()
            except BaseException as exc:  # a broken step ends its sequences with the error, not the server
                for seq in self.active:
                    seq.reader.put(exc)
                _wake(self.active)
                self.active.clear()
                for i in range(self.slots):
                    self.cache.reset(i)

    @torch.no_grad()
    def step(self) -> None:
        """Admit, choose every active row's token, hand the tokens out, free ended rows, advance the rest."""
        self._admit()
        active = list(self.active)
        if not active:
            return
        tokens = choose(self.logits[: len(active)], [seq.sampler for seq in active])
        steps = self._to_host(tokens, [i for i, seq in enumerate(active) if seq.logprobs is not None])
        for i, seq in enumerate(active):
            if seq.sampler.seen is not None or seq.sampler.counts is not None:
                seq.sampler.update(tokens[i : i + 1])
        handed = [self._hand(seq, step) for seq, step in zip(active, steps, strict=True)]
        for seq, items in zip(active, handed, strict=True):
            if isinstance(items[-1], Finished):  # (freed first: a reader told of its end finds the row free)
                self._free(self.active.index(seq))
        for seq, items in zip(active, handed, strict=True):
            for item in items:
                seq.reader.put(item)
        _wake(active)
        if self.active:
            self._advance()

    def _to_host(self, tokens: torch.Tensor, asked: list[int]) -> list[Step]:
        """The step's one transfer to the host: every row's token and, for the rows in ``asked``, the
        log-probability of that token and the most likely alternatives (computed for those rows only)."""
        if not asked:
            return [Step(t) for t in tokens.tolist()]
        index = torch.tensor(asked, device=tokens.device)
        logp = torch.log_softmax(self.logits[index], dim=-1)
        chosen = logp.gather(1, tokens[index][:, None])
        k = max(self.active[i].logprobs or 0 for i in asked)
        top = torch.topk(logp, min(k, self.vocab_size)) if k else None
        parts = [tokens, chosen] + ([top.values, top.indices] if top is not None else [])
        flat = torch.cat([p.reshape(-1).to(torch.float64) for p in parts]).tolist()
        rows, n = len(tokens), len(asked)
        steps = [Step(int(t)) for t in flat[:rows]]
        values, ids = flat[rows + n : rows + n + n * k], flat[rows + n + n * k :]
        for j, i in enumerate(asked):
            want = self.active[i].logprobs or 0
            steps[i].logprob = flat[rows + j]
            steps[i].top = [(int(ids[j * k + a]), values[j * k + a]) for a in range(want)]
        return steps

    def _hand(self, seq: Sequence, step: Step) -> list[Step | Finished]:
        """What the sequence's reader gets of its chosen ``step``: the step, a :class:`Finished`, or both."""
        if seq.ended() or seq.produced >= seq.opts.max_new_tokens:
            return [Finished()]
        if step.token in seq.stop_ids:
            return [Finished(step)]
        seq.history.append(step.token)
        return [step, Finished()] if seq.produced >= seq.opts.max_new_tokens else [step]

    def _admit(self) -> None:
        """Prefill waiting sequences into free rows (those that ended before they had one just end)."""
        ended: list[Sequence] = []
        admitted: list[Sequence] = []
        with self.wake:  # (only the queue is shared: a prefill runs outside the lock, not blocking submit)
            while self.waiting and len(self.active) + len(admitted) < self.slots:
                seq = self.waiting.popleft()
                (ended if seq.ended() or seq.opts.max_new_tokens <= 0 else admitted).append(seq)
        for seq in ended:
            seq.reader.put(Finished())
        _wake(ended)
        first = len(self.active)
        self.active += admitted  # (before any prefill: a failing one ends them all with its error)
        for i, seq in enumerate(admitted, first):
            self.logits[i] = self._prefill(i, seq.ids)

    def _advance(self) -> None:
        """Every active row's last token through the model, each row's window first recomputed when its
        context is full: ``window`` keeps the last ``block_size - 1`` tokens before it (so the token sees
        ``block_size``), ``amortised`` one fewer (so the next step still fits and needs no recomputation)."""
        for i, seq in enumerate(self.active):
            if self.cache.lengths[i] >= self.context:
                keep = self.context - 1 if seq.opts.context_slide == "window" else self.context - 2
                if keep > 0:
                    self._prefill(i, seq.history[-keep - 1 : -1])
                else:
                    self.cache.reset(i)
        last = torch.tensor([seq.history[-1] for seq in self.active], device=self.device)
        logits = self.model.forward_cached(last[:, None], self.cache)
        self.steps += 1
        self.logits[: len(self.active)] = logits[:, -1]

    def _prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        self.cache.reset(slot)
        view = self.cache.slot(slot)
        logits = self.model.forward_cached(torch.tensor([ids], device=self.device), view, last_only=True)
        self.cache.commit_slot(slot, view)
        return logits[0, -1]

    def _free(self, i: int) -> None:
        last = len(self.active) - 1
        if i != last:
            self.cache.move(last, i)
            self.active[i] = self.active[last]
        self.cache.reset(last)
        self.active.pop()


def _wake(seqs: list[Sequence]) -> None:
    """Call each distinct ``wake`` of these sequences' readers once."""
    for wake in {seq.reader.wake for seq in seqs if seq.reader.wake is not None}:
        wake()
