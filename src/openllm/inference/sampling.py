"""Choosing the next token: the sampling options, the adjustments the OpenAI API adds to the logits, and
the choice for every row of a batch at once on the model's device (:func:`choose`): nothing here moves
a value to the host, so a decoding step pays one transfer for all its rows (:mod:`openllm.inference.engine`)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Annotated

import torch

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

# Temperatures below this sample so sharply that float32 overflows; they are greedy decoding in effect.
GREEDY_BELOW = 1e-4
# How generation continues past the model's context (SamplingOptions.context_slide).
SLIDES = ("window", "amortised")


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
    context_slide: Annotated[
        str,
        Opt(
            "past the model's context: 'window' conditions every new token on the last context-length tokens, "
            "recomputed each step (as nanoGPT's sample.py); 'amortised' recomputes only every other step, on "
            "one token fewer (OpenLLM's rule before 0.3)",
            choices=SLIDES,
        ),
    ] = "window"
    # The OpenAI API's adjustments (the server sets them): added to the logits before any sampling, greedy too.
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence in the generated tokens

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no adjustment of the logits: the next token is the row's argmax."""
        return self.greedy and not (
            self.logit_bias or self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )


class RowSampler:
    """One sequence's sampling state, kept on the device: its random generator (seeded from its options, so a
    sequence draws the same numbers in any batch) and, where its options need them, the tokens it has seen
    (repetition penalty), the counts of those it generated (presence and frequency penalties) and its bias."""

    def __init__(self, opts: SamplingOptions, prompt: list[int], vocab_size: int, device: torch.device | str):
        self.opts = opts
        self.generator = torch.Generator(device=device)
        if opts.seed is not None:
            self.generator.manual_seed(opts.seed)
        else:
            self.generator.seed()
        self.seen = self.counts = self.bias_ids = self.bias_values = None
        if opts.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt:
                self.seen[torch.tensor(prompt, device=device)] = True
        if opts.presence_penalty or opts.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if opts.logit_bias:
            self.bias_ids = torch.tensor(list(opts.logit_bias), device=device)
            self.bias_values = torch.tensor(list(opts.logit_bias.values()), device=device, dtype=torch.float32)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """One row of float32 logits after this sequence's penalties and bias."""
        return _adjust(logits, self.opts, self.seen, self.counts, self.bias_ids, self.bias_values)

    def update(self, token: torch.Tensor) -> None:
        """Count the generated ``token`` (a one-element tensor on the device)."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def _adjust(logits, opts: SamplingOptions, seen, counts, bias_ids, bias_values) -> torch.Tensor:
    if seen is not None:
        p = opts.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if counts is not None:
        logits = logits - (opts.frequency_penalty * counts + opts.presence_penalty * (counts > 0).to(logits.dtype))
    if bias_ids is not None:
        logits = logits.index_add(0, bias_ids, bias_values.to(logits.dtype))
    return logits


def adjusted_logits(
    logits: torch.Tensor, opts: SamplingOptions, history: torch.Tensor, generated: torch.Tensor | None = None
) -> torch.Tensor:
    """One row of logits (float32) after the repetition penalty (over ``history``), the presence and
    frequency penalties (over the ``generated`` tokens) and the logit bias: what greedy decoding and
    sampling both choose from (the per-row form of :meth:`RowSampler.adjust`)."""
    logits = logits.float()
    vocab, device = logits.numel(), logits.device
    seen = counts = bias_ids = bias_values = None
    if opts.repetition_penalty != 1.0 and history.numel():
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen[history.long().to(device)] = True
    if generated is not None and generated.numel() and (opts.presence_penalty or opts.frequency_penalty):
        counts = torch.bincount(generated.long().to(device), minlength=vocab).to(logits.dtype)
    if opts.logit_bias:
        bias_ids = torch.tensor(list(opts.logit_bias), device=device)
        bias_values = torch.tensor(list(opts.logit_bias.values()), device=device)
    return _adjust(logits, opts, seen, counts, bias_ids, bias_values)


def filter_rows(logits: torch.Tensor, opts: list[SamplingOptions]) -> torch.Tensor:
    """Temperature, top-k (ties with the k-th kept) and top-p (the token that crosses it kept) applied to rows
    of adjusted logits (B, vocab), row i with ``opts[i]``'s values."""
    device, vocab = logits.device, logits.size(-1)
    logits = logits / torch.tensor([o.temperature for o in opts], device=device)[:, None]
    if not any(o.top_k or (o.top_p is not None and o.top_p < 1.0) for o in opts):
        return logits
    top_k = torch.tensor([min(o.top_k, vocab) if o.top_k else vocab for o in opts], device=device)
    top_p = torch.tensor([1.0 if o.top_p is None else o.top_p for o in opts], device=device)
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    keep = ~(ordered < ordered.gather(1, (top_k - 1)[:, None]))
    ordered = ordered.masked_fill(~keep, -math.inf)
    probs = torch.softmax(ordered, dim=-1)
    keep &= ~((probs.cumsum(-1) - probs > top_p[:, None]) & (top_p[:, None] < 1.0))
    return logits.masked_fill(~torch.zeros_like(keep).scatter(1, order, keep), -math.inf)


def next_token_logits_filter(
    logits: torch.Tensor, opts: SamplingOptions, history: torch.Tensor, generated: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply the adjustments, temperature, top-k and top-p to one row of logits (float32)."""
    return filter_rows(adjusted_logits(logits, opts, history, generated)[None], [opts])[0]


def sample_rows(filtered: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of filtered logits, drawn with that row's generator; a row that extreme settings
    overflowed (no finite probabilities) is a point mass on its top token."""
    probs = torch.softmax(filtered, dim=-1)
    ok = torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)
    safe = torch.where(ok[:, None], probs, torch.ones_like(probs))  # what multinomial may draw from
    drawn = torch.cat([torch.multinomial(safe[i], 1, generator=g) for i, g in enumerate(generators)])
    return torch.where(ok, drawn, torch.nan_to_num(filtered, nan=-math.inf).argmax(-1))


def choose(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """The next token of every row of ``logits`` (B, vocab), on the device: the argmax of a plain greedy row,
    else the row's adjusted logits' argmax (greedy) or a draw from them after temperature, top-k and top-p."""
    tokens = logits.argmax(dim=-1)
    special = [i for i, r in enumerate(rows) if not r.opts.plain_greedy]
    if not special:
        return tokens
    adjusted = torch.stack([rows[i].adjust(logits[i].float()) for i in special])
    picks = adjusted.argmax(dim=-1)
    sampled = [j for j, i in enumerate(special) if not rows[i].opts.greedy]
    if sampled:
        drawn_from = [rows[special[j]] for j in sampled]
        filtered = filter_rows(adjusted[sampled], [r.opts for r in drawn_from])
        picks[sampled] = sample_rows(filtered, [r.generator for r in drawn_from])
    tokens[special] = picks
    return tokens


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
