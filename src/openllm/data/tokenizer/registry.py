"""Find, load and train tokenizers of any backend: the one place that knows the file names."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from openllm.core.errors import OpenLLMError
from openllm.core.fileio import read_json
from openllm.data.tokenizer.base import CONFIG_FILE, Tokenizer, read_chat_template
from openllm.data.tokenizer.hf import JSON_FILE, read_tokenizer_json, read_vocab_merges, train_bytelevel_bpe
from openllm.data.tokenizer.spm import MODEL_FILE, read_sentencepiece, train_sentencepiece
from openllm.data.tokenizer.tiktoken_bpe import KIND as TIKTOKEN_BPE
from openllm.data.tokenizer.tiktoken_bpe import TiktokenTokenizer, train_tiktoken_bpe

TOKENIZER_TYPES = ("sentencepiece", "bytelevel-bpe", TIKTOKEN_BPE)
TOKENIZER_TYPES_HELP = (
    "sentencepiece: SentencePiece BPE; bytelevel-bpe: GPT-2 style, with Hugging Face tokenizers; "
    "tiktoken-bpe: byte-level BPE with Llama 3's split, trained with rustbpe and encoded with tiktoken (fastest)"
)
SEARCHED = f"{MODEL_FILE}, {JSON_FILE}, or vocab.json + merges.txt"


def train_tokenizer(documents: Sequence[str], vocab_size: int, kind: str = "sentencepiece") -> Tokenizer:
    """Train a ``kind`` tokenizer (one of :data:`TOKENIZER_TYPES`) of ``vocab_size`` tokens on ``documents``."""
    if not documents:
        raise OpenLLMError("cannot train a tokenizer on an empty corpus")
    if kind == "sentencepiece":
        return train_sentencepiece(documents, vocab_size)
    if kind == "bytelevel-bpe":
        return train_bytelevel_bpe(documents, vocab_size)
    if kind == TIKTOKEN_BPE:
        return train_tiktoken_bpe(documents, vocab_size)
    raise OpenLLMError(f"unknown tokenizer type {kind!r}; use one of {', '.join(TOKENIZER_TYPES)}")


def find_tokenizer(directory: str | os.PathLike) -> Path | None:
    """The tokenizer file a directory holds (SentencePiece first: an OpenLLM export carries both)."""
    d = Path(directory)
    for name in (MODEL_FILE, JSON_FILE, "vocab.json"):
        if (d / name).is_file():
            return d / name
    return None


def _json_object(path: Path, what: str) -> dict:
    if not path.is_file():
        return {}
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise OpenLLMError(f"{path} must hold a JSON object")
    return data


def read_tokenizer_config(directory: str | os.PathLike) -> dict:
    return _json_object(Path(directory) / CONFIG_FILE, "tokenizer config")


def load_tokenizer(path: str | os.PathLike, model_config: dict | None = None) -> Tokenizer:
    """Load a tokenizer from a file (``tokenizer.model``, ``tokenizer.json``, ``vocab.json``) or a directory
    holding one. Special tokens come from the tokenizer, its ``tokenizer_config.json`` and the model's
    config (``model_config``, else a ``config.json`` beside the tokenizer)."""
    path = Path(path)
    file = find_tokenizer(path) if path.is_dir() else path
    if file is None:
        raise OpenLLMError(f"no tokenizer in {path} (looked for {SEARCHED})")
    if not file.is_file():
        raise OpenLLMError(f"tokenizer not found: {file}")
    if file.suffix == ".model":
        tok = read_sentencepiece(file.read_bytes(), str(file))
        tok.chat_template = read_chat_template(read_tokenizer_config(file.parent).get("chat_template"))
        return tok
    if file.suffix != ".json":
        raise OpenLLMError(f"{file}: not a tokenizer file (expected {SEARCHED})")
    tok_config = read_tokenizer_config(file.parent)
    if model_config is None:
        try:
            model_config = _json_object(file.parent / "config.json", "model config")
        except OpenLLMError:
            model_config = {}  # a config.json that is not the model's is no source of token ids
    if file.name == "vocab.json":
        merges = file.parent / "merges.txt"
        if not merges.is_file():
            raise OpenLLMError(f"{file} needs merges.txt beside it (a GPT-2 vocab.json + merges.txt pair)")
        return read_vocab_merges(file, merges, tok_config, model_config)
    hf = read_tokenizer_json(file, tok_config, model_config)
    if tok_config.get("openllm_tokenizer") == TIKTOKEN_BPE:  # (encoded with tiktoken, the same ids)
        return TiktokenTokenizer(hf.raw, tok_config, model_config, hf.origin)
    return hf
