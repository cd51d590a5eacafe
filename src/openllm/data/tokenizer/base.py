"""The one tokenizer interface every encoder and decoder in OpenLLM goes through.

A tokenizer knows its own special tokens: :class:`SpecialTokens` holds the ids of bos, eos, pad and
unk as the vocabulary defines them (``None`` where it has no such token: a nanoGPT character
vocabulary has none) and whether a document starts with bos. Nothing else in the package assumes
an id; how documents and prompts are framed follows from these fields:

* a prompt is ``[bos] + ids`` when ``add_bos``, else ``ids``;
* a training document is the prompt framing plus ``[eos]``, or, without an eos token, plus the
  encoded document separator (so paragraphs do not run together).
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from openllm.core.errors import OpenLLMError
from openllm.core.fileio import atomic_write_json, ensure_dir

CONFIG_FILE = "tokenizer_config.json"
# Every backend's files; a directory holds one tokenizer, so saving one removes the others' files.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt")
ROLES = ("bos", "eos", "pad", "unk")
# OpenLLM's chat tokens (ChatML's): what :func:`openllm.data.chat.with_chat_tokens` adds to a tokenizer without a
# chat template. Encoding text never produces them (a user's text that spells one stays text).
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def read_chat_template(value) -> str | None:
    """``chat_template`` as transformers writes it: a string, or a list of named templates."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class SpecialTokens:
    bos: int | None = None
    eos: int | None = None
    pad: int | None = None
    unk: int | None = None
    add_bos: bool = False  # documents and prompts start with bos

    def ids(self) -> set[int]:
        """The ids that are markup, not text (skipped when decoding)."""
        return {i for i in (self.bos, self.eos, self.pad) if i is not None}

    def as_config_ids(self) -> dict[str, int | None]:
        """``bos_token_id`` ... as model and generation configs name them."""
        return {f"{r}_token_id": getattr(self, r) for r in ("bos", "eos", "pad")}


class Tokenizer(ABC):
    """Text to ids and back. Backends: :mod:`.spm` (SentencePiece) and :mod:`.hf` (Hugging Face ``tokenizers``)."""

    kind: str  # "sentencepiece" or "huggingface"
    config_class: str  # tokenizer_class written to tokenizer_config.json
    special: SpecialTokens
    chat_template: str | None = None  # a Jinja chat template that came with the tokenizer (Hugging Face)

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def identity_bytes(self) -> bytes:
        """Bytes that identify this tokenizer exactly (its hash is the run's tokenizer_sha256)."""

    @cached_property
    def sha256(self) -> str:  # (a tokenizer does not change once built; every checkpoint save asks for this)
        return hashlib.sha256(self.identity_bytes()).hexdigest()

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens; one clear error for text it cannot represent."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` as plain text (no special token, whatever it spells) and each token's character span
        (``start, end``): where a rendered chat template's markup ends and a message's content begins."""

    @abstractmethod
    def special_pieces(self) -> dict[str, int]:
        """The strings that are one special token each (the markup a chat template writes), with their ids."""

    def with_chat_tokens(self, template: str) -> Tokenizer:
        """This tokenizer with :data:`CHAT_TOKENS` added as special tokens after its last id, and ``template``."""
        raise OpenLLMError(f"the tokenizer ({self.describe()}) cannot take chat tokens")

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens (bos, eos, pad) left out."""

    @abstractmethod
    def id_to_piece(self, i: int) -> str: ...

    @abstractmethod
    def piece_to_id(self, piece: str) -> int | None: ...

    @abstractmethod
    def describe(self) -> str:
        """A short human description: "SentencePiece BPE, 4000 tokens"."""

    @abstractmethod
    def _write_files(self, directory: Path) -> list[str]:
        """Write the backend's own files; returns their names."""

    # --- framing, the same for every backend -------------------------------------------------
    @property
    def bos_id(self) -> int | None:
        return self.special.bos

    @property
    def eos_id(self) -> int | None:
        return self.special.eos

    @property
    def pad_id(self) -> int | None:
        return self.special.pad

    @property
    def unk_id(self) -> int | None:
        return self.special.unk

    def prefix(self) -> list[int]:
        return [self.special.bos] if self.special.add_bos and self.special.bos is not None else []

    def document_end(self, separator: str = "\n\n") -> list[int]:
        return [self.special.eos] if self.special.eos is not None else self.encode(separator)

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt as a document start: the bos framing, then its ids. An empty prompt of a tokenizer without
        bos (GPT-2 style, a character vocabulary) starts where a document starts in training: after the end of
        the one before (eos, or the encoded separator), so that there is a token to continue from."""
        return [*self.prefix(), *self.encode(text)] or self.document_end()

    def encode_document(self, text: str, separator: str = "\n\n") -> list[int]:
        """A document as training sees it: bos framing + ids + eos (or the separator)."""
        return [*self.prefix(), *self.encode(text), *self.document_end(separator)]

    # --- files -------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, model_max_length: int | None = None) -> Path:
        """Write the tokenizer in its own format plus ``tokenizer_config.json`` (its special tokens)."""
        directory = ensure_dir(directory, "tokenizer directory")
        written = self._write_files(directory)
        for name in set(TOKENIZER_FILES) - set(written):
            (directory / name).unlink(missing_ok=True)
        atomic_write_json(directory / CONFIG_FILE, self.config(model_max_length))
        return directory

    def config(self, model_max_length: int | None = None) -> dict:
        """``tokenizer_config.json``: what ``transformers`` reads, plus the ids and the backend for people."""
        tokens = {f"{r}_token": self.id_to_piece(i) for r in ROLES if (i := getattr(self.special, r)) is not None}
        return {
            "tokenizer_class": self.config_class,
            "openllm_tokenizer": self.kind,
            "model_max_length": model_max_length,
            "vocab_size": self.vocab_size,
            "add_bos_token": self.special.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            **tokens,
            **{f"{r}_token_id": getattr(self.special, r) for r in ROLES},
            **({"chat_template": self.chat_template} if self.chat_template else {}),
        }

    def special_summary(self) -> dict:
        return asdict(self.special)
