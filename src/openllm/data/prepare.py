"""``openllm prepare``: stream, clean, de-duplicate, split, train or reuse a tokenizer, encode in
parallel and pack, in memory that does not grow with the corpus.

1. **Read** (one pass, :mod:`openllm.data.sources`): documents flow from the inputs one at a time.
   Each normalised document gets a 16-byte keyed BLAKE2b hash. A hash seen before is a duplicate
   and is dropped (only the hashes are kept: the set grows with the unique documents, nothing else
   does). Without ``--validation-file`` the hash also decides the split: a document is held out when
   its hash, read as a number in [0, 1), is below ``--val-fraction``, so a document and all its
   copies land on one side whatever the file order or the number of workers. Kept documents are
   spooled to a temporary file in the output directory.
2. **Tokenizer**: trained on a bounded, order-independent sample of the training documents (those
   with the smallest hashes, up to ``--tokenizer-sample-mb``), or ``--tokenizer`` is loaded.
3. **Encode** (``--workers`` processes): chunks of the spool are encoded in parallel and written in
   order, so ``train.bin``, ``val.bin`` and the fingerprint are byte-identical for any number of
   workers. Every file is written under a temporary name; ``meta.json`` comes last and marks a
   complete dataset.

A killed preparation leaves only its spool directory (``.prepare-`` and the request's key). A rerun of the
same request (the same inputs, by content, and settings) reuses it: once the read pass and the tokenizer
are complete (``read.json``), they are not redone, and each encoded chunk is recorded as it is appended
(``train.bin.done``: chunks and bytes), so encoding continues after the last one finished. The output is
byte-identical to an uninterrupted run's. A spool of any other request, or one killed before its read pass
ended, is removed.

The output directory's format is in :mod:`openllm.data.dataset`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import heapq
import inspect
import itertools
import json
import os
import resource
import shutil
import signal
import struct
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from openllm.core import faults
from openllm.core.errors import OpenLLMError
from openllm.core.fileio import (
    atomic_open,
    atomic_write_json,
    directory_lock,
    ensure_dir,
    training_run_files,
    write_failures,
)
from openllm.core.memory import available_memory, gib
from openllm.core.options import (
    Opt,
    at_most,
    checked,
    fraction,
    int_value,
    nonneg_int,
    positive_float,
    positive_int,
)
from openllm.core.progress import Progress
from openllm.core.untrusted import read_json
from openllm.data import shards
from openllm.data.corpus import DOC_MODES
from openllm.data.dataset import FORMAT, META_FILE, PreparedDataset, token_dtype
from openllm.data.filters import LANGUAGE_CHARS, QualityFilters, language_codes
from openllm.data.neardup import NearDedup, NearDuplicateIndex
from openllm.data.sources import MAX_DOCUMENT_MB, Reader, expand_inputs, parsed_in_pieces, sha256_file
from openllm.data.tokenizer import TOKENIZER_TYPES, TOKENIZER_TYPES_HELP, Tokenizer, load_tokenizer, train_tokenizer

SEPARATORS = {"paragraph": "\n\n", "line": "\n"}  # what ends a document for a tokenizer without eos
CHUNK_BYTES = 1 << 20  # text per encoding task (its token lists are the largest transient allocation)
SPOOL_PREFIX = ".prepare-"  # + the first 16 hex digits of the request's key: a rerun of it finds its work
READ_DONE = "read.json"  # in the spool: the read pass and the tokenizer are complete (what meta.json needs of them)
READ_FORMAT = "openllm-prepare-read/1"
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# Encoding processes: more than 4 per CPU only compete for the same CPUs, each with its own memory (32 are
# allowed anywhere, so that a command line written for a bigger machine still runs)
MAX_WORKERS = max(32, 4 * CPUS)
WORKERS_BOUND = f"the larger of 4 x the {CPUS} CPUs this process may use and 32"
SAMPLE_MEMORY = 6  # bytes of memory that training a tokenizer takes per byte of its sample (about 4 measured)
document_mb = checked(float, lambda v: 0.001 <= v <= 1024, "a size in MB from 0.001 to 1024")
SPLIT_RULE = "validation when the document's seeded BLAKE2b hash, as a fraction of 2**64, is below val_fraction"


def pack(tokenizer: Tokenizer, docs: Sequence[str], dtype: np.dtype, doc_mode: str = "paragraph") -> np.ndarray:
    """Encode documents as the tokenizer frames them (bos? + ids + eos), concatenated without padding."""
    return pack_counted(tokenizer, docs, dtype, doc_mode)[0]


def pack_counted(
    tokenizer: Tokenizer, docs: Sequence[str], dtype: np.dtype, doc_mode: str = "paragraph"
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pack`, and each document's number of tokens (framing included)."""
    head, tail = tokenizer.prefix(), tokenizer.document_end(SEPARATORS[doc_mode])
    encoded = tokenizer.encode_batch(list(docs))
    counts = np.fromiter((len(ids) + len(head) + len(tail) for ids in encoded), dtype=np.uint64, count=len(encoded))
    flat = itertools.chain.from_iterable(part for ids in encoded for part in (head, ids, tail))
    return np.fromiter(flat, dtype=dtype, count=int(counts.sum())), counts


