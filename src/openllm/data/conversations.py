"""Conversation records to an encoded conversation set on disk (what ``openllm finetune`` trains on).

Records come from JSON lines or Parquet files (compressed too; files, directories and patterns), read by
:mod:`openllm.data.sources` with its limits and ``skip_bad_records`` counting. Three shapes are taken and
normalised to ``messages``:

``{"messages": [{"role": ..., "content": ...}, ...]}``   roles system, user, assistant (OpenAI, Hugging Face)
``{"prompt": ..., "completion": ...}``                  strings (a user and an assistant turn) or message lists
``{"instruction": ..., "input": ..., "output": ...}``   Alpaca; ``input`` optional

A record that fits none, an unknown role, a message field OpenLLM does not use, a conversation without an
assistant turn or a content that is not a string is one error naming the file and line (Parquet: record), or
is counted by kind and skipped.

Conversations are de-duplicated by a keyed hash of their normalised messages and split by it as
``prepare`` splits documents (or ``validation_data`` is the validation split); each is encoded with
:func:`openllm.data.chat.encode_chat` and appended to its split's files as it comes, so memory holds the
hashes and 8 bytes per conversation, never the data. A set directory holds, per split, ``SPLIT.ids`` (token
ids, uint16 or uint32), ``SPLIT.mask`` (one byte per token: 1 where the token carries loss) and
``SPLIT.offsets`` (int64, conversation i is ``[offsets[i], offsets[i+1])``), the tokenizer with its chat
tokens in ``tokenizer/``, and ``conversations.json`` (counts, settings, fingerprint). It is built in a
staging directory and put in place whole, so a killed preparation leaves no half-written set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from openllm.core.errors import OpenLLMError
from openllm.core.fileio import OutputDir, atomic_write_json
from openllm.core.untrusted import read_json
from openllm.data.chat import TRAIN_ON, encode_chat, with_chat_tokens
from openllm.data.dataset import token_dtype
from openllm.data.sources import Reader, expand_inputs, open_parquet, sha256_file
from openllm.data.tokenizer import Tokenizer, load_tokenizer

FORMAT = "openllm-conversations/1"
MANIFEST = "conversations.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
FILES = (MANIFEST, f"{TOKENIZER_DIR}/", *(f"{s}.{k}" for s in SPLITS for k in ("ids", "mask", "offsets")))
ROLES = ("system", "user", "assistant")
OVERFLOW = ("truncate", "refuse")
SPLIT_RULE = "validation when the conversation's seeded BLAKE2b hash, as a fraction of 2**64, is below the fraction"


def normalize_record(record: Any) -> tuple[list[dict] | None, str, str]:
    """(messages, problem, kind): the record's conversation as ``messages``, or why it is not one."""
    if not isinstance(record, dict):
        return None, f"a record must be a JSON object, not a {type(record).__name__}", "not a conversation"
    shapes = [s for s in ("messages", "prompt", "instruction") if record.get(s) is not None]
    if shapes == ["messages"]:
        messages = record["messages"]
    elif shapes == ["prompt"] and record.get("completion") is not None:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = prompt + completion
        else:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif shapes == ["instruction"] and record.get("output") is not None:
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            return None, f"the 'input' field is a {type(extra).__name__}, not a string", "not a string"
        instruction = record["instruction"]
        if isinstance(instruction, str) and extra:
            instruction = f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": record["output"]}]
    else:
        return (
            None,
            "the record fits no conversation shape (messages; prompt + completion; instruction (+ input) + output)",
            "not a conversation",
        )
    if not isinstance(messages, list) or not messages:
        return None, "'messages' must be a non-empty list of {role, content} objects", "not a conversation"
    out = []
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return None, f"message {n} is not a {{role, content}} object", "not a conversation"
        if unused := sorted(k for k, v in m.items() if k not in ("role", "content") and v is not None):
            return None, f"message {n} has fields OpenLLM does not use ({', '.join(map(str, unused))})", "unused field"
        if m["role"] not in ROLES:
            return None, f"message {n} has the unknown role {m['role']!r} (use {', '.join(ROLES)})", "unknown role"
        if not isinstance(m["content"], str):
            return None, f"the content of message {n} is a {type(m['content']).__name__}, not a string", "not a string"
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        return None, "the conversation has no assistant turn", "no assistant turn"
    return out, "", ""


@dataclass(frozen=True)
class Record:
    """A conversation read from a file, with where it was (for errors)."""

    messages: list[dict]
    where: str  # "FILE line N" or "FILE record N"


