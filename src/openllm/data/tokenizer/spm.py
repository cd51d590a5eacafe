"""The SentencePiece backend (``tokenizer.model``): OpenLLM's own BPE tokenizers and any other
SentencePiece model (a Llama-style one has unk 0, bos 1, eos 2 and no pad; the ids are read from it)."""

from __future__ import annotations

import io
import os
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from openllm.core.errors import OpenLLMError
from openllm.core.fileio import atomic_write_bytes
from openllm.data.tokenizer.base import CHAT_TOKENS, SpecialTokens, Tokenizer

MODEL_FILE = "tokenizer.model"


def _threads() -> int:
    return min(8, os.cpu_count() or 1)


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    config_class = "OpenLLMSentencePiece"

    def __init__(self, sp: spm.SentencePieceProcessor, model_bytes: bytes):
        self.threads: int | None = None  # encode_batch's threads (None: up to 8); worker processes use 1
        self.sp = sp
        self.model_bytes = model_bytes
        ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
        found = {r: (i if i >= 0 else None) for r, i in ids.items()}
        self.special = SpecialTokens(**found, add_bos=found["bos"] is not None)
        self._markup = self.special.ids()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def identity_bytes(self) -> bytes:
        return self.model_bytes

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=self.threads or _threads())

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Spans from the pieces' own bytes (``▁`` is a space, ``<0xNN>`` one byte), which join into the text
        (after the dummy prefix space) where the model's normalisation keeps the text as it is."""
        ids = self.sp.encode(text)
        parts = [
            bytes([int(p[3:5], 16)]) if self.sp.is_byte(i) else p.replace("\u2581", " ").encode("utf-8")
            for i, p in zip(ids, (self.sp.id_to_piece(i) for i in ids), strict=True)
        ]
        data, joined = text.encode("utf-8"), b"".join(parts)
        if joined not in (data, b" " + data):
            raise OpenLLMError(
                f"the SentencePiece model ({self.describe()}) normalises text, so its tokens cannot be placed in the "
                "text of a chat template"
            )
        starts = [0]  # the UTF-8 start of each character, and the end
        for c in text:
            starts.append(starts[-1] + len(c.encode("utf-8")))
        pos, spans = len(data) - len(joined), []
        for part in parts:
            a, b = max(pos, 0), max(pos + len(part), 0)
            spans.append((bisect_right(starts, a) - 1 if a < len(data) else len(text), bisect_left(starts, b)))
            pos += len(part)
        return ids, spans

    def special_pieces(self) -> dict[str, int]:
        # (control pieces and the unknown one: the tokens the tokenizer.json of an export adds as special)
        return dict(self._special_pieces)

    @cached_property
    def _special_pieces(self) -> dict[str, int]:
        n = self.vocab_size
        return {self.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def with_chat_tokens(self, template: str) -> SentencePieceTokenizer:
        """Chat tokens as control pieces appended to the model: encoding text never yields a control piece, and
        decoding leaves it out. The pieces are appended to the serialised model as protobuf records of its
        repeated ``pieces`` field (field 1: piece, score, type 3 = CONTROL), which needs no protobuf library."""
        data = self.model_bytes
        for t in CHAT_TOKENS:
            i = self.sp.piece_to_id(t)
            if self.id_to_piece(i) == t:
                if not self.sp.is_control(i):
                    raise OpenLLMError(
                        f"the tokenizer has {t!r} as an ordinary piece (id {i}); it cannot be a chat token"
                    )
                continue
            piece = t.encode("utf-8")
            record = b"\x0a" + _varint(len(piece)) + piece + b"\x15" + struct.pack("<f", 0.0) + b"\x18\x03"
            data += b"\x0a" + _varint(len(record)) + record
        tok = read_sentencepiece(data, "<with chat tokens>")
        tok.chat_template = template
        return tok

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in map(int, ids) if i not in self._markup])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.special.unk and piece != self.id_to_piece(i) else i

    def describe(self) -> str:
        return f"SentencePiece, {self.vocab_size} tokens"

    def _write_files(self, directory: Path) -> list[str]:
        atomic_write_bytes(directory / MODEL_FILE, self.model_bytes)
        return [MODEL_FILE]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def read_sentencepiece(data: bytes, origin: str) -> SentencePieceTokenizer:
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(data)
    except Exception:
        raise OpenLLMError(f"{origin} is not a valid SentencePiece model") from None
    return SentencePieceTokenizer(sp, data)


def train_sentencepiece(documents: Sequence[str], vocab_size: int) -> SentencePieceTokenizer:
    """A BPE model with byte fallback (never an unknown token) and identity normalisation
    (``decode(encode(t)) == t``), ids pad 0, unk 1, bos 2, eos 3."""
    if vocab_size < 260:
        raise OpenLLMError(f"vocab size {vocab_size} is too small: byte fallback needs at least 260 entries")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(documents),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            pad_id=0,  # the ids of the legacy OpenLLM models; read back from the model like any other's
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            max_sentence_length=1 << 24,
            num_threads=_threads(),
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise _training_error(exc, vocab_size) from None
    return read_sentencepiece(buf.getvalue(), "<trained>")


def _training_error(exc: RuntimeError, vocab_size: int) -> OpenLLMError:
    msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    msg = msg.rsplit("] ", 1)[-1].strip()  # drop SentencePiece's "INTERNAL: file.cc(line) [check]" prefix
    if "smaller than required_chars" in msg:
        return OpenLLMError(
            f"a vocabulary of {vocab_size} tokens is too small for the characters of this corpus "
            f"({msg.split('.')[1].strip()} needed with byte fallback); use a larger --vocab-size"
        )
    if "Vocabulary size" in msg or "vocab_size" in msg:
        return OpenLLMError(
            f"the corpus cannot support a vocabulary of {vocab_size} tokens ({msg}); use a smaller --vocab-size"
        )
    return OpenLLMError(f"tokenizer training failed: {msg}")
