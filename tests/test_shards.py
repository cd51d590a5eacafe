"""Preparation across machines: `prepare --num-shards N --shard-index K` and `prepare merge` equal one machine."""

from __future__ import annotations

import json
import random

import pytest

from openllm.core.errors import OpenLLMError
from openllm.data.merge import merge_parts
from openllm.data.prepare import prepare_dataset
from openllm.data.shards import shard_files
from tests.conftest import cli

SAME_META = ("documents_read", "duplicates_dropped", "unique_documents", "filtered_documents",
             "near_duplicates_dropped", "train_documents", "val_documents", "validation_overlap_dropped",
             "train_tokens", "val_tokens", "train_text_bytes", "val_text_bytes", "inputs", "fingerprint",
             "source_fingerprint", "split", "tokenizer_sha256")  # fmt: skip


@pytest.fixture(scope="module")
def inputs(small_corpus, tmp_path_factory):
    """Five files of Shakespeare with exact and near copies planted across files, and a tokenizer."""
    root = tmp_path_factory.mktemp("shards")
    paras = [p for p in small_corpus.read_text().split("\n\n") if p.strip()]
    rng = random.Random(0)
    files = [paras[i::5] for i in range(5)]
    for _ in range(30):
        src = rng.choice(paras)
        files[rng.randrange(5)].insert(0, src)  # an exact copy, maybe in an earlier file than the original
        words = src.split()
        if len(words) > 12:
            words[rng.randrange(len(words))] = "changed"
            files[rng.randrange(5)].append(" ".join(words))  # a near copy
    (root / "in").mkdir()
    for i, docs in enumerate(files):
        (root / "in" / f"{i}.txt").write_text("\n\n".join(docs) + "\n")
    tok = prepare_dataset([root / "in" / "0.txt"], root / "tok", vocab_size=400).path
    return root / "in", tok


def one_and_merged(inputs, out, parts: int, **options):
    folder, tok = inputs
    one = prepare_dataset([folder], out / "one", tokenizer=tok, **options)
    for k in range(parts):
        prepare_dataset([folder], out / f"p{k}", tokenizer=tok, num_shards=parts, shard_index=k, **options)
    merged = merge_parts([out / f"p{k}" for k in reversed(range(parts))], out / "merged")  # (any order)
    return one, merged


@pytest.mark.parametrize("options", [
    {"near_dedup": True, "min_chars": 40},  # near-copies and filtered documents across parts
    {"validation_file": "VAL"},  # a validation file: read once, overlaps dropped in every part
])  # fmt: skip
def test_three_parts_merged_equal_one_machine(inputs, tmp_path, small_corpus, options):
    if options.get("validation_file"):
        val = tmp_path / "val.txt"
        val.write_text("\n\n".join(small_corpus.read_text().split("\n\n")[:15]))
        options = {"validation_file": val}
    one, merged = one_and_merged(inputs, tmp_path, 3, **options)
    for name in ("train.bin", "val.bin", "tokenizer.model"):
        assert (one.path / name).read_bytes() == (merged.path / name).read_bytes(), name
    assert {k: one.meta[k] for k in SAME_META} == {k: merged.meta[k] for k in SAME_META}
    assert one.meta["duplicates_dropped"] >= 30  # what was planted, found across parts
    if options.get("near_dedup"):
        assert one.meta["near_duplicates_dropped"] > 0 and one.meta["filtered_documents"]["min_chars"] > 0
    else:
        assert one.meta["validation_overlap_dropped"] > 0


def test_a_tiny_corpus_holds_out_across_parts_as_one_machine_does(inputs, tmp_path):
    folder, tok = inputs
    for i in range(3):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.txt").write_text(f"document {i} one.\n\ndocument {i} two, a little longer.\n")
    one, merged = one_and_merged((tmp_path / "in", tok), tmp_path, 3, val_fraction=0.001)
    assert one.meta["val_documents"] == 1  # (none fell into the split: the lowest hash is held out)
    assert (one.path / "val.bin").read_bytes() == (merged.path / "val.bin").read_bytes()
    assert (one.path / "train.bin").read_bytes() == (merged.path / "train.bin").read_bytes()


