"""Documents from raw text: reading, whitespace normalisation, splitting, de-duplication, the split.

Documents
    In ``paragraph`` mode (the default) a document is a run of non-blank lines; one or more blank
    (or whitespace-only) lines separate documents. In ``line`` mode every non-blank line is a
    document. Whitespace is normalised: CRLF/CR become LF, every run of other whitespace inside a
    line becomes one space, lines are stripped. Exact duplicates (after normalisation) are dropped,
    keeping the first.

Split
    Without a validation file, a fixed-seed random ``val_fraction`` of the *unique* documents is
    held out, so no document or duplicate of it is on both sides. With a validation file, any
    training document that also appears in it is dropped from training.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

from openllm.core.errors import OpenLLMError

DOC_MODES = ("paragraph", "line")
_BLANK_LINES = re.compile(r"\n[^\S\n]*\n(?:[^\S\n]*\n)*")
_INLINE_SPACE = re.compile(r"[^\S\n]+")


def read_text(path: str | os.PathLike) -> tuple[str, bytes]:
    """Read a UTF-8 file; returns (text, raw bytes). Errors name the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise OpenLLMError(f"input file not found: {path}")
    if not path.is_file():
        raise OpenLLMError(f"input is not a file: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise OpenLLMError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OpenLLMError(f"{path} is not valid UTF-8 (bad byte at offset {exc.start})") from None
    if "\x00" in text:
        raise OpenLLMError(f"{path} contains NUL bytes; it looks like a binary file, not text")
    return text.lstrip("\ufeff"), raw


def normalize_document(text: str) -> str:
    lines = (_INLINE_SPACE.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def split_documents(text: str, mode: str = "paragraph") -> list[str]:
    """Split raw text into normalised, non-empty documents (see the module docstring)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if mode == "paragraph":
        parts = _BLANK_LINES.split(text)
    elif mode == "line":
        parts = text.split("\n")
    else:
        raise OpenLLMError(f"unknown document mode {mode!r}; use paragraph or line")
    docs = (normalize_document(p) for p in parts)
    return [d for d in docs if d]


def deduplicate(docs: Sequence[str]) -> tuple[list[str], int]:
    """Drop exact duplicates, keeping first occurrences in order; returns (unique, dropped)."""
    unique = list(dict.fromkeys(docs))  # dicts keep insertion order: the first copy stays in place
    return unique, len(docs) - len(unique)


def split_train_val(docs: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out a fixed-seed random ``val_fraction`` of documents; both sides keep corpus order."""
    if len(docs) < 2:
        raise OpenLLMError(
            f"the corpus has {len(docs)} document(s); at least 2 are needed to hold out validation text "
            "(or give a validation file)"
        )
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    held = set(random.Random(seed).sample(range(len(docs)), n_val))
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    return train, val
