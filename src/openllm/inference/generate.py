"""Text generation with a key/value cache: greedy (temperature 0) or sampled with top-k / top-p."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import torch

from openllm.core.errors import OpenLLMError
from openllm.core.options import (
    MAX_NEW_TOKENS,
    Opt,
    at_most,
    fraction_incl,
    int_value,
    nonneg_float,
    nonneg_int,
    positive_float,
)
from openllm.data.tokenizer import Tokenizer
from openllm.model import LanguageModel

# Temperatures below this sample so sharply that float32 overflows; they are greedy decoding in effect.
GREEDY_BELOW = 1e-4


@dataclass
class SamplingOptions:
    max_new_tokens: Annotated[int, Opt("tokens to generate at most", parse=at_most(MAX_NEW_TOKENS))] = 200
    temperature: Annotated[float, Opt("0 (or anything below 1e-4) means greedy decoding", parse=nonneg_float)] = 0.8
    top_k: Annotated[int | None, Opt("keep the k most likely tokens (0 or None: off)", parse=nonneg_int)] = 40
    top_p: Annotated[
        float | None,
        Opt("nucleus sampling: keep the smallest set of tokens with this much probability", parse=fraction_incl),
    ] = 0.95
    repetition_penalty: Annotated[
        float, Opt("divide the logits of tokens already seen by this", parse=positive_float)
    ] = 1.0
    seed: Annotated[
        int | None,
        Opt("sampling seed (the first sample uses it; sample i a seed derived from it and i)", parse=int_value),
    ] = None
    # The OpenAI API's adjustments (the server sets them): added to the logits before any sampling, greedy too.
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence in the generated tokens

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no adjustment of the logits: the next token is the row's argmax."""
        return self.temperature < GREEDY_BELOW and not (
            self.logit_bias or self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )


