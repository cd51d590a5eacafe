"""Tokenizers: one interface (:class:`Tokenizer`), two backends (SentencePiece and Hugging Face
``tokenizers``), and the functions that find, load and train them."""

from openllm.data.tokenizer.base import CONFIG_FILE, SpecialTokens, Tokenizer
from openllm.data.tokenizer.registry import (
    TOKENIZER_TYPES,
    find_tokenizer,
    load_tokenizer,
    read_tokenizer_config,
    train_tokenizer,
)

__all__ = [
    "CONFIG_FILE",
    "TOKENIZER_TYPES",
    "SpecialTokens",
    "Tokenizer",
    "find_tokenizer",
    "load_tokenizer",
    "read_tokenizer_config",
    "train_tokenizer",
]
