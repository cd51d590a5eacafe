"""Preparation across machines: ``openllm prepare --num-shards N --shard-index K`` prepares one part of the
inputs, and ``openllm prepare merge`` (:mod:`openllm.data.merge`) joins the parts.

The inputs (as ``expand_inputs`` lists them, in order) are cut into N consecutive runs of files of about
equal size, so every machine that sees the same files picks the same part. A part is a dataset directory
(its token files are usable alone) that also keeps, for each document it kept, in reading order, what the
merge needs to redo the decisions that span parts: the document's hash, its side of the split, its size in
bytes and in tokens (``documents.npy``), and its MinHash signature under ``--near-dedup``
(``signatures.npy``). A part removes exact duplicates within itself (a copy of a kept document is a copy
whichever part it is in), applies the quality filters (they look at one document) and the hash split (it
depends on the document only); near-duplicates and the hold-out of a corpus too small for its split are
decided by the merge over all parts, in reading order, as one machine decides them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from openllm.core.errors import OpenLLMError
from openllm.data.neardup import NearDuplicateIndex

INDEX = "documents.npy"
SIGNATURES = "signatures.npy"
PART_FILES = (INDEX, SIGNATURES)
DOCUMENT = np.dtype([("hash", "V16"), ("split", "u1"), ("text_bytes", "<u8"), ("tokens", "<u8")])
# ``split``: 0 training, 1 validation; the documents a part dropped are kept too (a copy of one in a later part
# is a duplicate there, as on one machine): OVERLAP (in --validation-file), FILTERED + i (the i-th active filter)
TRAIN, VAL, OVERLAP, FILTERED = 0, 1, 2, 3


def check_request(num_shards: int, shard_index: int | None, tokenizer) -> tuple[int, int] | None:
    """(count, index) of a sharded preparation, None for a whole one; refused by option name when unusable."""
    if shard_index is None and num_shards == 1:
        return None
    if shard_index is None:
        raise OpenLLMError(f"--num-shards {num_shards} needs --shard-index (0 to {num_shards - 1}): which part this is")
    if num_shards < 2:
        raise OpenLLMError("--shard-index needs --num-shards 2 or more")
    if not 0 <= shard_index < num_shards:
        raise OpenLLMError(f"--shard-index must be from 0 to {num_shards - 1}, got {shard_index}")
    if tokenizer is None:
        raise OpenLLMError(
            "--num-shards needs --tokenizer: every part must encode with the same tokenizer (train one first on a "
            "sample, e.g. `openllm prepare --input SAMPLE --output-dir tok`, then give --tokenizer tok)"
        )
    return num_shards, shard_index


def shard_files(files: list[Path], count: int, index: int) -> list[Path]:
    """Part ``index`` of ``count``: the files where the running size of the inputs (in order) lies in its share
    of the total, so that the parts are consecutive, cover every file once, weigh about the same, and none is
    empty."""
    if len(files) < count:
        raise OpenLLMError(f"--num-shards {count} is more than the {len(files)} input file(s): each part needs a file")
    sizes = [os.path.getsize(p) for p in files]
    total = sum(sizes) or 1
    picked, start, previous = [], 0, -1
    for i, (path, size) in enumerate(zip(files, sizes, strict=True)):
        part = min(max(start * count // total, previous), previous + 1)  # in order, no part skipped
        part = min(max(part, count - (len(files) - i)), count - 1)  # a file left for each later part
        if part == index:
            picked.append(path)
        start, previous = start + size, part
    return picked


class PartIndex:
    """The documents a part keeps, written as they are read (hash, split, bytes), with their signatures."""

    def __init__(self, work: Path, near: NearDuplicateIndex | None):
        self.work, self.near = work, near
        self.rows = open(work / "documents.part", "wb")  # noqa: SIM115 (closed by close)
        self.sigs = open(work / "signatures.part", "wb") if near is not None else None  # noqa: SIM115

    def add(self, h: bytes, doc: str, split: int) -> None:
        self.rows.write(h + bytes([split]) + len(doc.encode("utf-8")).to_bytes(8, "little"))
        if self.sigs is not None and self.near is not None and split in (TRAIN, VAL):
            self.sigs.write(self.near.signature(doc).tobytes())

    def close(self) -> None:
        self.rows.close()
        if self.sigs is not None:
            self.sigs.close()


def finish_part_index(work: Path) -> None:
    """``documents.npy`` (and ``signatures.npy``) from what the read pass recorded and each document's token
    count from the encode pass (``train.counts``, ``val.counts``: in order within each split)."""
    raw = np.fromfile(work / "documents.part", dtype=np.dtype([("hash", "V16"), ("split", "u1"), ("bytes", "<u8")]))
    docs = np.zeros(len(raw), dtype=DOCUMENT)
    docs["hash"], docs["split"], docs["text_bytes"] = raw["hash"], raw["split"], raw["bytes"]
    for split, name in ((0, "train.counts"), (1, "val.counts")):
        counts = np.fromfile(work / name, dtype="<u8")
        where = docs["split"] == split
        if int(where.sum()) != len(counts):
            raise OpenLLMError(f"{work}: the part's document index does not match its {name}; rerun with --force")
        docs["tokens"][where] = counts
    np.save(work / INDEX, docs)
    if (work / "signatures.part").is_file():  # (one row per kept document, in order)
        kept = int(np.isin(docs["split"], (TRAIN, VAL)).sum())
        np.save(work / SIGNATURES, np.fromfile(work / "signatures.part", dtype="<u4").reshape(kept, -1))