def adjusted_logits(
    logits: torch.Tensor, opts: SamplingOptions, history: torch.Tensor, generated: torch.Tensor | None = None
) -> torch.Tensor:
    """One row of logits (float32) after the repetition penalty (over ``history``), the presence and
    frequency penalties (over the ``generated`` tokens) and the logit bias: what greedy decoding and
    sampling both choose from."""
    logits = logits.float().clone()
    if opts.repetition_penalty != 1.0 and history.numel():
        seen = torch.unique(history)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / opts.repetition_penalty, vals * opts.repetition_penalty)
    if generated is not None and generated.numel() and (opts.presence_penalty or opts.frequency_penalty):
        counts = torch.bincount(generated.cpu(), minlength=logits.numel()).to(logits.device, logits.dtype)
        logits -= opts.frequency_penalty * counts + opts.presence_penalty * (counts > 0).to(logits.dtype)
    if opts.logit_bias:
        ids = torch.tensor(list(opts.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(opts.logit_bias.values()), device=logits.device, dtype=logits.dtype)
    return logits


def next_token_logits_filter(
    logits: torch.Tensor, opts: SamplingOptions, history: torch.Tensor, generated: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply the adjustments, temperature, top-k and top-p to one row of logits (float32)."""
    logits = adjusted_logits(logits, opts, history, generated) / opts.temperature
    if opts.top_k:
        kth = torch.topk(logits, min(opts.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p is not None and opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > opts.top_p  # keep the token that crosses top_p
        logits[order[drop]] = float("-inf")
    return logits


def choose_token(
    row: torch.Tensor,
    opts: SamplingOptions,
    history: torch.Tensor,
    generated: torch.Tensor | None,
    gen: torch.Generator,
) -> int:
    """The next token from one row of logits: greedy, or sampled with ``gen`` after the adjustments."""
    if opts.temperature < GREEDY_BELOW:
        return int(torch.argmax(adjusted_logits(row, opts, history, generated)))
    filtered = next_token_logits_filter(row, opts, history, generated)
    probs = torch.softmax(filtered, dim=-1).cpu()
    if torch.isfinite(probs).all() and float(probs.sum()) > 0:
        return int(torch.multinomial(probs, 1, generator=gen))
    # extreme settings overflowed the logits: the distribution is a point mass on the top token
    return int(torch.argmax(torch.nan_to_num(filtered, nan=-math.inf)))


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample ``index`` of a request seeded with ``seed`` (``n`` choices, ``--num-samples``).

    The first sample uses ``seed`` itself, so a single sample is what it always was. The others use a hash
    of (seed, index) with the top bit set: in [2**63, 2**64), where no seed a user can give lies (they are
    below 2**63), so no two (seed, index) pairs share a random stream (``seed + index`` made seed 43's first
    choice seed 42's second)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.sha256(f"openllm sample {seed} {index}".encode()).digest()
    return 2**63 | int.from_bytes(digest[:8], "little") >> 1


def sampling_generator(opts: SamplingOptions) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(opts.seed if opts.seed is not None else torch.seed())
    return gen


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


def prompt_ids(tokenizer: Tokenizer, prompt: str, context: int) -> tuple[list[int], int]:
    """Encode a prompt as training encoded a document start (the tokenizer's bos framing + ids), cut to its
    last ``context`` tokens when longer: returns (ids, number of tokens dropped), which the caller must
    report (``openllm generate`` warns). :func:`fit_prompt` refuses instead."""
    ids = tokenizer.prompt_ids(prompt)
    kept = fit_prompt(ids, context, keep=context)
    return kept, len(ids) - len(kept)


def generate_ids(
    model: LanguageModel,
    ids: list[int],
    opts: SamplingOptions,
    device: torch.device | str = "cpu",
    eos_id: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time until ``eos_id`` or ``max_new_tokens`` (EOS is not yielded; without
    an eos token, as in a character vocabulary, generation runs to ``max_new_tokens``)."""
    for token, _ in generate_steps(model, ids, opts, device, eos_id):
        yield token


@torch.no_grad()
def generate_steps(
    model: LanguageModel,
    ids: list[int],
    opts: SamplingOptions,
    device: torch.device | str = "cpu",
    eos_id: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`generate_ids`, each token with the model's log-probabilities for that step (before any
    adjustment or temperature: the distribution the API's ``logprobs`` report)."""
    model.eval()
    gen = sampling_generator(opts)
    context = model.config.block_size
    x = torch.tensor([ids], dtype=torch.long, device=device)
    history = x[0]
    cache = model.new_cache()
    logits = model.forward_cached(x, cache)
    for step in range(opts.max_new_tokens):
        row = logits[0, -1]
        token = choose_token(row, opts, history, history[len(ids) :] if step else None, gen)
        if token == eos_id:
            return
        yield token, torch.log_softmax(row.float(), dim=-1)
        history = torch.cat([history, torch.tensor([token], device=history.device)])
        if cache.lengths[0] >= context:  # context full: slide the window and recompute
            cache.reset(0)
            logits = model.forward_cached(history[-(context - 1) :][None], cache)
        else:
            logits = model.forward_cached(torch.tensor([[token]], device=device), cache)


def generate_text(
    model: LanguageModel, tokenizer: Tokenizer, prompt: str, opts: SamplingOptions, device: torch.device | str = "cpu"
) -> str:
    ids = fit_prompt(tokenizer.prompt_ids(prompt), model.config.block_size)  # a prompt beyond it: PromptTooLong
    stream = TextStream(tokenizer, ids)
    for token in generate_ids(model, ids, opts, device, tokenizer.eos_id):
        stream.push(token)
    stream.finish()
    return stream.text


class TextStream:
    """Decodes generated ids as they come, in the context of the prompt's last tokens (``context``), so that
    a space or character joining prompt and continuation is kept (a tokenizer that drops a leading space,
    as SentencePiece does, would otherwise lose it). :meth:`push` returns only text whose characters are
    complete (a multi-byte character split over byte-fallback tokens waits for its last byte)."""

    CONTEXT_TOKENS = 8

    def __init__(self, tokenizer: Tokenizer, context: list[int] | None = None):
        self.tokenizer = tokenizer
        self.context = list(context or [])[-self.CONTEXT_TOKENS :]
        self.skip = len(tokenizer.decode(self.context))
        self.ids: list[int] = []
        self.text = ""  # everything returned so far

    def push(self, token: int) -> str:
        self.ids.append(token)
        full = self._decode()
        if full.endswith("\ufffd"):
            return ""
        return self._advance(full)

    def finish(self) -> str:
        """Whatever is left, incomplete characters included (as replacement characters)."""
        return self._advance(self._decode())

    def _decode(self) -> str:
        return self.tokenizer.decode(self.context + self.ids)[self.skip :]

    def _advance(self, full: str) -> str:
        new, self.text = full[len(self.text) :], full
        return new