class Spool:
    """Documents appended to a temporary file as UTF-8, with their byte lengths kept (8 bytes each)."""

    def __init__(self, path: Path):
        self.path = path
        self.file: Any = open(path, "wb")  # noqa: SIM115 (closed by finish; None for a loaded spool)
        self.lengths = array("Q")
        self.bytes = 0

    def add(self, doc: str) -> None:
        data = doc.encode("utf-8")
        self.file.write(data)
        self.lengths.append(len(data))
        self.bytes += len(data)

    def finish(self) -> None:
        self.file.close()

    def save_lengths(self) -> None:
        """Keep the document lengths beside the spool (for a rerun that reuses it)."""
        with atomic_open(self.path.with_suffix(".lengths")) as f:
            self.lengths.tofile(f)

    @classmethod
    def load(cls, path: Path) -> Spool:
        """A finished spool as :meth:`save_lengths` left it."""
        spool = cls.__new__(cls)
        spool.path, spool.file, spool.lengths = path, None, array("Q")
        with open(path.with_suffix(".lengths"), "rb") as f:
            spool.lengths.frombytes(f.read())
        spool.bytes = sum(spool.lengths)
        if spool.bytes != path.stat().st_size:
            raise OpenLLMError(f"{path} does not hold the documents its lengths say; rerun with --force")
        return spool

    def chunks(self, skip: int | None = None) -> list[tuple[int, list[int]]]:
        """(start byte, document lengths) of consecutive runs of about CHUNK_BYTES; document ``skip`` left out
        (as a zero-length entry that the encoder drops)."""
        out, start, pos, current = [], 0, 0, []
        for i, n in enumerate(self.lengths):
            current.append(-n if i == skip else n)
            pos += n
            if pos - start >= CHUNK_BYTES:
                out.append((start, current))
                start, current = pos, []
        if current:
            out.append((start, current))
        return out


class Sample:
    """The training documents with the smallest hashes, up to ``budget`` bytes: a bounded sample that does
    not depend on the order of the inputs (a bottom-k sketch)."""

    def __init__(self, budget: int):
        self.budget, self.bytes = budget, 0
        self.heap: list[tuple[int, int, str]] = []  # (-hash, index, document): the largest hash on top

    def offer(self, key: int, index: int, doc: str) -> None:
        if self.bytes >= self.budget and self.heap and key > -self.heap[0][0]:
            return
        heapq.heappush(self.heap, (-key, index, doc))
        self.bytes += len(doc)
        while self.bytes > self.budget and len(self.heap) > 1:
            self.bytes -= len(heapq.heappop(self.heap)[2])

    def documents(self) -> list[str]:
        return [doc for _, _, doc in sorted(self.heap, key=lambda e: e[1])]  # in corpus order


# --- encoding workers (module-level so that spawned processes can import them) ----------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, doc_mode: str, dtype: str, parent: int | None = None) -> None:
    if parent is not None:
        _die_with(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallel across processes, not threads within each
    tok = load_tokenizer(tokenizer_dir)
    if hasattr(tok, "threads"):
        tok.threads = 1
    _WORKER.update(tok=tok, doc_mode=doc_mode, dtype=np.dtype(dtype))


def _die_with(parent: int) -> None:
    """Make this encoding worker end with ``parent``, however the parent ends: a SIGKILL or SIGTERM runs none of
    its clean-up, and an orphaned worker would live on, keep the spool open and hold the parent's stdout (a
    ``| tee`` would wait for it). The kernel kills the worker when its parent dies (Linux), and a watcher thread
    checks the parent's pid (elsewhere, and should the parent have died before the first check took effect);
    the worker writes nothing of its own (its errors travel back with its results), so it lets go of the
    parent's stdout and stderr at once. Ctrl-C is for the parent, which stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="openllm-parent-watch", daemon=True).start()
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(null, fd)
    os.close(null)


def _encode_chunk(path: str, start: int, lengths: list[int]) -> tuple[bytes, bytes]:
    """A chunk's tokens, and each of its documents' token count (uint64)."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(sum(abs(n) for n in lengths))
    docs, pos = [], 0
    for n in lengths:
        if n >= 0:
            docs.append(data[pos : pos + n].decode("utf-8"))
        pos += abs(n)
    tokens, counts = pack_counted(_WORKER["tok"], docs, _WORKER["dtype"], _WORKER["doc_mode"])
    return tokens.tobytes(), counts.tobytes()


def _encode_spool(
    spool: Spool, out_file: Path, workers: int, init: tuple, digest, progress: Progress, skip=None, counts=None
) -> tuple[int, int]:
    """Encode a spool into ``out_file`` in order, after the chunks an interrupted run of the same preparation
    finished there (``out_file``.done records how many, and their bytes); returns the number of tokens and the
    number of chunks reused. With ``counts`` (a path), each document's token count goes there too (uint64)."""
    tasks = spool.chunks(skip)
    itemsize = init[2].itemsize
    done_file = out_file.with_name(out_file.name + ".done")
    reused, offset, counted = 0, 0, 0
    if done_file.is_file() and out_file.is_file():
        found = read_json(done_file, "the interrupted preparation's record")
        found = found if isinstance(found, dict) else {}
        chunks, size, n_counts = found.get("chunks"), found.get("bytes"), found.get("count_bytes", 0)
        if isinstance(chunks, int) and isinstance(size, int) and 0 <= chunks <= len(tasks):
            have = isinstance(n_counts, int) and (
                counts is None or (counts.is_file() and counts.stat().st_size >= n_counts)
            )
            if out_file.stat().st_size >= size and have:
                reused, offset, counted = chunks, size, n_counts
    f = open(out_file, "r+b" if reused else "wb")  # noqa: SIM115 (closed below)
    c = open(counts, "r+b" if reused else "wb") if counts is not None else None  # noqa: SIM115 (closed below)
    with f, c or contextlib.nullcontext():
        f.truncate(offset)
        if c is not None:
            c.truncate(counted)
            c.seek(counted)
        while reused and (block := f.read(1 << 24)):  # the reused chunks' tokens count in the fingerprint
            digest.update(block)
        progress.update(sum(sum(map(abs, lengths)) for _, lengths in tasks[:reused]))
        tokens, finished = offset // itemsize, reused

        def write(result: tuple[bytes, bytes], n_bytes: int) -> None:
            nonlocal tokens, finished
            data, doc_counts = result
            f.write(data)
            f.flush()
            if c is not None:
                c.write(doc_counts)
                c.flush()
            digest.update(data)
            tokens += len(data) // itemsize
            finished += 1
            record = {"chunks": finished, "bytes": f.tell(), **({"count_bytes": c.tell()} if c is not None else {})}
            atomic_write_json(done_file, record)
            progress.update(n_bytes)
            faults.reached("encode")

        todo = tasks[reused:]
        if workers == 1:
            _init_worker(init[0], init[1], init[2].name)
            for start, lengths in todo:
                write(_encode_chunk(str(spool.path), start, lengths), sum(abs(n) for n in lengths))
        else:
            _encode_in_pool(spool, todo, workers, init, write)
        f.flush()
        os.fsync(f.fileno())
    return tokens, reused


def _reading_pool(files: list[Path], workers: int) -> ProcessPoolExecutor | None:
    """Worker processes that parse the large plain text files among ``files`` a piece at a time while this one
    de-duplicates, splits and spools (``sources.Reader``); None when there are none or one worker."""
    if workers < 2 or not any(map(parsed_in_pieces, files)):
        return None
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # (tokenizers would warn at the fork)
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context(method), _die_with, (os.getpid(),))
    for started in [pool.submit(os.getpid) for _ in range(workers)]:  # forked now, before the progress bar's thread
        started.result()
    return pool


