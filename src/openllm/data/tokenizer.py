"""SentencePiece BPE tokenizer: train from documents, save, load.

Ids follow the legacy OpenLLM models: pad 0, unk 1, bos 2, eos 3. Byte fallback is on, so any
text encodes without unknown tokens. Normalisation is the identity: ``decode(encode(t)) == t``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from openllm.core.errors import OpenLLMError
from openllm.core.fileio import atomic_write_bytes, atomic_write_json, ensure_dir

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"


@dataclass
class Tokenizer:
    """A loaded SentencePiece model and the hash of its file."""

    sp: spm.SentencePieceProcessor
    model_bytes: bytes

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    bos_id, eos_id, pad_id, unk_id = BOS_ID, EOS_ID, PAD_ID, UNK_ID

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads or min(8, os.cpu_count() or 1))

    def encode_document(self, text: str) -> list[int]:
        """A document as training saw it: BOS + ids + EOS."""
        return [BOS_ID, *self.sp.encode(text), EOS_ID]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def save(self, directory: str | os.PathLike, model_max_length: int | None = None) -> Path:
        """Write ``tokenizer.model`` and ``tokenizer_config.json`` into ``directory``."""
        directory = ensure_dir(directory, "tokenizer directory")
        atomic_write_bytes(directory / MODEL_FILE, self.model_bytes)
        atomic_write_json(directory / CONFIG_FILE, tokenizer_config(self.vocab_size, model_max_length))
        return directory


def tokenizer_config(vocab_size: int, model_max_length: int | None = None) -> dict:
    return {
        "tokenizer_class": "OpenLLMSentencePiece",
        "model_type": "bpe",
        "vocab_size": vocab_size,
        "model_max_length": model_max_length,
        "byte_fallback": True,
        "add_bos_token": True,
        "add_eos_token": True,
        "pad_token_id": PAD_ID,
        "unk_token_id": UNK_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        **SPECIAL_TOKENS,
    }


def train_tokenizer(documents: Sequence[str], vocab_size: int, num_threads: int | None = None) -> Tokenizer:
    """Train a BPE tokenizer on ``documents`` (a list of strings)."""
    if vocab_size < 260:
        raise OpenLLMError(f"vocab size {vocab_size} is too small: byte fallback needs at least 260 entries")
    if not documents:
        raise OpenLLMError("cannot train a tokenizer on an empty corpus")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(documents),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            max_sentence_length=1 << 24,
            num_threads=num_threads or min(8, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        msg = msg.rsplit("] ", 1)[-1]  # drop SentencePiece's "INTERNAL: file.cc(line) [check]" prefix
        if "smaller than required_chars" in msg:
            raise OpenLLMError(
                f"a vocabulary of {vocab_size} tokens is too small for the characters of this corpus "
                f"({msg.split('.')[1].strip()} needed with byte fallback); use a larger --vocab-size"
            ) from None
        if "Vocabulary size" in msg or "vocab_size" in msg:
            raise OpenLLMError(
                f"the corpus cannot support a vocabulary of {vocab_size} tokens ({msg.strip()}); "
                "use a smaller --vocab-size"
            ) from None
        raise OpenLLMError(f"tokenizer training failed: {msg.strip()}") from None
    return _from_bytes(buf.getvalue(), "<trained>")


def _from_bytes(data: bytes, origin: str) -> Tokenizer:
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(data)
    except Exception:
        raise OpenLLMError(f"{origin} is not a valid SentencePiece model") from None
    if sp.get_piece_size() <= EOS_ID or sp.bos_id() != BOS_ID or sp.eos_id() != EOS_ID:
        raise OpenLLMError(
            f"{origin}: tokenizer special ids must be pad 0, unk 1, bos 2, eos 3 "
            f"(found bos {sp.bos_id()}, eos {sp.eos_id()})"
        )
    return Tokenizer(sp=sp, model_bytes=data)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load ``tokenizer.model`` from a file path or a directory that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise OpenLLMError(f"tokenizer not found: {path}")
    return _from_bytes(path.read_bytes(), str(path))


def read_tokenizer_config(directory: str | os.PathLike) -> dict:
    p = Path(directory) / CONFIG_FILE
    return json.loads(p.read_text()) if p.is_file() else {}
