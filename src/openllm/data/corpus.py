"""Documents from raw text: reading, whitespace normalisation, splitting, de-duplication, the split.

Documents
    In ``paragraph`` mode (the default) a document is a run of non-blank lines; one or more blank
    (or whitespace-only) lines separate documents. In ``line`` mode every non-blank line is a
    document. Whitespace is normalised: CRLF/CR become LF, every run of other whitespace inside a
    line becomes one space, lines are stripped.

De-duplication and the train/validation split work on these normalised documents; they are in
:mod:`openllm.data.prepare`, which streams documents from :mod:`openllm.data.sources`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from openllm.core.errors import OpenLLMError

DOC_MODES = ("paragraph", "line")
_BLANK_LINES = re.compile(r"\n[^\S\n]*\n(?:[^\S\n]*\n)*")


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
    # (``str.split()`` splits at the characters ``\s`` matches, as ``str.strip`` does: runs of spaces within a
    # line become one, and the line is stripped, several times faster than a regular expression)
    lines = (" ".join(line.split()) for line in text.split("\n"))
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
