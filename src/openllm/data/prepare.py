"""``openllm prepare``: clean, de-duplicate, split, train or reuse a tokenizer, encode and pack.

The document rules and the split are in :mod:`openllm.data.corpus`; the output directory's
format in :mod:`openllm.data.dataset`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np

from openllm.core.errors import OpenLLMError
from openllm.core.fileio import atomic_open, atomic_write_json, ensure_dir
from openllm.core.options import Opt, fraction, int_value, positive_int
from openllm.core.progress import Progress
from openllm.data.corpus import DOC_MODES, deduplicate, read_text, split_documents, split_train_val
from openllm.data.dataset import FORMAT, META_FILE, PreparedDataset, token_dtype
from openllm.data.tokenizer import BOS_ID, EOS_ID, Tokenizer, load_tokenizer, train_tokenizer


def pack(tokenizer: Tokenizer, docs: Sequence[str], dtype: np.dtype) -> np.ndarray:
    """Encode documents as BOS + ids + EOS, concatenated without padding."""
    encoded: list[list[int]] = []
    with Progress(len(docs), "encoding", "documents") as progress:
        for start in range(0, len(docs), 4096):
            chunk = docs[start : start + 4096]
            encoded.extend(tokenizer.encode_batch(chunk))
            progress.update(len(chunk))
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


def prepare_dataset(
    inputs: Annotated[
        Sequence[str | os.PathLike], Opt("UTF-8 text file(s)", flag="--input", nargs="+", metavar="FILE")
    ],
    output_dir: Annotated[str | os.PathLike, Opt("dataset directory to write")],
    *,
    vocab_size: Annotated[int, Opt("tokenizer vocabulary", parse=positive_int)] = 4000,
    validation_file: Annotated[
        str | os.PathLike | None, Opt("use this file as validation text instead of a random split")
    ] = None,
    val_fraction: Annotated[float, Opt("share of documents held out", parse=fraction)] = 0.1,
    tokenizer: Annotated[
        str | os.PathLike | None, Opt("use an existing tokenizer.model (file or directory) instead of training one")
    ] = None,
    seed: Annotated[int, Opt("seed of the train/validation split", parse=int_value)] = 1337,
    doc_mode: Annotated[
        str, Opt("what a document is: a paragraph (blank-line separated) or a line", choices=DOC_MODES)
    ] = "paragraph",
    force: Annotated[bool, Opt("overwrite a different dataset in --output-dir")] = False,
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
    if doc_mode not in DOC_MODES:
        raise OpenLLMError(f"unknown document mode {doc_mode!r}; use paragraph or line")

    docs: list[str] = []
    input_info = []
    for path in inputs:
        text, raw = read_text(path)
        found = split_documents(text, doc_mode)
        if not found:
            raise OpenLLMError(f"{path} holds no text (empty or whitespace only)")
        docs.extend(found)
        input_info.append(
            {"path": str(path), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "documents": len(found)}
        )
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
                f"{out} already holds a different dataset (meta.json differs); "
                "choose another --output-dir or pass --force"
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
        "seed": seed,
        "doc_mode": doc_mode,
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