def test_parts_are_consecutive_cover_every_file_and_none_is_empty(tmp_path):
    files = []
    for i, n in enumerate([10, 10, 10, 500, 5, 5, 5, 5]):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text("x" * n)
    for count in (2, 3, 5, 8):
        parts = [shard_files(files, count, k) for k in range(count)]
        assert [f for p in parts for f in p] == files and all(parts)
    with pytest.raises(OpenLLMError, match="more than the 8 input file"):
        shard_files(files, 9, 0)


def test_sharding_and_merging_refuse_what_cannot_be_joined(inputs, tmp_path):
    folder, tok = inputs
    with pytest.raises(OpenLLMError, match="--num-shards needs --tokenizer"):
        prepare_dataset([folder], tmp_path / "x", num_shards=2, shard_index=0)
    with pytest.raises(OpenLLMError, match="needs --shard-index"):
        prepare_dataset([folder], tmp_path / "x", tokenizer=tok, num_shards=2)
    with pytest.raises(OpenLLMError, match="from 0 to 1"):
        prepare_dataset([folder], tmp_path / "x", tokenizer=tok, num_shards=2, shard_index=2)
    for k in (0, 1):
        prepare_dataset([folder], tmp_path / f"p{k}", tokenizer=tok, num_shards=2, shard_index=k)
    with pytest.raises(OpenLLMError, match=r"part\(s\) 1 of 2 missing"):
        merge_parts([tmp_path / "p0"], tmp_path / "m")
    with pytest.raises(OpenLLMError, match="given twice"):
        merge_parts([tmp_path / "p0", tmp_path / "p0", tmp_path / "p1"], tmp_path / "m")
    prepare_dataset([folder], tmp_path / "q1", tokenizer=tok, num_shards=2, shard_index=1, seed=7)
    with pytest.raises(OpenLLMError, match="another preparation"):
        merge_parts([tmp_path / "p0", tmp_path / "q1"], tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing left behind
    r = cli("prepare", "merge", str(tmp_path / "p0"), str(folder.parent / "tok"), "--output-dir", str(tmp_path / "m"))
    assert r.returncode == 2 and "is not a part of a sharded preparation" in r.stderr
    assert r.stderr.startswith("openllm prepare merge: error:") and len(r.stderr.splitlines()) == 1
    r = cli("prepare", "merge", str(tmp_path / "p1"), str(tmp_path / "p0"), "--output-dir", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["merged_from"][0].endswith("p0")


def test_options_that_shape_a_tokenizer_are_refused_when_the_tokenizer_is_given(inputs, tmp_path):
    """Never accepted and ignored: --vocab-size, --tokenizer-type and --tokenizer-sample-mb train a tokenizer."""
    from openllm.training.config import TrainConfig

    folder, tok = inputs
    for option in ({"vocab_size": 999}, {"tokenizer_type": "tiktoken-bpe"}, {"tokenizer_sample_mb": 1.0}):
        flag = "--" + next(iter(option)).replace("_", "-")
        with pytest.raises(OpenLLMError, match=f"{flag} shape a tokenizer to train; with --tokenizer it is given"):
            prepare_dataset([folder], tmp_path / "x", tokenizer=tok, **option)
    assert not (tmp_path / "x").exists()
    with pytest.raises(OpenLLMError, match="--vocab-size shape a tokenizer to train; with --data the tokenizer"):
        TrainConfig(data=str(tok), vocab_size=999).resolved()
    with pytest.raises(OpenLLMError, match="--tokenizer-type shape a tokenizer to train; with --tokenizer-dir"):
        TrainConfig(data_file="c.txt", tokenizer_dir=str(tok), tokenizer_type="bytelevel-bpe").resolved()
