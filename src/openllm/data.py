"""Corpus preparation and token batches.

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

Storage
    Each document is encoded as BOS + ids + EOS and the documents are packed back to back (no
    padding) into ``train.bin`` / ``val.bin``, raw little-endian ``uint16`` (or ``uint32`` for
    vocabularies over 65,535) read back with ``numpy.memmap``. ``meta.json`` describes it all.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from openllm.errors import OpenLLMError
from openllm.fileio import atomic_open, atomic_write_json, ensure_dir
from openllm.tokenizer import BOS_ID, EOS_ID, Tokenizer, load_tokenizer, train_tokenizer

META_FILE = "meta.json"
FORMAT = "openllm-dataset/1"
_BLANK_LINES = re.compile(r"\n[^\S\n]*\n(?:[^\S\n]*\n)*")
_INLINE_SPACE = re.compile(r"[^\S\n]+")


# ----------------------------------------------------------------------------------------- text

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
    seen: set[str] = set()
    unique = [d for d in docs if not (d in seen or seen.add(d))]
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


def pack(tokenizer: Tokenizer, docs: Sequence[str], dtype: np.dtype) -> np.ndarray:
    """Encode documents as BOS + ids + EOS, concatenated without padding."""
    encoded = tokenizer.encode_batch(docs)
    total = sum(len(ids) + 2 for ids in encoded)
    out = np.empty(total, dtype=dtype)
    pos = 0
    for ids in encoded:
        n = len(ids)
        out[pos] = BOS_ID
        out[pos + 1 : pos + 1 + n] = ids
        out[pos + 1 + n] = EOS_ID
        pos += n + 2
    return out


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


# -------------------------------------------------------------------------------------- prepare

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
        return np.memmap(self.path / f"{split}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.model"

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def prepare_dataset(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    vocab_size: int = 4000,
    validation_file: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    tokenizer: str | os.PathLike | None = None,
    seed: int = 1337,
    doc_mode: str = "paragraph",
    force: bool = False,
) -> PreparedDataset:
    """Clean, de-duplicate, split, tokenize and pack text files into ``output_dir``.

    Returns the prepared dataset. Nothing under ``output_dir`` changes if an error is raised,
    and an existing *different* dataset there is refused unless ``force``.
    """
    t0 = time.perf_counter()
    if not inputs:
        raise OpenLLMError("no input files given")
    if not (0.0 < val_fraction < 1.0):
        raise OpenLLMError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if doc_mode not in ("paragraph", "line"):
        raise OpenLLMError(f"unknown document mode {doc_mode!r}; use paragraph or line")

    docs: list[str] = []
    input_info = []
    for path in inputs:
        text, raw = read_text(path)
        found = split_documents(text, doc_mode)
        if not found:
            raise OpenLLMError(f"{path} holds no text (empty or whitespace only)")
        docs.extend(found)
        input_info.append({"path": str(path), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                           "documents": len(found)})
    documents_read = len(docs)
    unique, duplicates = deduplicate(docs)

    val_info = None
    overlap = 0
    if validation_file is not None:
        vtext, vraw = read_text(validation_file)
        val_docs, _ = deduplicate(split_documents(vtext, doc_mode))
        if not val_docs:
            raise OpenLLMError(f"{validation_file} holds no text (empty or whitespace only)")
        val_set = set(val_docs)
        train_docs = [d for d in unique if d not in val_set]
        overlap = len(unique) - len(train_docs)
        if not train_docs:
            raise OpenLLMError("every training document also appears in the validation file")
        val_info = {"path": str(validation_file), "bytes": len(vraw), "sha256": hashlib.sha256(vraw).hexdigest()}
    else:
        train_docs, val_docs = split_train_val(unique, val_fraction, seed)

    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    source_fingerprint = request_key(input_info, val_info, vocab_size, tok, val_fraction, seed, doc_mode)

    out = Path(output_dir)
    existing = out / META_FILE
    if existing.is_file() and not force:
        try:
            old = json.loads(existing.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("source_fingerprint") != source_fingerprint:
            raise OpenLLMError(
                f"{out} already holds a different dataset (meta.json differs); choose another --output-dir or pass --force"
            )
    elif out.exists() and not out.is_dir():
        raise OpenLLMError(f"output directory {out} exists and is not a directory")

    if tok is None:
        tok = train_tokenizer(train_docs, vocab_size)
    dtype = token_dtype(tok.vocab_size)
    train_ids = pack(tok, train_docs, dtype)
    val_ids = pack(tok, val_docs, dtype)
    fingerprint = hashlib.sha256(train_ids.tobytes() + b"|" + val_ids.tobytes()).hexdigest()

    meta = {
        "format": FORMAT,
        "documents_read": documents_read,
        "duplicates_dropped": duplicates,
        "unique_documents": len(unique),
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "validation_overlap_dropped": overlap,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "train_text_bytes": sum(len(d.encode("utf-8")) for d in train_docs),
        "val_text_bytes": sum(len(d.encode("utf-8")) for d in val_docs),
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "tokenizer_sha256": tok.sha256,
        "tokenizer_source": str(tokenizer) if tokenizer is not None else "trained on the training split",
        "inputs": input_info,
        "validation_file": val_info,
        "split": "validation file" if val_info else f"random {val_fraction:g} of unique documents",
        "split_seed": seed,
        "val_fraction": None if val_info else val_fraction,
        "doc_mode": doc_mode,
        "fingerprint": fingerprint,
        "source_fingerprint": source_fingerprint,
        "seconds": None,
    }

    ensure_dir(out)
    existing.unlink(missing_ok=True)  # the old dataset is the same one (or forced): no stale meta mid-write
    with atomic_open(out / "train.bin") as f:
        f.write(train_ids.tobytes())
    with atomic_open(out / "val.bin") as f:
        f.write(val_ids.tobytes())
    tok.save(out)
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(existing, meta)  # written last: its presence marks a complete dataset
    return PreparedDataset(out, meta)


def request_key(input_info, val_info, vocab_size, tok, val_fraction, seed, doc_mode) -> str:
    """Identity of a preparation request: input contents and every setting that shapes the output."""
    source = {
        "inputs": [i["sha256"] for i in input_info],
        "validation": val_info and val_info["sha256"],
        "val_fraction": None if val_info else val_fraction,
        "seed": seed, "doc_mode": doc_mode,
        "tokenizer": tok.sha256 if tok is not None else f"train:{vocab_size}",
    }
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def file_info(path: str | os.PathLike) -> dict:
    raw = read_text(path)[1]
    return {"path": str(path), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def prepared_request_key(inputs, validation_file, vocab_size, tokenizer, val_fraction, seed, doc_mode) -> str:
    """The ``source_fingerprint`` that :func:`prepare_dataset` would record, without preparing."""
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    val_info = file_info(validation_file) if validation_file is not None else None
    return request_key([file_info(p) for p in inputs], val_info, vocab_size, tok, val_fraction, seed, doc_mode)


def load_dataset(path: str | os.PathLike) -> PreparedDataset:
    """Open a prepared dataset directory, checking that it is complete."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise OpenLLMError(f"{path} is not a prepared dataset (no meta.json); run `openllm prepare` first")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OpenLLMError(f"{meta_path} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise OpenLLMError(f"{meta_path}: unknown dataset format {meta.get('format')!r}")
    ds = PreparedDataset(path, meta)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        f = path / f"{split}.bin"
        expected = meta[f"{split}_tokens"] * itemsize
        if not f.is_file() or f.stat().st_size != expected:
            raise OpenLLMError(f"{f} is missing or has the wrong size (expected {expected} bytes); re-run prepare")
    if not ds.tokenizer_path.is_file():
        raise OpenLLMError(f"{ds.tokenizer_path} is missing; re-run prepare")
    return ds