def _encode_in_pool(spool: Spool, tasks: list, workers: int, init: tuple, write) -> None:
    """Encode ``tasks`` in ``workers`` processes, handing each result to ``write`` in order."""
    import multiprocessing

    # fork where the OS has it: a spawned worker would re-run the caller's script, which a plain script
    # without a __main__ guard (the README's example) cannot survive. The workers use neither torch nor
    # any thread pool of the parent, only the tokenizer.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # (tokenizers would warn at the fork)
    with ProcessPoolExecutor(workers, ctx, _init_worker, (init[0], init[1], init[2].name, os.getpid())) as pool:
        pending: deque[tuple[Future, int]] = deque()
        for start, lengths in tasks:  # a bounded window of tasks in flight, results taken in order
            pending.append((pool.submit(_encode_chunk, str(spool.path), start, lengths), sum(map(abs, lengths))))
            if len(pending) >= 2 * workers:
                future, n = pending.popleft()
                write(future.result(), n)
        while pending:
            future, n = pending.popleft()
            write(future.result(), n)


def prepare_dataset(
    inputs: Annotated[
        Sequence[str | os.PathLike],
        Opt(
            "text, JSON lines (.jsonl/.json) or Parquet files, directories (recursive) or glob patterns; each "
            "file may be compressed (.gz, .zst, .xz, .bz2)",
            flag="--input",
            nargs="+",
            metavar="PATH",
        ),
    ],
    output_dir: Annotated[str | os.PathLike, Opt("dataset directory to write")],
    *,
    vocab_size: Annotated[int, Opt("tokenizer vocabulary", parse=positive_int)] = 4000,
    validation_file: Annotated[
        str | os.PathLike | None, Opt("use this file as validation text instead of a split of the inputs")
    ] = None,
    val_fraction: Annotated[float, Opt("share of unique documents held out (by hash)", parse=fraction)] = 0.1,
    tokenizer: Annotated[
        str | os.PathLike | None,
        Opt(
            "use an existing tokenizer instead of training one: a tokenizer.model, a tokenizer.json, "
            "a vocab.json (with merges.txt beside it) or a directory holding one"
        ),
    ] = None,
    tokenizer_type: Annotated[
        str,
        Opt(
            f"kind of tokenizer to train ({TOKENIZER_TYPES_HELP})",
            choices=TOKENIZER_TYPES,
        ),
    ] = "sentencepiece",
    seed: Annotated[int, Opt("seed of the train/validation split's hash", parse=int_value)] = 1337,
    doc_mode: Annotated[
        str, Opt("what a document of a text file is: a paragraph (blank-line separated) or a line", choices=DOC_MODES)
    ] = "paragraph",
    text_field: Annotated[str, Opt("the field holding the text in JSON lines and Parquet records")] = "text",
    skip_bad_records: Annotated[
        bool, Opt("count and skip JSON/Parquet records without usable text instead of stopping")
    ] = False,
    workers: Annotated[
        int | None,
        Opt(
            f"processes that encode in parallel (at most {MAX_WORKERS}: {WORKERS_BOUND})",
            parse=at_most(MAX_WORKERS, f" ({WORKERS_BOUND})"),
            default_text="the CPU count",
        ),
    ] = None,
    tokenizer_sample_mb: Annotated[
        float,
        Opt(
            "megabytes of training text the tokenizer is trained on (a hash-chosen sample; training takes several "
            "times its size in memory)",
            parse=positive_float,
        ),
    ] = 32.0,
    max_document_mb: Annotated[
        float,
        Opt(
            "longest document, in MB: a longer paragraph or line of text is cut into documents of this size, a "
            "longer JSON or Parquet record is a bad record (encoding a document takes up to 50 times its size)",
            parse=document_mb,
        ),
    ] = MAX_DOCUMENT_MB,
    min_chars: Annotated[
        int | None, Opt("quality filter: drop documents shorter than this many characters", parse=positive_int)
    ] = None,
    max_chars: Annotated[
        int | None, Opt("quality filter: drop documents longer than this many characters", parse=positive_int)
    ] = None,
    min_alpha_fraction: Annotated[
        float | None,
        Opt(
            "quality filter: drop documents whose letters are less than this share of their non-space characters",
            parse=fraction,
        ),
    ] = None,
    max_repeated_lines: Annotated[
        float | None,
        Opt(
            "quality filter: drop documents in which more than this share of the lines repeat an earlier line",
            parse=fraction,
        ),
    ] = None,
    max_repeated_ngrams: Annotated[
        float | None,
        Opt(
            "quality filter: drop documents in which more than this share of the word 5-grams repeat an earlier one",
            parse=fraction,
        ),
    ] = None,
    languages: Annotated[
        str | None,
        Opt(
            "quality filter: keep only documents in these languages (py3langid's codes, ISO 639-1 mostly, "
            "comma-separated: en or en,fr), "
            f"as py3langid detects them from their first {LANGUAGE_CHARS:,} characters (the `lang` extra)",
            metavar="CODES",
        ),
    ] = None,
    near_dedup: Annotated[
        bool, Opt("drop documents that are near-copies of one kept before (MinHash over word shingles with LSH)")
    ] = False,
    near_dedup_threshold: Annotated[
        float | None,
        Opt(
            "--near-dedup: the estimated Jaccard similarity from which a document is a near-copy",
            parse=fraction,
            default_text="0.8",
        ),
    ] = None,
    near_dedup_permutations: Annotated[
        int | None, Opt("--near-dedup: MinHash permutations (signature length)", parse=positive_int, default_text="112")
    ] = None,
    near_dedup_shingle: Annotated[
        int | None, Opt("--near-dedup: words per shingle", parse=positive_int, default_text="5")
    ] = None,
    num_shards: Annotated[
        int,
        Opt(
            "prepare one of this many parts of the inputs (split by file, by size, in order); join the parts with "
            "`openllm prepare merge`",
            parse=positive_int,
        ),
    ] = 1,
    shard_index: Annotated[
        int | None, Opt("which part this is, from 0 to --num-shards - 1 (with --num-shards)", parse=nonneg_int)
    ] = None,
    force: Annotated[bool, Opt("overwrite a different dataset in --output-dir")] = False,
) -> PreparedDataset:
    """Prepare ``inputs`` into ``output_dir`` and return the dataset.

    Nothing under ``output_dir`` changes if an error is raised, and an existing *different* dataset there
    is refused unless ``force``.
    """
    t0 = time.perf_counter()
    if not inputs:
        raise OpenLLMError("no input files given")
    if not (0.0 < val_fraction < 1.0):
        raise OpenLLMError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if doc_mode not in DOC_MODES:
        raise OpenLLMError(f"unknown document mode {doc_mode!r}; use paragraph or line")
    if tokenizer_type not in TOKENIZER_TYPES:
        raise OpenLLMError(f"unknown tokenizer type {tokenizer_type!r}; use one of {', '.join(TOKENIZER_TYPES)}")
    if not tokenizer_sample_mb > 0:
        raise OpenLLMError(f"--tokenizer-sample-mb must be positive, got {tokenizer_sample_mb}")
    workers = workers or CPUS
    if not 0 < workers <= MAX_WORKERS:
        raise OpenLLMError(f"--workers must be from 1 to {MAX_WORKERS} ({WORKERS_BOUND}), got {workers}")
    if not 0.001 <= max_document_mb <= 1024:
        raise OpenLLMError(f"--max-document-mb must be from 0.001 to 1024, got {max_document_mb}")
    filters = QualityFilters(
        min_chars, max_chars, min_alpha_fraction, max_repeated_lines, max_repeated_ngrams, languages
    )
    if languages is not None:
        if not isinstance(languages, str):
            raise OpenLLMError(f"--languages must be comma-separated codes, got {languages!r}")
        language_codes(languages)
    for name, value in filters.active().items():  # (the command line checks these; a Python caller too)
        if name == "languages":
            continue
        share = name not in ("min_chars", "max_chars")
        if isinstance(value, bool) or not (0 < value < 1 if share else isinstance(value, int) and value > 0):
            bound = "a number between 0 and 1" if share else "a positive integer"
            raise OpenLLMError(f"--{name.replace('_', '-')} must be {bound}, got {value!r}")
    tuning = {"--near-dedup-threshold": near_dedup_threshold, "--near-dedup-permutations": near_dedup_permutations,
              "--near-dedup-shingle": near_dedup_shingle}  # fmt: skip
    if not near_dedup and (given := [k for k, v in tuning.items() if v is not None]):
        raise OpenLLMError(f"{given[0]} needs --near-dedup")
    near = None
    if near_dedup:
        near = NearDedup(
            0.8 if near_dedup_threshold is None else near_dedup_threshold,
            112 if near_dedup_permutations is None else near_dedup_permutations,
            5 if near_dedup_shingle is None else near_dedup_shingle,
            seed,
        )
        for flag, ok, bound, value in (
            ("--near-dedup-threshold", 0 < near.threshold < 1, "between 0 and 1", near.threshold),
            ("--near-dedup-permutations", 2 <= near.permutations <= 1024, "from 2 to 1024", near.permutations),
            ("--near-dedup-shingle", 1 <= near.shingle <= 64, "from 1 to 64", near.shingle),
        ):
            if not ok:
                raise OpenLLMError(f"{flag} must be {bound}, got {value}")
    if min_chars is not None and max_chars is not None and min_chars > max_chars:
        raise OpenLLMError(f"--min-chars {min_chars} is above --max-chars {max_chars}: no document could pass")
    if tokenizer is not None:  # (options that shape a tokenizer to train: with one given, refused, not ignored)
        defaults = inspect.signature(prepare_dataset).parameters
        asked = {"vocab_size": vocab_size, "tokenizer_type": tokenizer_type, "tokenizer_sample_mb": tokenizer_sample_mb}
        if shaping := [f"--{n.replace('_', '-')}" for n, v in asked.items() if v != defaults[n].default]:
            raise OpenLLMError(
                f"{', '.join(shaping)} shape a tokenizer to train; with --tokenizer it is given (leave them out)"
            )
    shard = shards.check_request(num_shards, shard_index, tokenizer)
    sample_bytes = int(tokenizer_sample_mb * 1e6)
    free = available_memory()
    if tokenizer is None and free is not None and SAMPLE_MEMORY * sample_bytes > free:
        raise OpenLLMError(
            f"--tokenizer-sample-mb {tokenizer_sample_mb:g} needs about {gib(SAMPLE_MEMORY * sample_bytes)} to train "
            f"the tokenizer, more than the {gib(free)} available; give a smaller sample"
        )
    files = expand_inputs(list(inputs))
    all_files = files
    if shard is not None:
        files = shards.shard_files(files, *shard)
    val_path = Path(validation_file) if validation_file is not None else None
    if val_path is not None:
        expand_inputs([val_path])
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    settings = _settings(
        val_fraction, seed, doc_mode, text_field, skip_bad_records, val_path is not None, max_document_mb, filters, near
    )
    input_info = [_file_info(p) for p in files]
    val_info = _file_info(val_path) if val_path is not None else None
    trained = f"{tokenizer_type}:{vocab_size}"
    key = request_key(input_info, val_info, trained, tok, settings)
    part = None
    if shard is not None:  # what `prepare merge` checks and needs: the part, the whole request's settings
        part = {"index": shard[1], "count": shard[0], "all_inputs": [str(p) for p in all_files],
                "settings": settings, "trained": trained, "validation_file": val_info}  # fmt: skip
        key = request_key(input_info, val_info, trained, tok, {**settings, "shard": list(shard)})

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OpenLLMError(f"output directory {out} exists and is not a directory")
    if run := training_run_files(out):  # its tokenizer would be overwritten, with or without --force
        raise OpenLLMError(
            f"output directory {out} holds a training run ({', '.join(sorted(run))}); prepare the dataset into "
            "another --output-dir"
        )
    existing = out / META_FILE
    if existing.is_file() and not force:
        try:
            old = read_json(existing, "dataset metadata")
        except OpenLLMError:
            old = {}
        old = old if isinstance(old, dict) else {}
        if old.get("source_fingerprint") != key:
            raise OpenLLMError(
                f"{out} already holds a different dataset (meta.json differs); "
                "choose another --output-dir or pass --force"
            )
    created = not out.exists()
    try:
        with directory_lock(out, "dataset directory"):
            ensure_dir(out)
            work = out / (SPOOL_PREFIX + key[:16])
            for stale in out.glob(SPOOL_PREFIX + "*"):  # left by a killed preparation of other inputs or settings
                if stale != work or not (work / READ_DONE).is_file():  # (or killed before its read pass ended)
                    shutil.rmtree(stale, ignore_errors=True)
            work.mkdir(exist_ok=True)
            try:
                plan = _Plan(
                    files=files,
                    input_info=input_info,
                    val_path=val_path,
                    work=work,
                    tokenizer=tokenizer,
                    vocab_size=vocab_size,
                    tokenizer_type=tokenizer_type,
                    seed=seed,
                    val_fraction=val_fraction,
                    doc_mode=doc_mode,
                    text_field=text_field,
                    skip_bad_records=skip_bad_records,
                    workers=workers,
                    sample_bytes=sample_bytes,
                    max_document_bytes=int(max_document_mb * 1e6),
                    filters=filters,
                    near_dedup=near,
                    part=part,
                )
                with write_failures(out):  # a full disk in any writer (spool, workers, tokenizer), said one way
                    meta, tok = _prepare(plan, tok)
                    meta.update(validation_file=val_info, source_fingerprint=key)
                    meta["seconds"] = round(time.perf_counter() - t0, 3)
                    commit_dataset(work, out, tok, meta, shards.PART_FILES if part is not None else ())
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return PreparedDataset(out, meta)


