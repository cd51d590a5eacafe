"""A prepared dataset directory: ``train.bin`` / ``val.bin`` token streams and ``meta.json``.

Each document is encoded as its tokenizer frames it (bos + ids + eos for OpenLLM's SentencePiece
tokenizers, ids + ``<|endoftext|>`` for a GPT-2 style one, ids + the encoded separator for a
vocabulary without eos) and the documents are packed back to back (no padding), raw
little-endian ``uint16`` (or ``uint32`` for vocabularies over 65,535), read back
with ``numpy.memmap``. ``meta.json`` is written last and marks a complete dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openllm.core.errors import OpenLLMError
from openllm.core.untrusted import read_json
from openllm.data.tokenizer import Tokenizer, find_tokenizer, load_tokenizer

META_FILE = "meta.json"
FORMAT = "openllm-dataset/1"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


@dataclass
class PreparedDataset:
    """A prepared dataset directory: memmapped token streams and its metadata."""

    path: Path
    meta: dict

    @property
    def train(self) -> np.ndarray:
        return self._stream("train")

    @property
    def val(self) -> np.ndarray:
        return self._stream("val")

    def _stream(self, split: str) -> np.ndarray:
        dtype = np.dtype(self.meta["dtype"])
        if not self.meta.get(f"{split}_tokens"):  # (a part of a sharded preparation may hold no validation text)
            return np.empty(0, dtype=dtype)
        return np.memmap(self.path / f"{split}.bin", dtype=dtype, mode="r")

    @property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path)

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer's file (``tokenizer.model`` or ``tokenizer.json``)."""
        return find_tokenizer(self.path) or self.path / "tokenizer.model"

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def load_dataset(path: str | os.PathLike) -> PreparedDataset:
    """Open a prepared dataset directory, checking that it is complete."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise OpenLLMError(f"{path} is not a prepared dataset (no meta.json); run `openllm prepare` first")
    meta = read_json(meta_path, "dataset metadata")
    if not isinstance(meta, dict):
        raise OpenLLMError(f"{meta_path} must hold a JSON object")
    if meta.get("format") != FORMAT:
        raise OpenLLMError(f"{meta_path}: unknown dataset format {meta.get('format')!r}")
    ds = PreparedDataset(path, meta)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        f = path / f"{split}.bin"
        expected = meta[f"{split}_tokens"] * itemsize
        if not f.is_file() or f.stat().st_size != expected:
            raise OpenLLMError(f"{f} is missing or has the wrong size (expected {expected} bytes); re-run prepare")
    if find_tokenizer(path) is None:
        raise OpenLLMError(f"{path} has no tokenizer (tokenizer.model or tokenizer.json); re-run prepare")
    return ds
