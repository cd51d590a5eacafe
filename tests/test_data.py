import json

import numpy as np
import pytest

from openllm.core.errors import OpenLLMError
from openllm.data.batches import BatchSampler, eval_batches
from openllm.data.corpus import split_documents
from openllm.data.dataset import load_dataset
from openllm.data.prepare import prepare_dataset
from openllm.data.tokenizer import load_tokenizer


def test_paragraph_and_line_rules():
    text = "First  doc\tline one\r\nline two  \n\n \n\nSecond doc\n\n\n\nFirst  doc\tline one\nline two\n"
    docs = split_documents(text)
    assert docs == ["First doc line one\nline two", "Second doc", "First doc line one\nline two"]
    assert split_documents("a\n b \n\nc\n", "line") == ["a", "b", "c"]


def test_squad_counts_and_no_leak(squad_path, tmp_path):
    ds = prepare_dataset([squad_path], tmp_path / "sq", vocab_size=4000)
    meta = json.loads((tmp_path / "sq" / "meta.json").read_text())
    assert meta["documents_read"] == 4121 and meta["duplicates_dropped"] == 197
    assert meta["train_documents"] + meta["val_documents"] == 3924
    assert meta["vocab_size"] == 4000 and meta["dtype"] == "uint16"
    tok = load_tokenizer(ds.path)

    # decode the packed streams back into documents: the two sides share none
    def docs(stream):
        ids = np.asarray(stream)
        bos = np.flatnonzero(ids == 2)
        eos = np.flatnonzero(ids == 3)
        return {tok.decode(ids[b + 1 : e]) for b, e in zip(bos, eos, strict=False)}

    train, val = docs(ds.train), docs(ds.val)
    assert len(train) == meta["train_documents"] and len(val) == meta["val_documents"]
    assert not train & val
    assert ds.train.size == meta["train_tokens"]


def test_explicit_validation_file_removes_overlap_from_training(small_corpus, tmp_path):
    paras = small_corpus.read_text().split("\n\n")
    val = tmp_path / "val.txt"
    val.write_text("\n\n".join(paras[:5]))
    ds = prepare_dataset([small_corpus], tmp_path / "d", vocab_size=400, validation_file=val)
    assert ds.meta["val_documents"] == 5
    assert ds.meta["validation_overlap_dropped"] == 5


def test_existing_tokenizer_is_reused(small_dataset, small_corpus, tmp_path):
    ds = prepare_dataset([small_corpus], tmp_path / "again", tokenizer=small_dataset.path)
    assert ds.meta["tokenizer_sha256"] == small_dataset.meta["tokenizer_sha256"]
    assert ds.fingerprint == small_dataset.fingerprint


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "no text"),
        (b"  \n\t\n \n", "no text"),
        (b"caf\xe9 au lait\n", "not valid UTF-8"),
        (b"abc\x00\x01\x02", "binary"),
    ],
)
def test_bad_corpora_are_refused_and_write_nothing(tmp_path, content, match):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(OpenLLMError, match=match):
        prepare_dataset([bad], tmp_path / "out", vocab_size=400)
    assert not (tmp_path / "out").exists()


def test_different_dataset_in_output_dir_is_refused_and_kept(small_corpus, tmp_path):
    out = tmp_path / "ds"
    first = prepare_dataset([small_corpus], out, vocab_size=400)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OpenLLMError, match="different dataset"):
        prepare_dataset([small_corpus], out, vocab_size=420)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    again = prepare_dataset([small_corpus], out, vocab_size=400)  # the same dataset: fine
    assert again.fingerprint == first.fingerprint


def test_load_dataset_detects_incomplete(small_dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_dataset.path, copy)
    with open(copy / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(OpenLLMError, match="wrong size"):
        load_dataset(copy)
    with pytest.raises(OpenLLMError, match="not a prepared dataset"):
        load_dataset(tmp_path)


def test_batch_sampler_is_a_pure_function_of_the_sample_index():
    tokens = np.arange(1000, dtype=np.uint16)
    a = BatchSampler(tokens, seq_len=16, seed=3)
    b = BatchSampler(tokens, seq_len=16, seed=3)
    x1, y1 = a.batch(200, 8)  # crosses into the fourth epoch (61 windows each)
    b.batch(0, 8)
    x2, y2 = b.batch(200, 8)
    assert x1.dtype.is_floating_point is False and x1.shape == (8, 16)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert np.array_equal(y1[:, :-1], x1[:, 1:])  # targets are inputs shifted by one
    # one epoch visits every window exactly once
    firsts = sorted(int(a.batch(k, 1)[0][0, 0]) for k in range(a.windows_per_epoch))
    assert firsts == [16 * i for i in range(a.windows_per_epoch)]


def test_eval_batches_cover_the_whole_small_stream():
    tokens = np.arange(100, dtype=np.uint16)
    batches = list(eval_batches(tokens, seq_len=16, batch_size=4, max_batches=None))
    covered = sum(y.numel() for _, y in batches)
    assert covered == 99
    limited = list(eval_batches(tokens, seq_len=16, batch_size=2, max_batches=1))
    assert len(limited) == 1 and limited[0][0].shape == (2, 16)