# -------------------------------------------------------------------------------------- batches

class BatchSampler:
    """Deterministic training windows from a packed token stream.

    The stream is cut into ``n`` windows of ``seq_len + 1`` tokens; every epoch uses a fresh
    permutation of them and a fresh offset (both from ``seed`` and the epoch number). Sample
    ``k`` of the run (a global counter) therefore always maps to the same window, so the data
    position is one integer and resuming continues exactly, for any number of processes.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        if len(tokens) < 2 * seq_len + 1:
            raise OpenLLMError(
                f"the training data holds {len(tokens)} tokens, too few for windows of {seq_len}; "
                "use a smaller --seq-len or more text"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.windows_per_epoch = (len(tokens) - seq_len) // seq_len
        self._epoch, self._perm, self._shift = -1, None, 0

    def _plan(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.windows_per_epoch)
            self._shift = int(rng.integers(self.seq_len)) if epoch else 0
            self._epoch = epoch

    def batch(self, first_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (int64, ``batch_size`` x ``seq_len``) for samples first..first+batch-1."""
        rows = []
        for k in range(first_sample, first_sample + batch_size):
            epoch, i = divmod(k, self.windows_per_epoch)
            self._plan(epoch)
            start = self._shift + int(self._perm[i]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
        block = torch.from_numpy(np.stack(rows).astype(np.int64))
        return block[:, :-1], block[:, 1:]


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None):
    """The fixed validation batches: consecutive windows from the start of the stream.

    With ``max_batches`` None, or when the stream is small enough, every token is covered (the
    remainder as one shorter window). Yields (inputs, targets) pairs, int64.
    """
    n = len(tokens) - 1
    starts = list(range(0, n, seq_len))
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    full = [s for s in starts if s + seq_len <= n]
    for i in range(0, len(full), batch_size):
        block = np.stack([tokens[s : s + seq_len + 1] for s in full[i : i + batch_size]]).astype(np.int64)
        t = torch.from_numpy(block)
        yield t[:, :-1], t[:, 1:]
    tail = [s for s in starts if s + seq_len > n]
    for s in tail:
        t = torch.from_numpy(np.asarray(tokens[s : n + 1], dtype=np.int64))[None]
        yield t[:, :-1], t[:, 1:]