def commit_dataset(work: Path, out: Path, tok: Tokenizer, meta: dict, extra: Sequence[str] = ()) -> None:
    """Put the dataset made in ``work`` in place in ``out`` (``extra``: more of its files, where made). The old
    meta.json goes first, so no moment pairs it with new token files; the new one last, marking it complete."""
    (out / META_FILE).unlink(missing_ok=True)
    for name in ("train.bin", "val.bin", *extra):
        if name in ("train.bin", "val.bin") or (work / name).is_file():
            os.replace(work / name, out / name)
    tok.save(out)
    atomic_write_json(out / META_FILE, meta)


@dataclass(frozen=True)
class _Plan:
    """What one preparation reads and how (the options of :func:`prepare_dataset`, resolved)."""

    files: list[Path]
    input_info: list[dict]  # each file's path, size and sha256
    val_path: Path | None
    work: Path  # the spool directory
    tokenizer: str | os.PathLike | None
    vocab_size: int
    tokenizer_type: str
    seed: int
    val_fraction: float
    doc_mode: str
    text_field: str
    skip_bad_records: bool
    workers: int
    sample_bytes: int
    max_document_bytes: int
    filters: QualityFilters
    near_dedup: NearDedup | None
    # one part of a sharded preparation (``--num-shards``): the index, count and the request's settings; its
    # near-duplicates are left for `prepare merge` (signatures kept), and so is the hold-out of a tiny corpus
    part: dict | None = None


