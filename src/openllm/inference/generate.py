"""Text generation with a key/value cache: greedy (temperature 0) or sampled with top-k / top-p.

``openllm generate`` is a one-row client of the inference engine (:mod:`openllm.inference.engine`):
the same decode loop, sampling and context-slide rule as the server's batched rows."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from openllm.data.tokenizer import Tokenizer
from openllm.inference.detokenize import TextStream
from openllm.inference.engine import Collected, Engine, Finished, PromptTooLong, Step, fit_prompt
from openllm.inference.sampling import (
    GREEDY_BELOW,
    SamplingOptions,
    adjusted_logits,
    choice_seed,
    next_token_logits_filter,
)
from openllm.model import LanguageModel

__all__ = [  # (the names callers have always imported from here)
    "GREEDY_BELOW",
    "PromptTooLong",
    "SamplingOptions",
    "TextStream",
    "adjusted_logits",
    "choice_seed",
    "fit_prompt",
    "generate_ids",
    "generate_steps",
    "generate_text",
    "next_token_logits_filter",
    "prompt_ids",
]


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
    for step in generate_steps(model, ids, opts, device, eos_id):
        yield step.token


def generate_steps(
    model: LanguageModel,
    ids: list[int],
    opts: SamplingOptions,
    device: torch.device | str = "cpu",
    eos_id: int | None = None,
    logprobs: int | None = None,
) -> Iterator[Step]:
    """:func:`generate_ids` as the engine's steps: with ``logprobs`` (the number of alternatives), each token
    with its log-probability and the most likely alternatives."""
    engine = Engine(model, slots=1, device=device, thread=False)
    out = Collected()
    engine.submit(ids, opts, eos_id, logprobs=logprobs, reader=out)
    while True:
        if not out.items:
            engine.step()
            continue
        item = out.items.popleft()
        if isinstance(item, Finished):
            return
        yield item


def generate_text(
    model: LanguageModel, tokenizer: Tokenizer, prompt: str, opts: SamplingOptions, device: torch.device | str = "cpu"
) -> str:
    ids = fit_prompt(tokenizer.prompt_ids(prompt), model.config.block_size)  # a prompt beyond it: PromptTooLong
    stream = TextStream(tokenizer, ids)
    text = [stream.push(token) for token in generate_ids(model, ids, opts, device, tokenizer.eos_id)]
    return "".join(text) + stream.finish()
