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