class ConversationReader(Reader):
    """:class:`~openllm.data.sources.Reader` yielding :class:`Record` s: the same files, formats, bounds and
    bad-record counting as ``prepare``'s documents."""

    def __init__(self, skip_bad_records: bool = False, **kwargs):
        super().__init__(skip_bad_records=skip_bad_records, **kwargs)

    def _record(self, path: Path, where: str, record) -> Record | None:  # type: ignore[override]
        messages, problem, kind = normalize_record(record)
        if messages is None:
            self._bad(path, where, problem, kind)
            return None
        if sum(len(m["content"]) for m in messages) > self.limit:
            self._too_long(path, where)
            return None
        return Record(messages, f"{path} {where}")

    def records(self, files: list[Path]) -> Iterator[Record]:
        return cast(Iterator[Record], self.documents(files))

    def _text(self, path: Path, stream: IO[bytes], first: bool = True) -> Iterator[str]:
        raise OpenLLMError(f"{path}: conversations are read from JSON lines (.jsonl, .json) or Parquet files")

    def _parquet(self, path: Path, compression: str | None, stream: IO[bytes]) -> Iterator[Record]:  # type: ignore[override]
        import pyarrow as pa

        with open_parquet(path, compression, stream) as pf:
            number = 0
            try:
                for batch in pf.iter_batches(batch_size=256):
                    for row in batch.to_pylist():
                        number += 1
                        if (rec := self._record(path, f"record {number}", row)) is not None:
                            yield rec
            except (pa.ArrowException, OSError) as exc:
                raise OpenLLMError(f"{path}: corrupt Parquet data near record {number + 1} ({exc})") from None


def conversation_hash(messages: list[dict], seed: int) -> bytes:
    data = json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.blake2b(data, digest_size=16, key=struct.pack("<q", seed)).digest()


class _SplitWriter:
    """One split's ids, mask and offsets, appended conversation by conversation."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.ids = open(directory / f"{split}.ids", "wb")  # noqa: SIM115 (closed by finish)
        self.mask = open(directory / f"{split}.mask", "wb")  # noqa: SIM115
        self.offsets = array("q", [0])
        self.loss_tokens = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def add(self, ids: Sequence[int], mask: Sequence[bool]) -> None:
        self.ids.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.loss_tokens += sum(mask)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Conversation ``i`` as written (the files flushed first)."""
        self.ids.flush()
        self.mask.flush()
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = np.fromfile(self.directory / f"{self.split}.ids", self.dtype, b - a, offset=a * self.dtype.itemsize)
        return ids, np.fromfile(self.directory / f"{self.split}.mask", np.uint8, b - a, offset=a)

    def drop(self, i: int) -> None:
        """Remove conversation ``i`` (rewriting the files around it, a bounded piece at a time)."""
        self.ids.close()
        self.mask.close()
        a, b = self.offsets[i], self.offsets[i + 1]
        for kind, size in (("ids", self.dtype.itemsize), ("mask", 1)):
            old, new = self.directory / f"{self.split}.{kind}", self.directory / f"{self.split}.{kind}.new"
            with open(old, "rb") as src, open(new, "wb") as dst:
                _copy(src, dst, a * size)
                src.seek(b * size)
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(new, old)
        n = b - a
        self.offsets = array("q", [*self.offsets[: i + 1], *(o - n for o in self.offsets[i + 2 :])])
        self.ids = open(self.directory / f"{self.split}.ids", "ab")  # noqa: SIM115
        self.mask = open(self.directory / f"{self.split}.mask", "ab")  # noqa: SIM115

    def finish(self) -> None:
        for f in (self.ids, self.mask):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        (self.directory / f"{self.split}.offsets").write_bytes(np.asarray(self.offsets, np.int64).tobytes())


def _copy(src, dst, n: int) -> None:
    while n > 0:
        data = src.read(min(n, 1 << 20))
        if not data:
            break
        dst.write(data)
        n -= len(data)


@dataclass
class _Counts:
    records_read: int = 0
    duplicates_dropped: int = 0
    validation_overlap_dropped: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    extra: dict = field(default_factory=dict)


