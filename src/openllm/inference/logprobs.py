"""Per-token log-probabilities in the shape of the OpenAI completions API's ``logprobs`` object:
``tokens``, ``token_logprobs``, ``top_logprobs`` and ``text_offset``, for prompt tokens (``echo``,
scored with one forward pass per window) and generated ones alike."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from openllm.data.tokenizer import Tokenizer
from openllm.model import LanguageModel


def top_pairs(row: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (id, log-probability) pairs of one row."""
    if not k:
        return []
    top = torch.topk(row, min(k, row.numel()))
    return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


@torch.no_grad()
def score_tokens(
    model: LanguageModel, ids: list[int], k: int, device="cpu"
) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each token after the first: its log-probability given the ones before it, and the ``k`` most likely
    tokens there. Prompts longer than the context are scored in windows that overlap by half a context."""
    model.eval()
    context = model.config.block_size
    out: list[tuple[float, list[tuple[int, float]]]] = []
    start = 0
    while len(out) < len(ids) - 1:
        window = ids[start : start + context]
        logits, _ = model(torch.tensor([window], device=device))
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        first = len(out) + 1 - start  # the first position of this window not scored yet
        for pos in range(first, len(window)):
            row = logp[pos - 1]
            out.append((float(row[window[pos]]), top_pairs(row, k)))
        start += max(1, context // 2)
    return out


def token_texts(tokenizer: Tokenizer, ids: list[int], before: list[int] | None = None) -> list[str]:
    """The text each token adds, decoded in context (so the pieces join into the decoded text: a leading space
    is kept, and a character split over byte tokens belongs to its last byte)."""
    before = list(before or [])[-8:]
    texts, previous = [], tokenizer.decode(before)
    for i in range(len(ids)):
        current = tokenizer.decode(before + ids[: i + 1])
        if current.endswith("\ufffd") and i + 1 < len(ids):
            texts.append("")
            continue
        texts.append(current[len(previous) :])
        previous = current
    return texts


FIELDS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def join_logprobs(a: dict | None, b: dict | None) -> dict | None:
    """Two consecutive logprobs objects (as :meth:`Logprobs.as_dict` gives them) as one."""
    if a is None or b is None:
        return a if b is None else b
    return {k: a[k] + b[k] for k in FIELDS}


def chat_logprobs(legacy: dict | None) -> dict | None:
    """A completions ``logprobs`` object in the chat API's shape: ``{"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}]}``."""
    if legacy is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in (top or {}).items()]}
            for t, lp, top in zip(legacy["tokens"], legacy["token_logprobs"], legacy["top_logprobs"], strict=True)
        ]
    }


@dataclass
class Logprobs:
    """The ``logprobs`` object of one choice, built token by token, one entry per token. A token's text is
    what it adds to the decoded text in its context, so the tokens join exactly into the choice's text and
    ``text_offset`` is where each starts in it: a special token (the bos an echoed prompt starts with, the eos
    that ends a generation) adds nothing and is "". An alternative in ``top_logprobs`` is named by the text
    it would have added, a special token by its piece ("</s>")."""

    tokenizer: Tokenizer
    k: int
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    length: int = 0  # characters so far
    context: list[int] = field(default_factory=list)  # the last tokens, for decoding alternatives

    def _name(self, token: int, text: str) -> str:
        return self.tokenizer.id_to_piece(token) if token in self.tokenizer.special.ids() else text

    def _alternative(self, token: int, before: str) -> str:
        return self._name(token, self.tokenizer.decode([*self.context, token])[len(before) :])

    def add(self, token: int, text: str, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        if top is None:
            self.top_logprobs.append(None)
        else:
            before = self.tokenizer.decode(self.context)
            alternatives: dict[str, float] = {}
            for i, lp in top:  # two ids with the same text keep the likelier one (the keys are text)
                alternatives.setdefault(self._alternative(i, before), lp)
            self.top_logprobs.append(alternatives)
        self.text_offset.append(self.length)
        self.length += len(text)
        self.context = [*self.context, token][-8:]

    def add_step(self, token: int, text: str, logp: torch.Tensor) -> None:
        self.add(token, text, float(logp[token]), top_pairs(logp, self.k))

    def extend(self, other: Logprobs | None, shift: int) -> None:
        """Append ``other``'s entries (the generated tokens after an echoed prompt of ``shift`` characters)."""
        if other is None:
            return
        for name, values in other.as_dict(shift=shift).items():
            getattr(self, name).extend(values)
        self.length = shift + other.length

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` entries (a stop string cut the text after them)."""
        for name in FIELDS:
            del getattr(self, name)[n:]

    def covered(self, start: int, chars: int) -> int:
        """The end of the run of entries from ``start`` whose text lies within the first ``chars`` characters."""
        end = start
        while end < len(self.tokens) and self.text_offset[end] + len(self.tokens[end]) <= chars:
            end += 1
        return end

    def as_dict(self, start: int = 0, end: int | None = None, shift: int = 0) -> dict:
        """The API object (entries ``start:end``, text offsets moved by ``shift`` characters)."""
        out = {name: getattr(self, name)[start:end] for name in FIELDS}
        out["text_offset"] = [o + shift for o in out["text_offset"]]
        return out
