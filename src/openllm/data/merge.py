"""``openllm prepare merge PART_DIR... --output-dir DIR``: the parts of a sharded preparation
(:mod:`openllm.data.shards`) joined into one dataset, equal to what one machine makes of all the inputs.

The parts' documents are walked in reading order (part 0 first); the decisions that span parts are made as
one machine makes them: a document whose hash an earlier part kept, filtered or held out is a duplicate; a
near-copy (under ``--near-dedup``) of a document kept before is dropped, from the parts' signatures; a corpus
whose split left no validation document holds out the training document with the lowest hash. The kept
documents' tokens are copied (nothing is encoded again), so the token files, their fingerprint and the
counts in ``meta.json`` are those of the one-machine preparation.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openllm.core.errors import OpenLLMError
from openllm.core.fileio import directory_lock, ensure_dir, training_run_files, write_failures
from openllm.data import shards
from openllm.data.dataset import META_FILE, PreparedDataset, load_dataset
from openllm.data.neardup import NearDedup, NearDuplicateIndex
from openllm.data.prepare import (
    SPLIT_RULE,
    check_kept,
    commit_dataset,
    no_training_documents,
    peak_rss_mb,
    request_key,
)

SAME = ("count", "all_inputs", "settings", "validation_file")  # what every part must share
PART_KEYS = {"index": int, "count": int, "all_inputs": list, "settings": dict, "trained": str}


def _parts(dirs: Sequence[str | os.PathLike]) -> list[PreparedDataset]:
    """The parts, checked to be one whole sharded preparation, in part order."""
    parts = []
    for d in dirs:
        ds = load_dataset(d)
        part = ds.meta.get("part")
        if not isinstance(part, dict) or not (ds.path / shards.INDEX).is_file():
            raise OpenLLMError(f"{d} is not a part of a sharded preparation (`openllm prepare --num-shards N ...`)")
        if bad := [k for k, kind in PART_KEYS.items() if not isinstance(part.get(k), kind)]:
            raise OpenLLMError(f"{d}/meta.json: its part record is damaged ({', '.join(bad)}); prepare the part again")
        parts.append(ds)
    first = parts[0].meta["part"]
    for p in parts[1:]:
        for key in SAME:
            if p.meta["part"].get(key) != first.get(key):
                raise OpenLLMError(
                    f"{p.path} is a part of another preparation than {parts[0].path} (its {key} differs)"
                )
        if p.meta["tokenizer_sha256"] != parts[0].meta["tokenizer_sha256"]:
            raise OpenLLMError(f"{p.path} was encoded with another tokenizer than {parts[0].path}")
    count = first["count"]
    indices = sorted(p.meta["part"]["index"] for p in parts)
    if len(set(indices)) != len(indices):
        raise OpenLLMError(f"a part is given twice (parts {', '.join(map(str, indices))})")
    if missing := sorted(set(range(count)) - set(indices)):
        raise OpenLLMError(f"part(s) {', '.join(map(str, missing))} of {count} missing: give every part's directory")
    parts.sort(key=lambda p: p.meta["part"]["index"])
    read = [str(i.get("path")) for p in parts for i in p.meta.get("inputs") or []]
    if read != first["all_inputs"]:  # (machines that saw other files, or other sizes, cut the inputs otherwise)
        raise OpenLLMError(
            f"the parts do not cover the inputs once each, in order ({len(read)} file(s) read by the parts, "
            f"{len(first['all_inputs'])} listed): prepare every part from the same files"
        )
    return parts


def _index(part: PreparedDataset) -> np.ndarray:
    """A part's document index, checked against its token files."""
    docs = np.load(part.path / shards.INDEX)
    for split, name in ((shards.TRAIN, "train"), (shards.VAL, "val")):
        if int(docs["tokens"][docs["split"] == split].sum()) != part.meta[f"{name}_tokens"]:
            raise OpenLLMError(f"{part.path}/{shards.INDEX} does not match its {name}.bin; prepare the part again")
    return docs


class _Writer:
    """Token spans copied from the parts' files into one file, hashed as written."""

    def __init__(self, path: Path, digest):
        self.file, self.digest, self.tokens = open(path, "wb"), digest, 0  # noqa: SIM115 (closed by close)

    def copy(self, source: np.ndarray, start: int, count: int) -> None:
        data = np.ascontiguousarray(source[start : start + count]).tobytes()
        self.file.write(data)
        self.digest.update(data)
        self.tokens += count

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def merge_parts(
    parts: Sequence[str | os.PathLike], output_dir: str | os.PathLike, force: bool = False
) -> PreparedDataset:
    """Join ``parts`` (every part of one sharded preparation, in any order) into ``output_dir``."""
    t0 = time.perf_counter()
    if not parts:
        raise OpenLLMError("no part directories given")
    ordered = _parts(parts)
    request = ordered[0].meta["part"]
    out = Path(output_dir)
    if any(out.resolve() == p.path.resolve() for p in ordered):
        raise OpenLLMError(f"--output-dir {out} is one of the parts; merge into another directory")
    if run := training_run_files(out):
        raise OpenLLMError(f"output directory {out} holds a training run ({', '.join(sorted(run))})")
    if (out / META_FILE).is_file() and not force:
        raise OpenLLMError(f"{out} already holds a dataset; choose another --output-dir or pass --force")
    created = not out.exists()
    try:
        with directory_lock(out, "dataset directory"):
            ensure_dir(out)
            work = out / ".merge"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            try:
                with write_failures(out):
                    meta = _merge(ordered, work, request)
                    meta["seconds"] = meta["timing"]["merge_seconds"] = round(time.perf_counter() - t0, 3)
                    commit_dataset(work, out, ordered[0].tokenizer, meta)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return PreparedDataset(out, meta)


