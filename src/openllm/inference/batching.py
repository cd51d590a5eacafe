"""Continuous batching: many generations share one model call per step.

A :class:`Batcher` owns the model's key/value cache of ``slots`` rows and one thread. Each step it
admits waiting sequences into free rows (prefilling each prompt alone, into its row), picks every
active sequence's next token with that sequence's own sampling options and random generator, hands
the tokens to their readers, frees the rows of sequences that ended (end of text, max tokens, a
reader that stopped or went away) by moving the last row into the gap, and then runs one batched
forward pass over the remaining rows, each at its own position. A greedy sequence therefore
computes exactly what it would alone (see :mod:`openllm.model.kv_cache`).

Readers get a :class:`TokenStream`: an iterator of ``(token, log-probabilities)`` as
:func:`openllm.inference.generate.generate_steps` yields them; closing it frees the row.
"""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass, field

import torch

from openllm.inference.generate import SamplingOptions, choose_token, sampling_generator
from openllm.model import LanguageModel

_END = None  # what a stream's queue holds after its last token


@dataclass
class EndOfText:
    """The end-of-text token that ended a sequence, with its log-probabilities (reported, never yielded)."""

    token: int
    logp: torch.Tensor


@dataclass(eq=False)
class Sequence:
    ids: list[int]
    opts: SamplingOptions
    eos_id: int | None
    cancel: threading.Event  # the request's: its client went away
    generator: torch.Generator  # the sequence's own, seeded from its options
    out: queue.Queue = field(default_factory=queue.Queue)
    stop: threading.Event = field(default_factory=threading.Event)  # the reader has what it wants
    history: list[int] = field(default_factory=list)  # prompt and generated tokens
    row: torch.Tensor | None = None  # logits for the next token

    def ended(self) -> bool:
        return self.stop.is_set() or self.cancel.is_set()


class TokenStream:
    """The tokens of one sequence as the batcher makes them; ``close`` gives its row back."""

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.end: EndOfText | None = None  # set when the sequence ended with its end-of-text token

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> tuple[int, torch.Tensor]:
        item = self.seq.out.get()
        if isinstance(item, EndOfText):
            self.end = item
            item = self.seq.out.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.seq.stop.set()


class Batcher:
    def __init__(self, model: LanguageModel, slots: int, device: torch.device | str = "cpu"):
        self.model, self.device = model, device
        self.context = model.config.block_size
        self.cache = model.new_cache(slots)
        self.slots = slots
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []  # sequence i holds cache row i
        self.wake = threading.Condition()
        self.steps = 0  # batched forward passes so far
        self.thread = threading.Thread(target=self._run, name="openllm-batcher", daemon=True)
        self.thread.start()

    def submit(self, ids: list[int], opts: SamplingOptions, eos_id: int | None, cancel: threading.Event) -> TokenStream:
        seq = Sequence(list(ids), opts, eos_id, cancel, sampling_generator(opts), history=list(ids))
        with self.wake:
            self.waiting.append(seq)
            self.wake.notify()
        return TokenStream(seq)

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
                self._step()
            except BaseException as exc:  # a broken step ends its sequences with the error, not the server
                for seq in self.active:
                    seq.out.put(exc)
                self.active.clear()
                for i in range(self.slots):
                    self.cache.reset(i)

    @torch.no_grad()
    def _step(self) -> None:
        self._admit()
        if not self.active:
            return
        rows = torch.stack([seq.row for seq in self.active]).float()  # type: ignore[misc]
        logps = torch.log_softmax(rows, dim=-1)  # what each step reports as logprobs, for all rows at once
        greedy = rows.argmax(dim=-1).tolist()  # the token of every plain greedy row, at once
        finished = [
            seq for seq, logp, top in zip(self.active, logps, greedy, strict=True) if not self._advance(seq, logp, top)
        ]
        for seq in finished:
            seq.out.put(_END)
            self._free(self.active.index(seq))
        if not self.active:
            return
        tokens = [seq.history[-1] for seq in self.active]
        for i, seq in enumerate(self.active):
            if self.cache.lengths[i] >= self.context:  # context full: recompute this row's window
                self._prefill(i, seq.history[-(self.context - 1) : -1])
        logits = self.model.forward_cached(torch.tensor(tokens, device=self.device)[:, None], self.cache)
        self.steps += 1
        for seq, row in zip(self.active, logits[:, -1], strict=True):
            seq.row = row

    def _admit(self) -> None:
        with self.wake:
            while self.waiting and len(self.active) < self.slots:
                seq = self.waiting.popleft()
                if seq.ended() or seq.opts.max_new_tokens <= 0:
                    seq.out.put(_END)
                    continue
                self.active.append(seq)
                seq.row = self._prefill(len(self.active) - 1, seq.ids)

    def _prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        self.cache.reset(slot)
        view = self.cache.slot(slot)
        logits = self.model.forward_cached(torch.tensor([ids], device=self.device), view)
        self.cache.commit_slot(slot, view)
        return logits[0, -1]

    def _advance(self, seq: Sequence, logp: torch.Tensor, top: int) -> bool:
        """Choose the sequence's next token (``top``: the row's argmax) and hand it to its reader with the row's
        log-probabilities ``logp``; False when the sequence has ended."""
        produced = len(seq.history) - len(seq.ids)
        if seq.ended() or produced >= seq.opts.max_new_tokens:
            return False
        if seq.opts.plain_greedy:
            token = top
        else:
            assert seq.row is not None
            history = torch.tensor(seq.history)
            generated = history[len(seq.ids) :] if produced else None
            token = choose_token(seq.row, seq.opts, history, generated, seq.generator)
        if token == seq.eos_id:
            seq.out.put(EndOfText(token, logp))
            return False
        seq.out.put((token, logp))
        seq.history.append(token)
        return produced + 1 < seq.opts.max_new_tokens

    def _free(self, i: int) -> None:
        last = len(self.active) - 1
        if i != last:
            self.cache.move(last, i)
            self.active[i] = self.active[last]
        self.cache.reset(last)
        self.active.pop()
