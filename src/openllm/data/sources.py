"""Input files as a stream of documents, never read whole.

Inputs are files, directories (every file below, recursively, in sorted order, hidden ones left
out) and glob patterns, mixed. The format follows the name, after an optional compression suffix
(``.gz``, ``.zst``, ``.xz``, ``.bz2``):

``.jsonl`` / ``.json``   JSON lines: each line an object whose ``text_field`` is one document
``.parquet``             Parquet: the ``text_field`` column, read in record batches with pyarrow
anything else            UTF-8 text, split into documents by :mod:`openllm.data.corpus`'s rules

A bad record (not JSON, no such field, not a string, or past the bounds of :mod:`openllm.core.untrusted`:
nested too deeply, a huge integer, a lone surrogate) or a corrupt stream is one error naming the file and
the line or record; with ``skip_bad_records`` bad records are counted instead.

No document is read whole whatever its size: text is read in pieces of at most ``max_document_bytes``,
and a text document (paragraph or line) longer than that is cut into documents of at most that size
(counted in ``SourceStats.documents_cut``); a JSON line or Parquet value longer than that is a bad record
("too long"), the rest of such a JSON line skipped in bounded reads.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import hashlib
import io
import itertools
import lzma
import os
import shutil
import tempfile
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from openllm.core.errors import OpenLLMError
from openllm.core.untrusted import BadDocument, parse_json
from openllm.data.corpus import normalize_document

COMPRESSION = (".gz", ".zst", ".xz", ".bz2")
JSON_LINES = (".jsonl", ".json")
PARQUET = (".parquet",)
MAX_DOCUMENT_MB = 8.0  # the default bound on one document (encoding one takes up to about 50 times its size)


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """The files that ``inputs`` name, in the order given (a directory's and a pattern's files sorted)."""
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
            )
            if not found:
                raise OpenLLMError(f"input directory {path} holds no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise OpenLLMError(f"no files match the input pattern {text}")
            files.extend(found)
        elif path.exists():
            raise OpenLLMError(f"input is not a file: {path}")
        else:
            raise OpenLLMError(f"input file not found: {path}")
    return files


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def kind_of(path: Path) -> tuple[str, str | None]:
    """(format, compression) of a file from its name."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSION else None
    last = suffixes[-1] if suffixes else ""
    return ("jsonl" if last in JSON_LINES else "parquet" if last in PARQUET else "text"), compression


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _open_binary(path: Path, compression: str | None, raw: IO[bytes]) -> IO[bytes]:
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if compression == ".bz2":
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    if compression == ".xz":
        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    if compression == ".zst":
        return io.BufferedReader(_ZstdFrames(raw), 1 << 20)  # type: ignore[return-value]
    return raw


@dataclass
class SourceStats:
    """What reading the inputs found (bad records by kind when they are skipped)."""

    files: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    documents_cut: int = 0  # text documents longer than the bound, cut into pieces of at most its size


