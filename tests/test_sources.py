"""Input files as streams of documents: every format and compression, directories and globs, and
bad records named by file and line."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from openllm.core.errors import OpenLLMError
from openllm.data.sources import Reader, expand_inputs

DOCS = ["First  document\nwith two lines", "Second\tdocument — ünïcødé 漢字 🙂", "Third one"]
NORMALISED = ["First document\nwith two lines", "Second document — ünïcødé 漢字 🙂", "Third one"]
COMPRESS = {
    "": lambda b: b,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
}


def encoded(fmt: str) -> bytes:
    if fmt == ".txt":
        return ("\r\n\r\n".join(DOCS) + "\n").encode()
    if fmt == ".jsonl":
        return "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)).encode()
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": list(range(3)), "text": DOCS}), sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("compression", list(COMPRESS))
@pytest.mark.parametrize("fmt", [".txt", ".jsonl", ".parquet"])
def test_every_format_and_compression_gives_the_same_documents(tmp_path, fmt, compression):
    path = tmp_path / f"corpus{fmt}{compression}"
    path.write_bytes(COMPRESS[compression](encoded(fmt)))
    reader = Reader()
    assert list(reader.documents([path])) == NORMALISED
    assert reader.stats.files[0]["documents"] == 3 and reader.bytes_read == path.stat().st_size


def test_directories_and_globs_expand_in_sorted_order(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.txt", "d/a.jsonl", "d/sub/c.txt", "d/.hidden.txt", "x1.txt", "x2.txt"):
        (tmp_path / name).write_text("text\n")
    files = expand_inputs([tmp_path / "d", str(tmp_path / "x*.txt"), tmp_path / "x1.txt"])
    names = [str(p.relative_to(tmp_path)) for p in files]
    assert names == ["d/a.jsonl", "d/b.txt", "d/sub/c.txt", "x1.txt", "x2.txt", "x1.txt"]
    with pytest.raises(OpenLLMError, match="no files match the input pattern"):
        expand_inputs([str(tmp_path / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(OpenLLMError, match="holds no files"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(OpenLLMError, match="input file not found"):
        expand_inputs([tmp_path / "missing.txt"])


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"title": "no text"}'], r"line 2: no 'text' field"),
        (['{"text": 42}'], r"line 1: the 'text' field is a int, not a string"),
        (['{"text": "ok"}', "", "{not json"], r"line 3: not valid JSON"),
        (['["a list"]'], r"line 1: no 'text' field"),
    ],
)
def test_bad_json_records_are_named_or_counted(tmp_path, lines, message):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(OpenLLMError, match=f"records.jsonl {message}"):
        list(Reader().documents([path]))
    lenient = Reader(skip_bad_records=True)
    good = list(lenient.documents([path])) if any('"ok"' in x for x in lines) else None
    if good is not None:
        assert good == ["ok"] and sum(lenient.stats.skipped.values()) == 1


def test_other_text_field_and_parquet_problems(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["a b", None, "c"]}), path)
    assert list(Reader(text_field="body", skip_bad_records=True).documents([path])) == ["a b", "c"]
    with pytest.raises(OpenLLMError, match=r"t.parquet record 2: no 'body' field"):
        list(Reader(text_field="body").documents([path]))
    with pytest.raises(OpenLLMError, match=r"has no column 'text' \(columns: body\)"):
        list(Reader().documents([path]))
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(OpenLLMError, match="holds int64, not strings"):
        list(Reader().documents([path]))


@pytest.mark.parametrize("compression", [".gz", ".bz2", ".xz", ".zst"])
def test_corrupt_compressed_streams_are_one_error_naming_the_file(tmp_path, compression):
    data = COMPRESS[compression](("word " * 20000).encode())
    path = tmp_path / f"broken.txt{compression}"
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(OpenLLMError, match=rf"broken.txt{compression}: corrupt or truncated"):
        list(Reader().documents([path]))


def test_large_text_files_parsed_in_pieces_give_the_documents_of_one_reading(tmp_path, monkeypatch):
    """`prepare` with workers parses big plain text files a piece at a time in its workers: the same documents,
    cuts and errors as reading the file whole (pieces made small here, so that a small file has many)."""
    from concurrent.futures import ProcessPoolExecutor

    from openllm.data import sources
    from openllm.data.prepare import prepare_dataset
    from tests.conftest import shared_file

    monkeypatch.setattr(sources, "PIECES_FROM", 1)
    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:120_000]
    odd = (
        "\ufeffStart\n\n" + text + "\n\n\n\n   \n\nmid\ufeffbom\n\n" + ("x" * 5000 + "\n") * 3 + "\n\nübergröße 漢字\n"
    )
    path = tmp_path / "t.txt"
    path.write_text(odd, encoding="utf-8")

    def read(pool, limit, mode):
        reader = Reader(mode, max_document_bytes=limit, pool=pool, workers=2)
        return list(reader.documents([path])), reader.stats.documents_cut, reader.stats.files

    with ProcessPoolExecutor(2) as pool:
        for size in (64, 5000):
            monkeypatch.setattr(sources, "PIECE_BYTES", size)
            assert len(sources.text_pieces(path, size) or []) > 5
            for limit, mode in ((8_000_000, "paragraph"), (3000, "paragraph"), (3000, "line")):
                assert read(pool, limit, mode) == read(None, limit, mode), (size, limit, mode)
        bad = tmp_path / "bad.txt"
        bad.write_text(text + "\n\nhere\x00nul\n\n" + text[:1000], encoding="utf-8")
        line = text.count("\n") + 3
        for reader in (Reader(), Reader(pool=pool, workers=2)):  # the same error, naming the same line
            with pytest.raises(OpenLLMError, match=rf"contains NUL bytes \(line {line}\)"):
                list(reader.documents([bad]))
    crlf = tmp_path / "crlf.txt"
    crlf.write_text(text[:5000].replace("\n", "\r\n"), encoding="utf-8", newline="")
    assert sources.text_pieces(crlf, 100) is None  # (its line ends are read whole, as they always were)
    monkeypatch.setattr(sources, "PIECE_BYTES", 2000)
    one = prepare_dataset([path], tmp_path / "one", vocab_size=400, workers=1)
    two = prepare_dataset([path], tmp_path / "two", vocab_size=400, workers=2)
    assert one.meta["fingerprint"] == two.meta["fingerprint"] and one.meta["inputs"] == two.meta["inputs"]
