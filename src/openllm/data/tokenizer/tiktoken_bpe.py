"""``--tokenizer-type tiktoken-bpe``: a byte-level BPE trained with ``rustbpe`` and encoded with ``tiktoken``,
the pair nanochat uses, several times faster than the other two kinds at both.

It is stored as an ordinary ``tokenizer.json`` (the ranks as a byte-level BPE vocabulary, the merges that
rebuild them, the split pattern as a ``Split`` pre-tokenizer), so everything that reads a Hugging Face
tokenizer (``transformers``, export, fine-tuning's chat tokens) reads it with the same ids; its
``tokenizer_config.json`` says ``"openllm_tokenizer": "tiktoken-bpe"``, and OpenLLM then encodes with a
``tiktoken`` encoding built from the same vocabulary. Both encoders give the same ids (tiktoken's BPE takes a
piece that is one token whole, which ``ignore_merges`` makes the Hugging Face BPE do too;
tests/test_tokenizer.py compares them on real text).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from tokenizers import Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RawTokenizer

from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer.hf import END_OF_TEXT, HFTokenizer

KIND = "tiktoken-bpe"
# Llama 3's split (GPT-4's, with its contractions case-insensitive): what llama.cpp calls "llama-bpe"
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (byte-level BPE vocabularies spell tokens with them): printable
    Latin-1 bytes stand for themselves, the others for the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that makes each multi-byte token, in rank order: a token of rank r is what BPE over its own
    bytes reaches with the tokens ranked below r, which is always exactly two of them."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise OpenLLMError(f"the BPE ranks are inconsistent: token {token!r} is not the merge of two lower ones")
        merges.append((parts[0], parts[1]))
    return merges


def ranks_to_raw(ranks: dict[bytes, int], pattern: str, specials: Sequence[str]) -> RawTokenizer:
    """The ranks as a Hugging Face byte-level BPE with the same ids; ``specials`` follow the last rank."""
    symbols = byte_symbols()

    def spell(b: bytes) -> str:
        return "".join(symbols[x] for x in b)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in _merges(ranks)]
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    raw.add_special_tokens(list(specials))
    return raw


class TiktokenTokenizer(HFTokenizer):
    """A byte-level BPE (its ``tokenizer.json``) that encodes text with ``tiktoken``."""

    kind = KIND
    threads: int | None = None  # encode_batch's threads (None: up to 8); prepare's worker processes use 1

    @cached_property
    def _encoding(self):  # type: ignore[no-untyped-def]
        import tiktoken

        symbols = {s: b for b, s in enumerate(byte_symbols())}
        ranks = {
            bytes(symbols[c] for c in piece): i for piece, i in self.raw.get_vocab(with_added_tokens=False).items()
        }
        return tiktoken.Encoding(KIND, pat_str=self.pattern, mergeable_ranks=ranks, special_tokens={})

    @cached_property
    def pattern(self) -> str:
        import json

        pre = json.loads(self.raw.to_str()).get("pre_tokenizer") or {}
        split = next((p for p in pre.get("pretokenizers") or [] if p.get("type") == "Split"), None)
        if split is None or "Regex" not in (split.get("pattern") or {}):
            raise OpenLLMError(f"{self.origin or 'the tokenizer'}: a tiktoken-bpe tokenizer.json needs a Split regex")
        return split["pattern"]["Regex"]

    @cached_property
    def _pieces(self) -> tuple[str, ...]:
        return tuple(self.special_pieces())

    def _plain(self, text: str) -> bool:
        """Whether no added token's string occurs in ``text`` (those the Hugging Face side handles)."""
        return not any(p in text for p in self._pieces)

    def encode(self, text: str) -> list[int]:
        if not self._plain(text):
            return super().encode(text)
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not all(map(self._plain, texts)):
            return super().encode_batch(texts)
        if self.threads == 1:  # (a worker process: tiktoken's batch would hand each text to a thread pool)
            return [self._encoding.encode_ordinary(t) for t in texts]
        return self._encoding.encode_ordinary_batch(list(texts), num_threads=self.threads or 8)

    def describe(self) -> str:
        return f"byte-level BPE (tiktoken), {self.vocab_size} tokens"

    def with_chat_tokens(self, template: str) -> TiktokenTokenizer:
        tok = super().with_chat_tokens(template)
        return TiktokenTokenizer(tok.raw, tok.config(), None, self.origin)


def train_tiktoken_bpe(documents: Sequence[str], vocab_size: int) -> TiktokenTokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (256 bytes, the merges, ``<|endoftext|>`` last) trained with
    ``rustbpe`` over :data:`PATTERN`'s pieces."""
    if vocab_size < 257:
        raise OpenLLMError(
            f"vocab size {vocab_size} is too small: a tiktoken-bpe tokenizer needs at least 257 entries "
            "(256 bytes and <|endoftext|>)"
        )
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(documents), vocab_size - 1, pattern=PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    if len(ranks) + 1 < vocab_size:
        raise OpenLLMError(
            f"the corpus cannot support a vocabulary of {vocab_size} tokens (it has {len(ranks)} distinct merges "
            "and bytes); use a smaller --vocab-size"
        )
    raw = ranks_to_raw(ranks, PATTERN, [END_OF_TEXT])
    return TiktokenTokenizer(raw, {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT}, None)
