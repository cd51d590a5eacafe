"""Tokenizers: one interface (:class:`Tokenizer`), three kinds (SentencePiece, Hugging Face
``tokenizers``, and a byte-level BPE encoded with ``tiktoken``), and the functions that find, load and train them."""

from openllm.data.tokenizer.base import CONFIG_FILE, SpecialTokens, Tokenizer
from openllm.data.tokenizer.registry import (
    TOKENIZER_TYPES,
    TOKENIZER_TYPES_HELP,
    find_tokenizer,
    load_tokenizer,
    read_tokenizer_config,
    train_tokenizer,
)

__all__ = [
    "CONFIG_FILE",
    "TOKENIZER_TYPES",
    "TOKENIZER_TYPES_HELP",
    "SpecialTokens",
    "Tokenizer",
    "find_tokenizer",
    "load_tokenizer",
    "read_tokenizer_config",
    "train_tokenizer",
]