def _prepare(plan: _Plan, tok: Tokenizer | None) -> tuple[dict, Tokenizer]:
    """Read, split and spool (pass 1) and get the tokenizer, or take them from an interrupted run of the same
    preparation; encode into ``work`` (pass 2, continuing after the chunks an interrupted run finished);
    returns meta.json's content and the tokenizer."""
    if (plan.work / READ_DONE).is_file():
        found = read_json(plan.work / READ_DONE, "the interrupted preparation's record")
        passed = found if isinstance(found, dict) and found.get("format") == READ_FORMAT else None
        if passed is not None:
            print(f"reusing the documents and tokenizer an interrupted run left in {plan.work}", file=sys.stderr)
            train, val = Spool.load(plan.work / "train.txt"), Spool.load(plan.work / "val.txt")
            return _encode_pass(plan, passed, train, val, load_tokenizer(plan.work / "tokenizer"))
    passed, train, val, tok = _read_pass(plan, tok)
    train.save_lengths()
    val.save_lengths()
    atomic_write_json(plan.work / READ_DONE, passed)  # last: the read pass and the tokenizer are complete
    return _encode_pass(plan, passed, train, val, tok)


def _read_pass(plan: _Plan, tok: Tokenizer | None) -> tuple[dict, Spool, Spool, Tokenizer]:
    """Pass 1: read, clean, de-duplicate, filter, split and spool; train the tokenizer unless given. Returns what
    meta.json needs from the pass (JSON, kept for a rerun), the two spools and the tokenizer."""
    files, val_path, work, vocab_size, tokenizer_type = (
        plan.files,
        plan.val_path,
        plan.work,
        plan.vocab_size,
        plan.tokenizer_type,
    )
    seed, val_fraction, doc_mode = plan.seed, plan.val_fraction, plan.doc_mode
    t_read = time.perf_counter()
    key = struct.pack("<q", seed)
    threshold = int(val_fraction * 2**64)
    pool = _reading_pool(files, plan.workers)
    reader = Reader(doc_mode, plan.text_field, plan.skip_bad_records, plan.max_document_bytes, pool, plan.workers)
    train, val = Spool(work / "train.txt"), Spool(work / "val.txt")
    sample = Sample(plan.sample_bytes if tok is None else 0)  # (nothing to sample when the tokenizer is given)
    seen: set[bytes] = set()
    val_hashes: set[bytes] = set()
    read = duplicates = overlap = 0
    filtered = dict.fromkeys(plan.filters.active(), 0)  # documents each quality filter dropped
    near = NearDuplicateIndex(work / "near-dedup.sqlite", plan.near_dedup) if plan.near_dedup else None
    near_dropped = 0
    index = shards.PartIndex(work, near) if plan.part is not None else None  # (a part: each kept document)
    lowest: tuple[int, int, str] | None = None  # the training document a too-small split would hold out
    filters = plan.filters if plan.filters else None  # (asked once: whether any is on)
    total = sum(p.stat().st_size for p in files) + (val_path.stat().st_size if val_path else 0)
    try:
        with Progress(total, "reading", "B") as progress:
            done = 0

            def advance() -> None:
                nonlocal done
                progress.update(reader.bytes_read - done)
                done = reader.bytes_read

            if val_path is not None:
                for doc in reader.file_documents(val_path):
                    h = hashlib.blake2b(doc.encode("utf-8"), digest_size=16, key=key).digest()
                    if h not in val_hashes:
                        val_hashes.add(h)
                        val.add(doc)
                        if index is not None:
                            index.add(h, doc, 1)
                        elif near is not None:  # a training near-copy of validation text is dropped too
                            near.is_near_duplicate(doc)
                advance()
            for doc in reader.documents(files):
                read += 1
                h = hashlib.blake2b(doc.encode("utf-8"), digest_size=16, key=key).digest()
                if h in seen:
                    duplicates += 1
                    continue
                seen.add(h)
                if filters is not None and (failed := filters.check(doc)) is not None:
                    filtered[failed] += 1
                    if index is not None:  # (a copy in a later part is a duplicate, as on one machine)
                        index.add(h, doc, shards.FILTERED + list(filtered).index(failed))
                    continue
                if val_path is not None and h in val_hashes:
                    overlap += 1
                    if index is not None:
                        index.add(h, doc, shards.OVERLAP)
                    continue
                if index is None and near is not None and near.is_near_duplicate(doc):
                    near_dropped += 1
                    continue
                value = int.from_bytes(h[:8], "little")
                if val_path is None and value < threshold:
                    val.add(doc)
                    if index is not None:
                        index.add(h, doc, 1)
                    continue
                if index is not None:
                    index.add(h, doc, 0)
                if lowest is None or value < lowest[0]:
                    lowest = (value, len(train.lengths), doc)
                if tok is None:
                    sample.offer(int.from_bytes(h[8:], "little"), len(train.lengths), doc)
                train.add(doc)
                if read % 1024 == 0:
                    advance()
            advance()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if near is not None:
        near.close()
    if index is not None:
        index.close()
    unique = len(seen)
    if index is None:  # (a part: the merge checks what is kept, holds out and checks the split over every part)
        check_kept(unique, filtered, plan.filters.active(), near_dropped, overlap, val_path is not None)
    else:
        lowest = None
    if val_path is None and unique < 2 and index is None:
        raise OpenLLMError(
            f"the corpus has {unique} unique document(s); at least 2 are needed to hold out validation text "
            "(or give a validation file)"
        )
    skip = None
    if val_path is None and not val.lengths and len(train.lengths) >= 2 and lowest is not None:
        skip = lowest[1]  # a corpus too small for its fraction: hold out the document with the lowest hash
        val.add(lowest[2])
    train.finish()
    val.finish()
    n_train = len(train.lengths) - (skip is not None)
    if n_train == 0 and index is None:
        raise no_training_documents(unique, val_path is not None and overlap > 0)
    if val_path is None and not val.lengths and index is None:
        raise OpenLLMError(f"no document fell into the validation split (--val-fraction {val_fraction})")
    read_seconds = time.perf_counter() - t_read

    t_tok = time.perf_counter()
    if tok is None:
        docs = sample.documents()
        if skip is not None:
            docs = [d for d in docs if d != lowest[2]] or docs  # type: ignore[index]
        tok = train_tokenizer(docs, vocab_size, tokenizer_type)
    tok_seconds = time.perf_counter() - t_tok
    tok.save(work / "tokenizer")
    skipped_bytes = len(lowest[2].encode("utf-8")) if skip is not None and lowest else 0
    passed = {
        "format": READ_FORMAT,
        "documents_read": read,
        "duplicates_dropped": duplicates,
        "unique_documents": unique,
        "filtered_documents": filtered,
        "near_duplicates_dropped": near_dropped,
        "train_documents": n_train,
        "val_documents": len(val.lengths),
        "validation_overlap_dropped": overlap,
        "bad_records_skipped": dict(reader.stats.skipped),
        "documents_cut": reader.stats.documents_cut,
        "found": [{"format": f["format"], "documents": f["documents"]} for f in reader.stats.files[-len(files) :]],
        "skip": skip,
        "skipped_bytes": skipped_bytes,
        "sample_bytes": sample.bytes,
        "read_seconds": read_seconds,
        "tokenizer_seconds": tok_seconds,
    }
    return passed, train, val, tok