def _fit(tok: Tokenizer, rec: Record, max_tokens: int, overflow: str, train_on: str, counts: _Counts):
    """The conversation's ids and mask within ``max_tokens``: whole leading turns dropped first (a leading
    system message kept where it fits), else the tokens cut from the left; None when what is left carries no
    loss (counted as dropped)."""
    ids, mask = encode_chat(tok, rec.messages, train_on=train_on)
    if len(ids) <= max_tokens:
        return ids, mask
    if overflow == "refuse":
        raise OpenLLMError(
            f"{rec.where}: the conversation has {len(ids)} tokens, more than max_tokens {max_tokens} "
            "(overflow 'truncate' keeps its last turns)"
        )
    counts.truncated += 1
    messages = rec.messages
    head = messages[:1] if messages[0]["role"] == "system" else []
    starts = [k for k in range(1, len(messages)) if messages[k]["role"] == "user"]  # where a whole turn begins
    shorter = [head + messages[k:] for k in starts if head and k > 1] + [messages[k:] for k in starts]
    for rest in shorter:
        if any(m["role"] == "assistant" for m in rest):
            got = encode_chat(tok, rest, train_on=train_on)
            if len(got[0]) <= max_tokens and any(got[1]):
                return got
    ids, mask = ids[-max_tokens:], mask[-max_tokens:]
    if not any(mask):
        counts.truncated -= 1
        counts.dropped_too_long += 1
        return None
    return ids, mask


