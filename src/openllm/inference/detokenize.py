"""Generated ids to text as they come, in time linear in the output."""

from __future__ import annotations

from collections.abc import Sequence

from openllm.data.tokenizer import Tokenizer


class TextStream:
    """Decodes generated ids as they come, in the context of the tokens before them, so that a space or
    character joining prompt and continuation is kept (a tokenizer that drops a leading space, as
    SentencePiece does, would otherwise lose it). :meth:`push` returns only text whose characters are
    complete (a multi-byte character split over byte-fallback tokens waits for its last byte).

    Each push decodes a short window only: at least the last ``CONTEXT_TOKENS`` tokens already turned into
    text, then those not yet, and returns what the new ones add to the window's text. What a token adds
    depends only on the few tokens before it, so the pieces are what decoding everything again at every
    token gave, at a cost per token that does not grow with the text."""

    CONTEXT_TOKENS = 8

    def __init__(self, tokenizer: Tokenizer, context: list[int] | None = None):
        self.tokenizer = tokenizer
        self.window = list(context or [])[-self.CONTEXT_TOKENS :]  # context tokens, then those not yet text
        self.done = len(tokenizer.decode(self.window))  # characters of the window's text already returned

    def push(self, token: int) -> str:
        return self.push_many([token])

    def push_many(self, tokens: Sequence[int]) -> str:
        """What pushing each of ``tokens`` would return, joined, for one decode (a character still
        incomplete at the end holds back the text before it too, until it is complete)."""
        self.window += tokens
        text = self.tokenizer.decode(self.window)
        if text.endswith("\ufffd"):
            return ""
        new, self.done = text[self.done :], len(text)
        if len(self.window) > 2 * self.CONTEXT_TOKENS:  # (sliding every few tokens halves the decoding)
            kept = self.window[-self.CONTEXT_TOKENS :]
            done = len(self.tokenizer.decode(kept))
            if done:  # (a window of markup tokens alone, which decode to nothing, keeps its older context)
                self.window, self.done = kept, done
        return new

    def finish(self) -> str:
        """Whatever is left, incomplete characters included (as replacement characters)."""
        text = self.tokenizer.decode(self.window)
        new, self.done = text[self.done :], len(text)
        return new

    def copy(self) -> TextStream:
        clone = TextStream.__new__(TextStream)
        clone.tokenizer, clone.window, clone.done = self.tokenizer, list(self.window), self.done
        return clone