def check_kept(
    unique: int, filtered: dict[str, int], limits: dict, near_dropped: int, overlap: int, val_file: bool
) -> None:
    """Refuse filters that left too few documents to train and validate on (one machine's and a merge's rule)."""
    needed = 1 if val_file else 2
    removed = sum(filtered.values()) + near_dropped
    if removed and (kept := unique - removed - overlap) < needed:
        parts = [f"--{k.replace('_', '-')} {limits[k]:g}: {n:,}" for k, n in filtered.items()]
        parts += [f"--near-dedup: {near_dropped:,}"] if near_dropped else []
        raise OpenLLMError(
            f"the quality filters left {kept} of {unique:,} unique document(s) ({', '.join(parts)} dropped); at "
            f"least {needed} are needed: loosen or leave out a filter"
        )


def no_training_documents(unique: int, all_in_validation_file: bool) -> OpenLLMError:
    return OpenLLMError(
        "every training document also appears in the validation file"
        if all_in_validation_file
        else f"the corpus has {unique} unique document(s); at least 2 are needed to hold out validation text "
        "(or give a validation file)"
    )


def _encode_pass(plan: _Plan, passed: dict, train: Spool, val: Spool, tok: Tokenizer) -> tuple[dict, Tokenizer]:
    """Pass 2: encode the spools into ``work``; meta.json's content."""
    work, workers, doc_mode, skip = plan.work, plan.workers, plan.doc_mode, passed["skip"]
    dtype = token_dtype(tok.vocab_size)

    t_enc = time.perf_counter()
    digest = hashlib.sha256()
    init = (str(work / "tokenizer"), doc_mode, dtype)
    with Progress(train.bytes + val.bytes, "encoding", "B") as progress:
        counts = (work / "train.counts", work / "val.counts") if plan.part is not None else (None, None)
        train_tokens, reused = _encode_spool(
            train, work / "train.bin", workers, init, digest, progress, skip, counts=counts[0]
        )
        digest.update(b"|")
        val_tokens, reused_val = _encode_spool(val, work / "val.bin", workers, init, digest, progress, counts=counts[1])
    if plan.part is not None:
        shards.finish_part_index(work)
    encode_seconds = time.perf_counter() - t_enc
    found, tokenizer = passed["found"], plan.tokenizer
    return (
        {
            "format": FORMAT,
            "documents_read": passed["documents_read"],
            "duplicates_dropped": passed["duplicates_dropped"],
            "unique_documents": passed["unique_documents"],
            "quality_filters": plan.filters.active(),  # the filters asked for, and what each dropped
            "filtered_documents": passed["filtered_documents"],
            "near_dedup": plan.near_dedup.describe() if plan.near_dedup else None,
            "near_duplicates_dropped": passed["near_duplicates_dropped"],
            "train_documents": passed["train_documents"],
            "val_documents": passed["val_documents"],
            "validation_overlap_dropped": passed["validation_overlap_dropped"],
            "bad_records_skipped": passed["bad_records_skipped"],
            "documents_cut": passed["documents_cut"],  # text documents longer than max_document_bytes
            "max_document_bytes": plan.max_document_bytes,
            "inputs": [  # each input as recorded before reading, with what reading found in it
                {**info, **seen} for info, seen in zip(plan.input_info, found, strict=True)
            ],
            "train_tokens": train_tokens,
            "val_tokens": val_tokens,
            "train_text_bytes": train.bytes - passed["skipped_bytes"],
            "val_text_bytes": val.bytes,
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "tokenizer_sha256": tok.sha256,
            "tokenizer": tok.describe(),
            "tokenizer_source": str(tokenizer)
            if tokenizer is not None
            else f"trained on a hash-chosen sample of {passed['sample_bytes']:,} bytes of the training documents",
            "split": "validation file" if plan.val_path else f"hash: {SPLIT_RULE} ({plan.val_fraction:g})",
            "split_seed": plan.seed,
            "val_fraction": None if plan.val_path else plan.val_fraction,
            "doc_mode": doc_mode,
            "text_field": plan.text_field,
            "fingerprint": digest.hexdigest(),
            **({"part": plan.part} if plan.part is not None else {}),
            "timing": {
                "read_seconds": round(passed["read_seconds"], 3),
                "tokenizer_seconds": round(passed["tokenizer_seconds"], 3),
                "encode_seconds": round(encode_seconds, 3),
                "chunks_reused": reused + reused_val,  # encoded by an interrupted run of this preparation
                "workers": workers,
                "peak_rss_mb": peak_rss_mb(),
            },
        },
        tok,
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of the largest finished child, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def _settings(
    val_fraction,
    seed,
    doc_mode,
    text_field,
    skip_bad_records,
    has_val_file,
    max_document_mb=MAX_DOCUMENT_MB,
    filters: QualityFilters | None = None,
    near: NearDedup | None = None,
) -> dict:
    s: dict[str, Any] = {"val_fraction": None if has_val_file else val_fraction, "seed": seed, "doc_mode": doc_mode}
    if text_field != "text":  # (added only when set, so earlier datasets keep their key)
        s["text_field"] = text_field
    if skip_bad_records:
        s["skip_bad_records"] = True
    if max_document_mb != MAX_DOCUMENT_MB:
        s["max_document_mb"] = max_document_mb
    if filters:
        s["quality_filters"] = filters.active()
    if near is not None:
        s["near_dedup"] = near.describe()
    return s


def _file_info(path: Path) -> dict:
    if not path.is_file():
        raise OpenLLMError(f"input file not found: {path}")
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def request_key(input_info, val_info, trained: str, tok, settings: dict) -> str:
    """Identity of a preparation request: input contents and every setting that shapes the output
    (``trained`` is "TYPE:VOCAB_SIZE", what would be trained when no tokenizer ``tok`` is given)."""
    source = {
        "inputs": [i["sha256"] for i in input_info],
        "validation": val_info and val_info["sha256"],
        **settings,
        # (a SentencePiece request keeps the key earlier versions wrote, so their runs still resume)
        "tokenizer": tok.sha256 if tok is not None else "train:" + trained.removeprefix("sentencepiece:"),
    }
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def prepared_request_key(
    inputs, validation_file, vocab_size, tokenizer, val_fraction, seed, doc_mode, tokenizer_type="sentencepiece"
) -> str:
    """The ``source_fingerprint`` that :func:`prepare_dataset` would record, without preparing."""
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    val_info = _file_info(Path(validation_file)) if validation_file is not None else None
    settings = _settings(val_fraction, seed, doc_mode, "text", False, validation_file is not None)
    files = expand_inputs(list(inputs))
    return request_key([_file_info(p) for p in files], val_info, f"{tokenizer_type}:{vocab_size}", tok, settings)