def prepare_conversations(
    inputs: Sequence[str | os.PathLike],
    tokenizer: Tokenizer | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    validation_data: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    validation_fraction: float = 0.05,
    max_tokens: int,
    overflow: str = "truncate",
    train_on: str = "assistant",
    skip_bad_records: bool = False,
    seed: int = 1337,
) -> ConversationSet:
    """Read, de-duplicate, split and encode conversation records into the set directory ``out_dir``.

    ``tokenizer`` (a tokenizer or its path) gets chat tokens where it has no template (:func:`with_chat_tokens`);
    the set holds that tokenizer. ``out_dir`` may hold an earlier conversation set (replaced) and nothing else."""
    if not inputs:
        raise OpenLLMError("no conversation files given")
    if not 0.0 < validation_fraction < 1.0:
        raise OpenLLMError(f"the validation fraction must be between 0 and 1, got {validation_fraction}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise OpenLLMError(f"max_tokens must be an integer of at least 2, got {max_tokens!r}")
    if overflow not in OVERFLOW:
        raise OpenLLMError(f"unknown overflow {overflow!r}; use one of {', '.join(OVERFLOW)}")
    if train_on not in TRAIN_ON:
        raise OpenLLMError(f"unknown train_on {train_on!r}; use one of {', '.join(TRAIN_ON)}")
    files = expand_inputs(list(inputs))
    val_given = [validation_data] if isinstance(validation_data, (str, os.PathLike)) else validation_data
    val_files = expand_inputs(list(val_given)) if val_given else []
    tok = with_chat_tokens(tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer))
    dtype = token_dtype(tok.vocab_size)
    out = OutputDir(
        Path(out_dir), "conversation preparation", FILES, reads=(*files, *val_files), force=True, mark=MANIFEST
    )
    out.check()
    key_threshold = int(validation_fraction * 2**64)
    counts = _Counts()
    reader = ConversationReader(skip_bad_records)
    with out.replacing("conversation set directory") as staging:
        train, val = _SplitWriter(staging, "train", dtype), _SplitWriter(staging, "val", dtype)
        val_hashes: set[bytes] = set()
        for rec in reader.records(val_files):
            h = conversation_hash(rec.messages, seed)
            if h not in val_hashes and (got := _fit(tok, rec, max_tokens, overflow, train_on, counts)) is not None:
                val_hashes.add(h)
                val.add(*got)
        if val_files and not len(val):
            raise OpenLLMError(f"the validation data ({', '.join(map(str, val_files))}) holds no usable conversation")
        seen: set[bytes] = set()
        lowest: tuple[int, int] | None = None  # (hash value, train index): what a too-small split holds out
        for rec in reader.records(files):
            counts.records_read += 1
            h = conversation_hash(rec.messages, seed)
            if h in seen:
                counts.duplicates_dropped += 1
                continue
            seen.add(h)
            if h in val_hashes:
                counts.validation_overlap_dropped += 1
                continue
            value = int.from_bytes(h[:8], "little")
            if (got := _fit(tok, rec, max_tokens, overflow, train_on, counts)) is None:
                continue
            if not val_files and value < key_threshold:
                val.add(*got)
                continue
            if lowest is None or value < lowest[0]:
                lowest = (value, len(train))
            train.add(*got)
        if not val_files and not len(val) and len(train) >= 2 and lowest is not None:
            ids, mask = train.read(lowest[1])  # a set too small for its fraction: hold out the lowest hash
            train.drop(lowest[1])
            val.add(ids.tolist(), mask.astype(bool).tolist())
            train.loss_tokens -= int(mask.sum())
        if not len(train) or not len(val):
            raise OpenLLMError(
                f"the conversations give {len(train)} training and {len(val)} validation conversation(s) "
                f"({len(seen)} unique, {counts.dropped_too_long} too long); at least one of each is needed"
            )
        train.finish()
        val.finish()
        tok.save(staging / TOKENIZER_DIR, model_max_length=max_tokens)
        digest = hashlib.sha256()
        for name in FILES[2:]:
            with open(staging / name, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        manifest = {
            "format": FORMAT,
            "records_read": counts.records_read,
            "unique_conversations": len(seen),
            "duplicates_dropped": counts.duplicates_dropped,
            "validation_overlap_dropped": counts.validation_overlap_dropped,
            "bad_records_skipped": dict(reader.stats.skipped),
            "truncated": counts.truncated,
            "dropped_too_long": counts.dropped_too_long,
            "train_conversations": len(train),
            "val_conversations": len(val),
            "train_tokens": train.offsets[-1],
            "val_tokens": val.offsets[-1],
            "train_loss_tokens": train.loss_tokens,
            "val_loss_tokens": val.loss_tokens,
            "max_tokens": max_tokens,
            "overflow": overflow,
            "train_on": train_on,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "tokenizer_sha256": tok.sha256,
            "tokenizer": tok.describe(),
            "split": "validation data" if val_files else f"hash: {SPLIT_RULE} ({validation_fraction:g})",
            "split_seed": seed,
            "validation_fraction": None if val_files else validation_fraction,
            "inputs": [{"path": str(p), "sha256": sha256_file(p)} for p in files],
            "validation_data": [{"path": str(p), "sha256": sha256_file(p)} for p in val_files],
            "fingerprint": digest.hexdigest(),
        }
        atomic_write_json(staging / MANIFEST, manifest)
    return load_conversations(out_dir)


class ConversationSplit:
    """One split: ``len()`` conversations, ``split[i]`` is (ids int64, mask bool), read from memory-mapped files."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, tokens: int, count: int):
        self.offsets = _mapped(directory / f"{split}.offsets", np.dtype(np.int64), count + 1)
        self.ids = _mapped(directory / f"{split}.ids", dtype, tokens)
        self.mask = _mapped(directory / f"{split}.mask", np.dtype(np.uint8), tokens)
        if self.offsets[0] != 0 or self.offsets[-1] != tokens or np.any(np.diff(self.offsets) <= 0):
            raise OpenLLMError(f"{directory / f'{split}.offsets'} is damaged; prepare the conversations again")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b].astype(np.int64), self.mask[a:b].astype(bool)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _mapped(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if not path.is_file() or path.stat().st_size != count * dtype.itemsize:
        raise OpenLLMError(
            f"{path} is missing or has the wrong size (expected {count * dtype.itemsize} bytes); prepare the "
            "conversations again"
        )
    return np.memmap(path, dtype=dtype, mode="r") if count else np.zeros(0, dtype)


@dataclass
class ConversationSet:
    """An encoded conversation set directory (see the module's description)."""

    path: Path
    stats: dict
    train: ConversationSplit
    val: ConversationSplit

    @property
    def fingerprint(self) -> str:
        return self.stats["fingerprint"]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path / TOKENIZER_DIR)


def load_conversations(path: str | os.PathLike) -> ConversationSet:
    """Open a conversation set directory, checking that it is complete and that its tokenizer is the one it was
    encoded with."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise OpenLLMError(f"{path} is not a conversation set (no {MANIFEST})")
    stats = read_json(manifest, "conversation set manifest")
    if not isinstance(stats, dict) or stats.get("format") != FORMAT:
        raise OpenLLMError(f"{manifest}: not a conversation set of format {FORMAT}")
    try:
        dtype = np.dtype(stats["dtype"])
        splits = [
            ConversationSplit(path, s, dtype, int(stats[f"{s}_tokens"]), int(stats[f"{s}_conversations"]))
            for s in SPLITS
        ]
        want = stats["tokenizer_sha256"]
    except (KeyError, TypeError, ValueError) as exc:
        raise OpenLLMError(f"{manifest} is damaged ({exc}); prepare the conversations again") from None
    got = load_tokenizer(path / TOKENIZER_DIR).sha256
    if got != want:
        raise OpenLLMError(
            f"the tokenizer in {path / TOKENIZER_DIR} is not the one the conversations were encoded with"
        )
    return ConversationSet(path, stats, *splits)