class Reader:
    """Documents of many files, one at a time; ``bytes_read`` follows the (compressed) bytes consumed."""

    def __init__(
        self,
        doc_mode: str = "paragraph",
        text_field: str = "text",
        skip_bad_records: bool = False,
        max_document_bytes: int = int(MAX_DOCUMENT_MB * 1e6),
        pool: Executor | None = None,
        workers: int = 1,
    ):
        self.doc_mode, self.text_field, self.skip_bad = doc_mode, text_field, skip_bad_records
        self.limit = max_document_bytes
        self.stats = SourceStats()
        self.bytes_read = 0
        self._file_done = 0
        # worker processes that parse large plain text files a piece at a time (:meth:`_text_in_pieces`)
        self.pool, self.workers = pool, workers

    def documents(self, files: list[Path]) -> Iterator[str]:
        for path in files:
            yield from self.file_documents(path)

    def file_documents(self, path: Path) -> Iterator[str]:
        fmt, compression = kind_of(path)
        count = 0
        pieces = text_pieces(path, PIECE_BYTES) if self.pool is not None and parsed_in_pieces(path) else None
        if pieces is not None:
            for doc in self._text_in_pieces(path, pieces):
                count += 1
                yield doc
            self._file_finished(path, fmt, count)
            return
        with self._open(path, compression) as stream:
            docs = (
                self._parquet(path, compression, stream)
                if fmt == "parquet"
                else self._json_lines(path, stream)
                if fmt == "jsonl"
                else self._text(path, stream)
            )
            try:
                for doc in docs:
                    count += 1
                    yield doc
            except (EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
                raise OpenLLMError(
                    f"{path}: corrupt or truncated {compression or ''} stream ({type(exc).__name__}: {exc})".replace(
                        "  ", " "
                    )
                ) from None
            except _zstd_error() as exc:
                raise OpenLLMError(f"{path}: corrupt or truncated .zst stream ({exc})") from None
        self._file_finished(path, fmt, count)

    def _file_finished(self, path: Path, fmt: str, count: int) -> None:
        size = path.stat().st_size
        self.stats.files.append({"path": str(path), "bytes": size, "format": fmt, "documents": count})
        self._file_done += size
        self.bytes_read = self._file_done
        if count == 0:
            raise OpenLLMError(f"{path} holds no text (empty or whitespace only)")

    @contextmanager
    def _open(self, path: Path, compression: str | None):
        try:
            raw = open(path, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise OpenLLMError(f"cannot read {path}: {exc.strerror}") from None
        counted = _Counting(raw, self)
        try:
            yield _open_binary(path, compression, io.BufferedReader(counted, 1 << 20))  # type: ignore[arg-type]
        finally:
            raw.close()

    def _text_in_pieces(self, path: Path, pieces: list[tuple[int, int]]) -> Iterator[str]:
        """The documents of a large plain text file, parsed by the pool a piece at a time (a piece ends after a
        blank line, where one document has ended and the next has not begun, so each piece's documents are
        those the whole file's reading gives there) and yielded in order, a bounded window of pieces ahead."""
        assert self.pool is not None
        pending: deque = deque()
        tasks = iter(pieces)
        for start, end in itertools.islice(tasks, 2 * self.workers):
            pending.append((self.pool.submit(_parse_piece, str(path), start, end, self.doc_mode, self.limit), end))
        while pending:
            future, end = pending.popleft()
            try:
                docs, cut, problem = future.result()
            except BrokenProcessPool:
                raise OpenLLMError(f"a worker reading {path} died (out of memory?); rerun with --workers 1") from None
            if problem is not None:  # the error reading the file whole gives, with its line number
                for _ in Reader(self.doc_mode, max_document_bytes=self.limit).file_documents(path):
                    pass
                raise OpenLLMError(problem)  # (not reached: the whole file's reading raised first)
            for start, nxt in itertools.islice(tasks, 1):
                pending.append((self.pool.submit(_parse_piece, str(path), start, nxt, self.doc_mode, self.limit), nxt))
            self.stats.documents_cut += cut
            self.bytes_read = self._file_done + end
            yield from docs

    def _text(self, path: Path, stream: IO[bytes], first: bool = True) -> Iterator[str]:
        """Documents of a text file, read in pieces of at most ``limit`` bytes (a piece ends where its line
        ends, or where a longer line is cut); a document that would grow past ``limit`` is cut there. ``first``:
        the stream begins the file (where a byte-order mark is dropped)."""
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="strict", newline=None)  # type: ignore[type-var]
        parts: list[str] = []  # the pieces of the document being read
        size, lines, line_start, cut = 0, 0, True, False

        def document() -> Iterator[str]:
            nonlocal parts, size
            if parts and (doc := normalize_document("".join(parts))):
                yield doc
            parts, size = [], 0

        try:
            while piece := text.readline(max(1, self.limit // 4)):  # (a character is at most 4 bytes)
                if lines == 0 and line_start and first:
                    piece = piece.lstrip("\ufeff")
                if "\x00" in piece:
                    raise OpenLLMError(
                        f"{path} contains NUL bytes (line {lines + 1}); it looks like a binary file, not text"
                    )
                blank = line_start and piece.endswith("\n") and not piece.strip()
                line_start = piece.endswith("\n")
                lines += line_start
                if blank and self.doc_mode == "paragraph":
                    yield from document()
                    cut = False
                    continue
                n = len(piece) if piece.isascii() else len(piece.encode("utf-8"))
                if parts and size + n > self.limit:
                    self.stats.documents_cut += not cut
                    cut = True
                    yield from document()
                parts.append(piece)
                size += n
                if line_start and self.doc_mode == "line":
                    yield from document()
                    cut = False
        except UnicodeDecodeError:
            raise OpenLLMError(f"{path} is not valid UTF-8 (line {lines + 1})") from None
        yield from document()

    def _bad(self, path: Path, where: str, problem: str, kind: str) -> None:
        if not self.skip_bad:
            raise OpenLLMError(f"{path} {where}: {problem} (--skip-bad-records counts and skips such records)")
        self.stats.skipped[kind] += 1

    def _record(self, path: Path, where: str, record) -> str | None:
        field_name = self.text_field
        if not isinstance(record, dict) or field_name not in record or record[field_name] is None:
            self._bad(path, where, f"no {field_name!r} field", "missing field")
            return None
        value = record[field_name]
        if not isinstance(value, str):
            self._bad(
                path, where, f"the {field_name!r} field is a {type(value).__name__}, not a string", "not a string"
            )
            return None
        if "\x00" in value:
            self._bad(path, where, "the text holds NUL characters", "NUL characters")
            return None
        return normalize_document(value.replace("\r\n", "\n").replace("\r", "\n")) or None

    def _too_long(self, path: Path, where: str) -> None:
        self._bad(path, where, f"longer than {self.limit / 1e6:g} MB (--max-document-mb)", "too long")

    def _json_lines(self, path: Path, stream: IO[bytes]) -> Iterator[str]:
        number = 0
        while line := stream.readline(self.limit + 1):
            number += 1
            if len(line) > self.limit and not line.endswith(b"\n"):  # too long: skip to its end, a piece at a time
                while (rest := stream.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                self._too_long(path, f"line {number}")
                continue
            if not line.strip():
                continue
            try:
                record = parse_json(line)
            except BadDocument as exc:
                hint = "; one object per line" if exc.kind == "not JSON" else ""
                self._bad(path, f"line {number}", f"{exc}{hint}", exc.kind)
                continue
            if (doc := self._record(path, f"line {number}", record)) is not None:
                yield doc

    def _parquet(self, path: Path, compression: str | None, stream: IO[bytes]) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.compute as pc

        with open_parquet(path, compression, stream) as pf:
            names = pf.schema_arrow.names
            if self.text_field not in names:
                raise OpenLLMError(f"{path} has no column {self.text_field!r} (columns: {', '.join(names)})")
            kind = pf.schema_arrow.field(self.text_field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise OpenLLMError(f"{path}: column {self.text_field!r} holds {kind}, not strings")
            number = 0
            try:
                for batch in pf.iter_batches(batch_size=1024, columns=[self.text_field]):
                    column = batch.column(0)
                    sizes = pc.binary_length(column).to_pylist()
                    long = {i for i, n in enumerate(sizes) if n is not None and n > self.limit}
                    if long:  # (only the values within the bound become Python strings)
                        values = [None if i in long else column[i].as_py() for i in range(len(column))]
                    else:
                        values = column.to_pylist()
                    for i, value in enumerate(values):
                        number += 1
                        if i in long:
                            self._too_long(path, f"record {number}")
                            continue
                        doc = self._record(path, f"record {number}", {self.text_field: value})
                        if doc is not None:
                            yield doc
            except (pa.ArrowException, OSError) as exc:
                raise OpenLLMError(f"{path}: corrupt Parquet data near record {number + 1} ({exc})") from None


@contextlib.contextmanager
def open_parquet(path: Path, compression: str | None, stream: IO[bytes]) -> Iterator[Any]:
    """``path`` as a pyarrow ParquetFile; a compressed one is decompressed to a temporary file first (Parquet needs
    random access), removed afterwards. An unreadable file is one error naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="openllm-parquet-") as tmp:
        source: str | IO[bytes] = str(path)
        if compression:
            source = os.path.join(tmp, "input.parquet")
            with open(source, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
        try:
            pf = pq.ParquetFile(source)
        except (pa.ArrowException, OSError) as exc:
            raise OpenLLMError(f"{path} is not a readable Parquet file ({exc})") from None
        yield pf


class _ZstdFrames(io.RawIOBase):
    """Decompresses a .zst stream of one or more frames; a stream that ends inside a frame is an error
    (zstandard's stream reader would end quietly instead)."""

    def __init__(self, raw: IO[bytes]):
        import zstandard

        self.raw, self.make = raw, zstandard.ZstdDecompressor().decompressobj
        self.dobj, self.pending, self.started = self.make(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        import zstandard

        while not self.pending:
            data = self.raw.read(1 << 20)
            if not data:
                if self.started:
                    raise zstandard.ZstdError("the stream ends inside a frame (truncated)")
                return 0
            while data:
                self.started = True
                self.pending += self.dobj.decompress(data)
                data = b""
                if self.dobj.eof:  # a frame ended: what follows is the next frame
                    data, self.dobj, self.started = self.dobj.unused_data, self.make(), False
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n


# A plain text file at least this large is parsed by the encoding workers, PIECE_BYTES at a time, when prepare
# runs several (what reading costs most: the lines, their whitespace; the main process keeps the rest)
PIECES_FROM = 16 << 20
PIECE_BYTES = 4 << 20


def parsed_in_pieces(path: Path) -> bool:
    """Whether a reader with a pool parses this file in pieces: plain, uncompressed text of PIECES_FROM bytes."""
    try:
        return kind_of(path) == ("text", None) and path.stat().st_size >= PIECES_FROM
    except OSError:  # (read whole, where the error is said)
        return False


def text_pieces(path: Path, size: int) -> list[tuple[int, int]] | None:
    """(start, end) byte ranges of about ``size`` that cover the file, each ending just after an empty line
    (``\n\n``); None for a file with carriage returns (whose line ends the pieces would read otherwise than
    the whole file's reading does) or without a place to cut."""
    total = path.stat().st_size
    cuts, pos, tail = [0], 0, b""
    with open(path, "rb") as f:  # (a file that cannot be read is read whole, and its error said, as before)
        while block := f.read(1 << 22):
            if b"\r" in block:
                return None
            data, base = tail + block, pos - len(tail)
            while (target := cuts[-1] + size) < base + len(data):
                at = data.find(b"\n\n", max(0, target - base))
                if at < 0:
                    break
                cuts.append(base + at + 2)
            tail, pos = data[-1:], pos + len(block)
    cuts = [c for c in cuts if c < total] + [total]
    return list(itertools.pairwise(cuts)) if len(cuts) > 2 else None


def _parse_piece(path: str, start: int, end: int, doc_mode: str, limit: int):
    """A piece of a text file as :meth:`Reader._text` reads it: (documents, documents cut, an error or None)."""
    reader = Reader(doc_mode, max_document_bytes=limit)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        docs = list(reader._text(Path(path), io.BytesIO(data), first=start == 0))
    except OSError as exc:
        return [], 0, f"cannot read {path}: {exc.strerror}"
    except OpenLLMError as exc:
        return [], 0, str(exc)
    return docs, reader.stats.documents_cut, None


class _Counting(io.RawIOBase):
    """A raw file that reports the running count of bytes read through it (for the progress bar)."""

    def __init__(self, raw: IO[bytes], reader: Reader):
        self.raw, self.reader, self.pos = raw, reader, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self.pos += n
            self.reader.bytes_read = self.reader._file_done + self.pos
        return n or 0


def _zstd_error() -> type[Exception]:
    try:
        import zstandard

        return zstandard.ZstdError
    except ImportError:  # pragma: no cover - zstandard is a dependency
        return OpenLLMError