def _merge(parts: list[PreparedDataset], work: Path, request: dict) -> dict:
    settings, val_file = request["settings"], request["validation_file"]
    near = None
    if settings.get("near_dedup"):
        n = settings["near_dedup"]
        near = NearDuplicateIndex(
            work / "near-dedup.sqlite", NearDedup(n["threshold"], n["permutations"], n["shingle"], settings["seed"])
        )
    filters = list(settings.get("quality_filters") or {})
    seen: set[bytes] = set()
    duplicates = overlap = near_dropped = 0
    filtered = dict.fromkeys(filters, 0)
    train_spans: list[tuple[int, int, int, int]] = []  # (part, start, tokens, text bytes)
    val_spans: list[tuple[int, int, int, int]] = []
    lowest: tuple[int, int] | None = None  # (hash value, its place in train_spans)
    for i, part in enumerate(parts):
        docs = _index(part)
        sigs = np.load(part.path / shards.SIGNATURES) if near is not None else None
        offsets = {shards.TRAIN: 0, shards.VAL: 0}
        kept_row = 0
        for row in docs:
            split, tokens, size, h = int(row["split"]), int(row["tokens"]), int(row["text_bytes"]), bytes(row["hash"])
            start = offsets.get(split, 0)
            if split in offsets:
                offsets[split] += tokens
            sig = None
            if split in (shards.TRAIN, shards.VAL) and sigs is not None:
                sig, kept_row = sigs[kept_row], kept_row + 1
            if val_file is not None and split == shards.VAL:  # the validation file: read first, once
                if i == 0:
                    val_spans.append((i, start, tokens, size))
                    if near is not None:
                        near.is_near_duplicate_signature(sig)  # type: ignore[arg-type]
                continue
            if h in seen:
                duplicates += 1
                continue
            seen.add(h)
            if split >= shards.FILTERED:
                filtered[filters[split - shards.FILTERED]] += 1
                continue
            if split == shards.OVERLAP:
                overlap += 1
                continue
            if near is not None and near.is_near_duplicate_signature(sig):  # type: ignore[arg-type]
                near_dropped += 1
                continue
            if split == shards.VAL:
                val_spans.append((i, start, tokens, size))
                continue
            value = int.from_bytes(h[:8], "little")
            if lowest is None or value < lowest[0]:
                lowest = (value, len(train_spans))
            train_spans.append((i, start, tokens, size))
    if near is not None:
        near.close()
    read = sum(p.meta["documents_read"] for p in parts)
    duplicates += sum(p.meta["duplicates_dropped"] for p in parts)
    unique = read - duplicates
    check_kept(unique, filtered, settings.get("quality_filters") or {}, near_dropped, overlap, val_file is not None)
    if val_file is None and unique < 2:
        raise no_training_documents(unique, False)
    skip = None
    if val_file is None and not val_spans and len(train_spans) >= 2 and lowest is not None:
        skip = lowest[1]  # as one machine does for a corpus too small for its split
    if len(train_spans) - (skip is not None) == 0:
        raise no_training_documents(unique, val_file is not None and overlap > 0)
    if val_file is None and not val_spans and skip is None:
        raise OpenLLMError(f"no document fell into the validation split (--val-fraction {settings['val_fraction']})")

    digest = hashlib.sha256()
    streams = [(p.train, p.val) for p in parts]
    train = _Writer(work / "train.bin", digest)
    for j, (i, start, tokens, _) in enumerate(train_spans):
        if j != skip:
            train.copy(streams[i][0], start, tokens)
    train.close()
    digest.update(b"|")
    val = _Writer(work / "val.bin", digest)
    for i, start, tokens, _ in val_spans:
        val.copy(streams[i][1], start, tokens)
    if skip is not None:
        i, start, tokens, _ = train_spans[skip]
        val.copy(streams[i][0], start, tokens)
    val.close()

    first = parts[0].meta
    inputs = [i for p in parts for i in p.meta["inputs"]]
    tok = parts[0].tokenizer
    source = request_key(inputs, val_file, request["trained"], tok, settings)
    text = sum(s for _, _, _, s in train_spans)
    held_out = train_spans[skip][3] if skip is not None else 0
    meta = {
        **{k: v for k, v in first.items() if k not in ("part", "timing", "seconds")},
        "documents_read": read,
        "duplicates_dropped": duplicates,
        "unique_documents": unique,
        "filtered_documents": filtered,
        "near_duplicates_dropped": near_dropped,
        "train_documents": len(train_spans) - (skip is not None),
        "val_documents": len(val_spans) + (skip is not None),
        "validation_overlap_dropped": overlap,
        "bad_records_skipped": _summed(p.meta.get("bad_records_skipped") or {} for p in parts),
        "documents_cut": sum(p.meta.get("documents_cut", 0) for p in parts),
        "inputs": inputs,
        "train_tokens": train.tokens,
        "val_tokens": val.tokens,
        "train_text_bytes": text - held_out,
        "val_text_bytes": sum(s for _, _, _, s in val_spans) + held_out,
        "split": "validation file" if val_file else f"hash: {SPLIT_RULE} ({settings['val_fraction']:g})",
        "fingerprint": digest.hexdigest(),
        "source_fingerprint": source,
        "merged_from": [str(p.path.resolve()) for p in parts],
        "timing": {"merge_seconds": 0.0, "peak_rss_mb": peak_rss_mb()},
    }
    return meta


def _summed(counts) -> dict:
    total: dict = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total
